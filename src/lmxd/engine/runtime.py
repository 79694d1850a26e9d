"""The engine threads, the process's one backend init, and what llama.cpp reports it allocated.

A llama.cpp model or context must not be used from several threads at once, and our asyncio
server must never block on it; so every llama.cpp call in lmxd runs on an engine thread, a
:class:`Lane`: one per device (``Engine.lane(i)``), so that two GPUs decode at the same time,
each lane's calls in order. ``Engine.call`` / ``await Engine.acall`` run on the first lane,
which also initialised the backend. Objects holding llama.cpp pointers check that they are used
on an engine thread, and the worker sends every call about a model or context to its device's
lane.

llama.cpp reports each buffer it allocates in its log ("CPU KV buffer size = 90.00 MiB"); the
log callback set here collects those lines so that ``lmxd estimate --measure`` and the tests can
put the estimator's prediction beside the real figure.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import llama_cpp

from lmxd.engine.threads import ThreadTuner
from lmxd.errors import EngineError

log = logging.getLogger("lmxd.llama")

P = ParamSpec("P")
T = TypeVar("T")

# "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB"
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output)\s+buffer size\s*=\s*([\d.]+) MiB")

# ggml's INFO is chatty (one line per tensor) and goes to DEBUG; its WARN lines are mostly
# about model files we cannot change ("control-looking token"), so INFO; ERROR stays ERROR.
_GGML_LOG_LEVELS = {3: logging.INFO, 4: logging.ERROR}


@dataclass
class MeasuredBuffers:
    """Bytes llama.cpp allocated, by kind (model, KV, compute, output) and buffer type."""

    entries: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, buffer type, bytes)

    def parts(self, device_only: bool) -> dict[str, int]:
        """By the estimator's part names; on a GPU the logits buffer is host memory."""
        return {
            "weights": self.total("model", device_only),
            "kv": self.total("KV", device_only),
            "compute": self.total("compute", device_only),
            "output": self.total("output", device_only),
        }

    def total(self, kind: str | None = None, device_only: bool = False) -> int:
        return sum(
            size
            for k, buft, size in self.entries
            if (kind is None or k == kind) and (not device_only or is_device_buffer(buft))
        )


def is_device_buffer(buffer_type: str) -> bool:
    """CUDA0, CUDA1... hold device memory; CPU, CPU_Mapped and CUDA_Host live in host RAM."""
    return buffer_type.startswith("CUDA") and not buffer_type.startswith("CUDA_Host")


class _LogSink:
    """Receives llama.cpp's log lines; keeps buffer reports for whoever is measuring."""

    def __init__(self) -> None:
        self.recording: MeasuredBuffers | None = None
        self._lines = threading.local()  # a line in pieces, per lane: lanes log at once
        # ctypes must keep the callback object alive for as long as llama.cpp may call it.
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
        if text is None:
            return
        partial = getattr(self._lines, "partial", "") + text.decode("utf-8", errors="replace")
        self._lines.partial = "" if partial.endswith("\n") else partial
        if not partial.endswith("\n"):
            return
        line = partial.rstrip()
        match = _BUFFER_LINE.search(line)
        if match is not None and self.recording is not None:
            buft, kind, mib = match.group(1), match.group(2), float(match.group(3))
            self.recording.entries.append((kind, buft, round(mib * 1024 * 1024)))
        log.log(_GGML_LOG_LEVELS.get(level, logging.DEBUG), "%s", line)


class Lane:
    """One engine thread: llama.cpp calls run on it in the order they were asked for."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.thread_id = self._executor.submit(threading.get_ident).result()

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on this lane and wait for its result (re-entrant)."""
        if threading.get_ident() == self.thread_id:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    async def acall(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on this lane without blocking the event loop."""
        future = self._executor.submit(fn, *args, **kwargs)
        return await asyncio.wrap_future(future)

    def post(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` on this lane without waiting (clean-ups)."""
        self._executor.submit(fn)


class Engine(Lane):
    """The engine's lanes (itself the first: device 0's, and the backend's init), and the
    process's backend."""

    _instance: Engine | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__("lmxd-engine")
        self._lanes: dict[int, Lane] = {0: self}
        self._lanes_lock = threading.Lock()
        self._threads = frozenset({self.thread_id})  # replaced whole: read without the lock
        self._sink = _LogSink()
        self.call(self._init_backend)
        # CPU builds: the thread count decode steps use, measured as they run.
        self.thread_tuner = ThreadTuner(os.cpu_count() or 1)

    @classmethod
    def get(cls) -> Engine:
        """The process-wide engine: llama.cpp's backend is initialised once per process."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = Engine()
            return cls._instance

    def _init_backend(self) -> None:
        llama_cpp.llama_log_set(self._sink.callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

    def lane(self, device: int) -> Lane:
        """The lane of models and contexts on ``device`` (made at its first use)."""
        with self._lanes_lock:
            if device not in self._lanes:
                lane = self._lanes[device] = Lane(f"lmxd-engine-{device}")
                self._threads = self._threads | {lane.thread_id}
            return self._lanes[device]

    @property
    def gpu_offload(self) -> bool:
        """Whether this build of llama.cpp can put layers on a GPU."""
        return bool(llama_cpp.llama_supports_gpu_offload())

    def check_thread(self) -> None:
        """Raise unless called on one of the engine's lanes."""
        if threading.get_ident() not in self._threads:
            raise EngineError("llama.cpp called off the engine threads (a bug in lmxd)")

    def measure(self, fn: Callable[[], T]) -> tuple[T, MeasuredBuffers]:
        """Run ``fn`` on the engine thread, collecting the buffers llama.cpp reports meanwhile."""

        def recorded() -> tuple[T, MeasuredBuffers]:
            self._sink.recording = measured = MeasuredBuffers()
            try:
                return fn(), measured
            finally:
                self._sink.recording = None

        return self.call(recorded)
