"""Parked agents' KV state in host RAM: reusable buffers under their own budget.

A parked agent's sequence state (what ``llama_state_seq_get_data`` writes) lives here until
its next DECODE restores it. On a GPU the buffers are page-locked (``cudaHostAlloc`` through
libcudart, by ctypes): copies to and from the card then run at PCIe speed (55 GB/s measured
on the H200 machine, against 9-21 GB/s from ordinary memory). Page-locking is slow, so buffers
are kept and reused, and made a quarter larger than asked: after the first parks, parking
allocates nothing until a conversation has grown by a quarter. A departed agent's buffer goes
back to the system at once, and every kept one when the last agent has gone.

The store only accounts and hands out buffers; the engine thread fills and drains them.
"Does not fit" is a value: :meth:`KvStore.allocate` returns ``None`` past the budget; the
residency then spills parked states to disk (lmxd.kvdisk).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from lmxd.engine.context import StateLayout
from lmxd.memory.host import give_back_heap

log = logging.getLogger("lmxd.kvstore")

_MIN_BUFFER = 1 << 20
_PORTABLE = 1  # cudaHostAllocPortable


class HostBuffer(Protocol):
    def __len__(self) -> int: ...


@dataclass
class ParkedState:
    """One agent's saved sequence: ``layout.nbytes`` of ``buffer``, holding ``n_tokens`` cells."""

    buffer: HostBuffer
    layout: StateLayout
    n_tokens: int

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def size_class(nbytes: int) -> int:
    """Round up to one of 8 steps per power of two (at most 12.5% slack) so buffers of
    slightly different states can be reused for one another."""
    if nbytes <= _MIN_BUFFER:
        return _MIN_BUFFER
    step = 1 << max(0, nbytes.bit_length() - 4)
    return (nbytes + step - 1) // step * step


class PinnedMemory:
    """cudaHostAlloc / cudaFreeHost through libcudart (no CUDA Python package needed)."""

    def __init__(self, library: str) -> None:
        self._cuda = ctypes.CDLL(library)
        self._cuda.cudaHostAlloc.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_size_t,
            ctypes.c_uint,
        ]
        self._cuda.cudaFreeHost.argtypes = [ctypes.c_void_p]

    @classmethod
    def load(cls) -> PinnedMemory | None:
        """The CUDA runtime if this machine has one, else None (host memory stays ordinary)."""
        for name in ("/usr/local/cuda/lib64/libcudart.so", ctypes.util.find_library("cudart")):
            if not name:
                continue
            try:
                return cls(name)
            except OSError:
                continue
        return None

    def allocate(self, size: int) -> HostBuffer | None:
        ptr = ctypes.c_void_p()
        # Portable: page-locked for every device's context, so that agents of models on
        # several GPUs park into the same buffers at full speed.
        if self._cuda.cudaHostAlloc(ctypes.byref(ptr), size, _PORTABLE) != 0 or not ptr.value:
            return None
        return (ctypes.c_uint8 * size).from_address(ptr.value)

    def free(self, buffer: HostBuffer) -> None:
        self._cuda.cudaFreeHost(ctypes.addressof(buffer))  # type: ignore[arg-type]


class KvStore:
    """Host buffers for parked state, thread-safe (filled on the engine thread).

    ``budget`` bounds all the host memory the store holds, in use or kept for reuse.
    """

    def __init__(self, budget: int, pinned: bool = False) -> None:
        self.budget = budget
        # libcudart is loaded at the first park, on the engine thread, once llama.cpp has set
        # up CUDA: loading it into the process before the first model load crashed that load.
        self._want_pinned = pinned
        self.pinned: PinnedMemory | None = None
        self._lock = threading.Lock()
        self._in_use = 0  # bytes of buffers holding parked state
        self._idle: dict[int, list[HostBuffer]] = {}  # size class -> buffers kept for reuse
        self._idle_bytes = 0

    @property
    def used(self) -> int:
        with self._lock:
            return self._in_use

    def allocate(self, nbytes: int) -> HostBuffer | None:
        """A buffer of at least ``nbytes``, or None if that would pass the budget.

        A kept buffer is reused if it is at most twice ``nbytes``. A new one has room for a
        quarter more where the budget allows: an agent's state grows a little with every
        turn, and a park that needs a new page-locked buffer waits for its allocation (34 ms
        for 75 MB on the H200), ten times the copy itself.
        """
        with self._lock:
            fitting = [s for s, kept in self._idle.items() if kept and nbytes <= s <= 2 * nbytes]
            if fitting:
                size = min(fitting)
                self._idle_bytes -= size
                self._in_use += size
                return self._idle[size].pop()
            size = size_class(nbytes)
            roomy = size_class(nbytes + nbytes // 4)
            while self._in_use + self._idle_bytes + roomy > self.budget and self._idle_bytes:
                self._release_one()
            if self._in_use + roomy <= self.budget:
                size = roomy
            elif self._in_use + size > self.budget:
                return None
            self._in_use += size
        buffer = self._new(size)
        if buffer is None:
            with self._lock:
                self._in_use -= size
        return buffer

    def free(self, state: ParkedState) -> None:
        """The state was restored or dropped: keep its buffer for the next park."""
        self.release(state.buffer)
        state.buffer = bytearray()

    def release(self, buffer: HostBuffer) -> None:
        """Take back a buffer from :meth:`allocate` and keep it for reuse."""
        size = len(buffer)
        with self._lock:
            self._in_use -= size
            self._idle.setdefault(size, []).append(buffer)
            self._idle_bytes += size

    def discard(self, state: ParkedState) -> None:
        """The state's agent has gone (RESET, UNREGISTER): its buffer goes back to the
        system, not to reuse."""
        buffer, state.buffer = state.buffer, bytearray()
        with self._lock:
            self._in_use -= len(buffer)
        self._give_back(buffer)

    def trim(self) -> None:
        """Give every buffer kept for reuse back to the system (the last agent has gone: the
        daemon's memory returns to where it was before the agents came)."""
        with self._lock:
            while self._idle_bytes:
                self._release_one()
        give_back_heap()

    def _new(self, size: int) -> HostBuffer | None:
        if self._want_pinned and self.pinned is None:
            self._want_pinned = False
            self.pinned = PinnedMemory.load()
        if self.pinned is not None:
            t0 = time.perf_counter()
            buffer = self.pinned.allocate(size)
            if buffer is not None:
                # Page-locking takes time (tens of ms for tens of MB): a park that needs a new
                # buffer waits for it, so each one is logged.
                ms = (time.perf_counter() - t0) * 1000
                log.info("page-locked buffer allocated bytes=%d ms=%.1f", size, ms)
                return buffer
            log.warning("cudaHostAlloc of %d bytes failed; using ordinary memory", size)
        return bytearray(size)

    def _release_one(self) -> None:
        """Give back the largest idle buffer (lock held)."""
        size = max(s for s, bufs in self._idle.items() if bufs)
        buffer = self._idle[size].pop()
        self._idle_bytes -= size
        self._give_back(buffer)

    def _give_back(self, buffer: HostBuffer) -> None:
        if self.pinned is not None and not isinstance(buffer, bytearray):
            self.pinned.free(buffer)  # ordinary buffers go with their last reference
