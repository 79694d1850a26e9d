"""How many threads llama.cpp's CPU backend decodes with, chosen by measurement as it runs.

llama.cpp's threads meet at a barrier after every operation of the graph (hundreds per token)
and spin while they wait, so a thread whose core another process holds makes every other one
wait a time slice, every time. Measured on the 2-core machine with SmolLM2, one sequence:
idle, 2 threads gave 81 tokens/s and 1 thread 49; with one core kept busy by another process,
2 threads gave 14 and 1 thread 47.

What tells the two cases apart is the CPU time the process gets during a step against what
its threads asked for (wall time x threads): about 1.0 on an idle machine, 0.52 with one of
the two cores busy (median of 30 steps; 1 thread: 1.0 either way). :class:`ThreadTuner` steps
down while that share stays low. Going back up is a try of one step with more threads, kept
if that step got its share; a try under load is dear (70-500 ms against 20), so it is made
only when the machine's cores have been idle enough since the last look (``/proc/stat``), and
tries that fail grow rarer (every 32 steps, doubling up to every 1,024).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

FIRST_TRY = 32  # steps before trying more threads, after a change
LAST_TRY = 1024  # ... and at most, while tries keep failing
DOWN = 0.75  # fewer threads when the smoothed share falls below this
UP = 0.85  # a try with more threads succeeds when its step got at least this share
SMOOTHING = 0.25  # weight of the latest step in the smoothed share


class ThreadTuner:
    """Picks a thread count among ``n_max``, half of it and 1. One per process: the load is
    the machine's, so a context opened later starts with what the others found."""

    def __init__(
        self,
        n_max: int,
        idle: Callable[[], float | None] = lambda: _idle_seconds(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = sorted({n_max, max(1, n_max // 2), 1})
        self.current = n_max
        self._share = 1.0
        self._interval = FIRST_TRY
        self._until_try = FIRST_TRY
        self._trying: int | None = None
        self._idle, self._clock = idle, clock  # seams for the tests
        self._idle_since = idle(), clock()

    def choose(self) -> int:
        """The thread count for the next step: the current one, or one more option to try."""
        higher = [n for n in self.options if n > self.current]
        if not higher or self._until_try > 0:
            return self.current
        self._until_try = self._interval
        idle, since = self._idle_since
        self._idle_since = now = self._idle(), self._clock()
        if idle is not None and now[0] is not None:
            idle_cores = (now[0] - idle) / max(now[1] - since, 1e-9)
            if idle_cores < 0.5 * (higher[0] - self.current):
                return self.current  # the cores are taken: a try would only lose
        self._trying = higher[0]
        return self._trying

    def record(self, threads: int, wall_s: float, cpu_s: float) -> None:
        """A step with ``threads`` threads took ``wall_s`` and the process got ``cpu_s``."""
        if wall_s <= 0:
            return
        share = cpu_s / (wall_s * threads)
        if self._trying is not None:
            if share >= UP:
                self.current, self._share, self._interval = self._trying, share, FIRST_TRY
            else:
                self._interval = min(2 * self._interval, LAST_TRY)
            self._trying = None
            self._until_try = self._interval
            return
        self._share += SMOOTHING * (share - self._share)
        self._until_try -= 1
        if self._share < DOWN and self.current > 1:
            self.current = max(n for n in self.options if n < self.current)
            self._share, self._interval, self._until_try = 1.0, FIRST_TRY, FIRST_TRY


def _idle_seconds() -> float | None:
    """Seconds all cores have been idle since boot (Linux), or None where unknown."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    idle_ticks = int(fields[4]) + int(fields[5])  # idle + iowait
    return idle_ticks / os.sysconf("SC_CLK_TCK")
