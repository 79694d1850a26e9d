"""Parked state on disk: the tier under host RAM, and the KV that outlives the daemon.

Two things write an agent's KV state here, one file per agent, ``<park dir>/states/<id>.state``:

- a park that finds the host-RAM budget for parked state (``--park-budget``) spent: the least
  recently used parked agents are *spilled*, their states written here and their RAM given
  back to the store; a spilled agent's next DECODE reads its file back and restores it;
- a clean stop, for every idle agent that has KV.

A restarted daemon takes each agent's file that still matches it (:meth:`DiskTier.find`): the
agent comes back spilled, and its next DECODE goes on from the KV it had.

A file is one header line (JSON: the agent, its model file with the file's size and
modification time, llama-cpp-python's version, how many cells it holds and the CRC-32 of the
tokens in them, how the state is laid out, the length and CRC-32 of the bytes), then the bytes
of ``llama_state_seq_get_data``. It is written to a temporary name, flushed to disk and renamed,
so that a crash or ``kill -9`` at any moment leaves the whole file or none. A file is used only
when its header matches the agent as it is now and its bytes their checksum; anything else (a
truncated or corrupted file, another model file, another llama.cpp, another conversation) is
rejected with the reason, and the agent's conversation is prefilled instead: never a wrong
continuation. A file is read once: it goes when it is read back, and when its agent is reset
or unregistered.

All file I/O and checksums run on the tier's one thread, in the order asked, off the event
loop and the engine thread. A failed write (a full disk, a directory that cannot be written)
is counted and reported, and the state it was to hold stays where it was, in host RAM.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import msgspec

from lmxd.atomic import write_atomically
from lmxd.engine.context import StateLayout
from lmxd.kvstore import ParkedState
from lmxd.modelfile import ModelInfo

log = logging.getLogger("lmxd.kvdisk")

FORMAT = 1
_MAX_HEADER = 1 << 16  # a header line is a few hundred bytes; a longer one is not a header


@dataclass(frozen=True)
class StateOwner:
    """Whose KV a state is: an agent, the model file that computed it (as it was read when
    the agent registered), and the conversation whose first ``n_tokens`` it holds."""

    agent: str
    model: ModelInfo
    tokens: Sequence[int]


@dataclass(frozen=True)
class SpilledState:
    """A state on disk: its file, the cells it holds and their layout."""

    path: Path
    layout: StateLayout
    n_tokens: int

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


class StateHeader(msgspec.Struct, forbid_unknown_fields=True):
    """The first line of a state file: what the bytes after it are, and for what."""

    format: int
    agent: str
    path: str  # the model file, with its size and modification time
    model_size: int
    model_mtime_ns: int
    llama_cpp: str  # llama-cpp-python's version: a state is llama.cpp's own layout
    n_tokens: int  # cells the state holds
    tokens_crc32: int  # of the conversation's first n_tokens tokens: the state is theirs
    n_stream: int  # StateLayout
    stream: int
    sections: list[int]
    nbytes: int
    crc32: int


class Rejected(Exception):
    """A state file that cannot be used; the message says why."""


class DiskTier:
    """State files under ``directory``; what was written, read, rejected and failed is kept
    for STATUS."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.rejected = 0  # files that did not verify or could not be read back
        self.errors = 0  # writes and removals that failed
        self.last_error: str | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="lmxd-disk")
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}  # agent -> bytes of its state on disk

    @property
    def files(self) -> int:
        with self._lock:
            return len(self._files)

    @property
    def file_bytes(self) -> int:
        with self._lock:
            return sum(self._files.values())

    async def write(self, owner: StateOwner, state: ParkedState) -> SpilledState | None:
        """Write ``state`` (of ``owner``) to its file; None if that failed (counted, logged,
        and the state is still in ``state``). The caller keeps ``state``'s buffer alive and
        unchanged until this returns."""
        future = self._io.submit(self._write, owner, state)
        return await asyncio.wrap_future(future)

    async def read(self, owner: StateOwner, spilled: SpilledState) -> ParkedState | None:
        """The state in ``spilled``'s file, in ordinary memory, if it verifies for ``owner``;
        None if not (counted and logged: the caller prefills). The file goes either way."""
        future = self._io.submit(self._read, owner, spilled)
        return await asyncio.wrap_future(future)

    def find(self, owner: StateOwner) -> SpilledState | None:
        """``owner``'s file, if one is there and its header matches ``owner`` (the bytes are
        checked when it is read back). At the start, before any write: it blocks."""
        path = self._path(owner.agent)
        if not path.is_file():
            return None
        try:
            with path.open("rb") as f:
                header = self._header(f.readline(_MAX_HEADER), owner)
                if os.fstat(f.fileno()).st_size != f.tell() + header.nbytes:
                    raise Rejected("it is truncated")
        except (OSError, Rejected) as exc:
            self._reject(path, str(exc))
            self._unlink(path)
            return None
        with self._lock:
            self._files[owner.agent] = header.nbytes
        return SpilledState(path, _layout(header), header.n_tokens)

    def remove(self, agent: str) -> None:
        """``agent``'s file goes (it was reset or unregistered), after the writes asked for."""
        with self._lock:
            self._files.pop(agent, None)
        self._io.submit(self._unlink, self._path(agent))

    def remove_unclaimed(self) -> None:
        """At the start, once every agent has looked for its file: the files no agent took
        (their agent was not registered again) and what a crash left half written."""
        with self._lock:
            claimed = {self._path(agent) for agent in self._files}
        for path in [*self.dir.glob("*.state"), *self.dir.glob(".*.tmp")]:
            if path not in claimed:
                self._io.submit(self._unlink, path)

    async def flush(self) -> None:
        """Wait for the file work already asked for."""
        await asyncio.wrap_future(self._io.submit(lambda: None))

    def close(self) -> None:
        """Wait for the file work already asked for, and take no more."""
        self._io.shutdown(wait=True)

    # -- on the tier's thread ----------------------------------------------------------------

    def _write(self, owner: StateOwner, state: ParkedState) -> SpilledState | None:
        t0 = time.perf_counter()
        data = memoryview(state.buffer).cast("B")[: state.nbytes]  # type: ignore[arg-type]
        layout = state.layout
        header = StateHeader(
            format=FORMAT,
            agent=owner.agent,
            path=str(owner.model.path),
            model_size=owner.model.file_size,
            model_mtime_ns=owner.model.mtime_ns,
            llama_cpp=llama_cpp.__version__,
            n_tokens=state.n_tokens,
            tokens_crc32=_tokens_crc32(owner.tokens[: state.n_tokens]),
            n_stream=layout.n_stream,
            stream=layout.stream,
            sections=list(layout.sections),
            nbytes=state.nbytes,
            crc32=zlib.crc32(data),
        )
        path = self._path(owner.agent)
        try:
            write_atomically(path, msgspec.json.encode(header) + b"\n", data)
        except OSError as exc:
            self._failed(f"cannot write {path}: {exc}")
            return None
        with self._lock:
            self._files[owner.agent] = state.nbytes
        log.debug(
            "state written agent=%s bytes=%d ms=%.1f",
            owner.agent,
            state.nbytes,
            (time.perf_counter() - t0) * 1000,
        )
        return SpilledState(path, layout, state.n_tokens)

    def _read(self, owner: StateOwner, spilled: SpilledState) -> ParkedState | None:
        path = spilled.path
        try:
            with path.open("rb") as f:
                header = self._header(f.readline(_MAX_HEADER), owner)
                data = bytearray(header.nbytes)
                if f.readinto(data) != header.nbytes or f.read(1):
                    raise Rejected("its length does not match its header")
            if zlib.crc32(data) != header.crc32:
                raise Rejected("its checksum does not match")
        except (OSError, Rejected) as exc:
            self._reject(path, str(exc))
            return None
        finally:
            with self._lock:
                self._files.pop(owner.agent, None)
            self._unlink(path)
        return ParkedState(data, _layout(header), header.n_tokens)

    @staticmethod
    def _header(line: bytes, owner: StateOwner) -> StateHeader:
        """The header in ``line``, if it is a header of ``owner``'s state (Rejected: why not)."""
        try:
            header = msgspec.json.decode(line, type=StateHeader)
        except msgspec.DecodeError as exc:
            raise Rejected(f"its header cannot be read ({exc})") from None
        model = owner.model
        expected = (FORMAT, owner.agent, str(model.path), model.file_size, model.mtime_ns)
        found = (header.format, header.agent, header.path, header.model_size, header.model_mtime_ns)
        if found != expected:
            raise Rejected("it is for another agent or model file")
        if header.llama_cpp != llama_cpp.__version__:
            raise Rejected(f"it was written by llama-cpp-python {header.llama_cpp}")
        if header.n_tokens > len(owner.tokens):
            raise Rejected("it holds more cells than the conversation has tokens")
        if header.tokens_crc32 != _tokens_crc32(owner.tokens[: header.n_tokens]):
            raise Rejected("it holds another conversation")
        if StateLayout.HEADER + sum(header.sections) != header.nbytes:
            raise Rejected("its layout does not add up to its length")
        return header

    def _path(self, agent: str) -> Path:
        return self.dir / f"{agent}.state"

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._failed(f"cannot remove {path}: {exc}")

    def _reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        self.last_error = f"state file {path} not used: {why}"
        log.warning("state file %s not used (%s): prefilling instead", path, why)

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.error("%s", message)


def _layout(header: StateHeader) -> StateLayout:
    return StateLayout(header.n_stream, header.stream, tuple(header.sections))


def _tokens_crc32(tokens: Sequence[int]) -> int:
    return zlib.crc32(array.array("i", tokens).tobytes())
