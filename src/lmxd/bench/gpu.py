"""NVML readings for benchmarks: a process's device bytes, sampled through a run."""

from __future__ import annotations

import threading
import time
from types import TracebackType


class PeakSampler:
    """Polls a process's device bytes every ``interval`` s in a thread; keeps the peak.

    NVML stays open for the whole run (opening it per sample costs more than a sample). On a
    machine without a GPU the peak stays 0 and ``available`` is False.
    """

    def __init__(self, pid: int, interval: float = 0.01, index: int = 0) -> None:
        self.pid = pid
        self.interval = interval
        self.index = index
        self.peak = 0
        self.samples = 0
        self.available = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no library or no driver: nothing to sample
            return
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.available = True
            while not self._stop.is_set():
                used = sum(
                    p.usedGpuMemory or 0
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if p.pid == self.pid
                )
                self.peak = max(self.peak, used)
                self.samples += 1
                time.sleep(self.interval)
        finally:
            pynvml.nvmlShutdown()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
