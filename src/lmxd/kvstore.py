"""Parked agents' KV state in host RAM, under its own budget.

A parked agent's sequence state (what ``llama_state_seq_get_data`` writes) lives here until the
agent's next DECODE restores it. The store only accounts and hands out buffers; the engine
thread fills and drains them. "Does not fit" is a value: :meth:`KvStore.allocate` returns
``None`` past the budget, and the scheduler turns that into a clear error for the request
that needed the room. (A disk tier for when host RAM is short comes later.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class ParkedState:
    """One agent's saved sequence: ``nbytes`` of ``buffer``, holding ``n_tokens`` cells."""

    buffer: bytearray
    nbytes: int
    n_tokens: int


class KvStore:
    """Host buffers for parked state, thread-safe (filled on the engine thread)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def allocate(self, nbytes: int) -> bytearray | None:
        """A buffer of ``nbytes``, or None if that would pass the budget."""
        with self._lock:
            if self._used + nbytes > self.budget:
                return None
            self._used += nbytes
        return bytearray(nbytes)

    def free(self, state: ParkedState) -> None:
        with self._lock:
            self._used -= len(state.buffer)
        state.buffer = bytearray()
