"""The agents on disk: who they are and what they have said, so that a restart brings them back.

Each agent registered over the socket has one file, ``<park dir>/agents/<id>.json``: its id,
owner, model (its name, and the file it named with its size and modification time), n_ctx,
sampling, system prompt,
and its conversation (the tokens its KV holds, the text they spell, the chat history). It is
written after REGISTER, after each DECODE ends and after RESET, and removed at UNREGISTER; the
HTTP API's auto-agents, caches of conversations that expire by themselves, have none. A file is
written to a temporary name, flushed to disk and renamed over the old one, so that a crash at
any moment (``kill -9`` included) leaves the old file or the new one, never part of one. The
writes run on a thread of their own, in order, off the event loop and the engine thread.

A daemon that stops cleanly also writes each agent's KV, ``<park dir>/states/<id>.state``: a
header line (the agent, its model file, the number of tokens, llama.cpp's version, how the
state is laid out, its length and CRC-32) and then the bytes of ``llama_state_seq_get_data``.
A restarted daemon registers every agent it finds again (:meth:`AgentRegistry.load`); an agent
whose state file verifies comes back parked, and its next DECODE restores that state and goes
on exactly where it stopped. Without one (a daemon killed, a file that does not verify: another
model file, another llama.cpp, a checksum that does not match), its next DECODE prefills the
conversation kept here. A model file that changed since (another size or time) keeps the agent
but not its conversation, which was tokenized for the old one (as does a name that now names
another file). An agent file that cannot be read is set aside as ``<id>.json.bad``; state files
are read once and removed.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import llama_cpp
import msgspec

from lmxd.chat.messages import ChatMessage
from lmxd.engine.context import StateLayout
from lmxd.errors import DaemonRunning

log = logging.getLogger("lmxd.registry")

FORMAT = 1


class AgentRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One agent as kept on disk."""

    format: int
    agent: str
    owner: int
    model: str  # the name it was registered with (a catalog name, or the file's path)
    path: str  # the model file it named, resolved
    model_size: int
    model_mtime_ns: int
    n_ctx: int
    sampling: dict[str, Any]  # SamplingParams' fields
    system_prompt: str | None
    tokens: list[int]  # the conversation, as the model saw it
    text: str | None  # the text ``tokens`` spell, when rendered (chat); None after raw prompts
    text_bos: bool
    reply_at: int
    history: list[ChatMessage]


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


class AgentRegistry:
    """Agent files under ``directory``/agents and state files under ``directory``/states;
    what went wrong is counted for STATUS."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / "agents"
        self.states = directory / "states"
        self.errors = 0  # writes or removals that failed (a read-only directory, a full disk)
        self.last_error: str | None = None
        self.unreadable = 0  # agent files set aside at the start
        self._io = ThreadPoolExecutor(1, thread_name_prefix="lmxd-registry")
        self._lock = threading.Lock()
        self._pending: dict[str, AgentRecord] = {}  # the latest record of each agent to write
        self._held: IO[str] | None = None  # the directory's lock file, held while we run

    def load(self) -> list[AgentRecord]:
        """Every agent file that reads; creates the directory if need be, and holds it for
        this daemon: a second daemon on the same directory is refused (DAEMON_RUNNING), as it
        would register the first one's agents and remove their files."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._held = (self.dir.parent / "lock").open("a")
        except OSError as exc:
            self._failed(f"cannot create {self.dir}: {exc}")
            return []
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonRunning(
                f"another daemon keeps its agents in {self.dir.parent}: give this one a "
                "--park-dir of its own",
                park_dir=str(self.dir.parent),
            ) from None
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = msgspec.json.decode(path.read_bytes(), type=AgentRecord)
                if record.format != FORMAT or path.stem != record.agent:
                    raise ValueError(f"format {record.format}, agent {record.agent!r}")
            except (OSError, ValueError, msgspec.DecodeError) as exc:
                log.warning("agent file %s cannot be read (%s): set aside as .bad", path, exc)
                self.unreadable += 1
                self._set_aside(path)
                continue
            records.append(record)
        return records

    def save(self, record: AgentRecord) -> None:
        """Write ``record`` (later, on the registry's thread). Only an agent's latest record
        waits to be written: when DECODEs end faster than the disk takes them, the queue
        holds one record per agent, not one per DECODE."""
        with self._lock:
            queued = record.agent in self._pending
            self._pending[record.agent] = record
        if not queued:
            self._io.submit(self._write_latest, record.agent)

    def remove(self, agent: str) -> None:
        """The agent is gone: its file and its state file go too."""
        with self._lock:
            self._pending.pop(agent, None)
        self._io.submit(self._unlink, self.dir / f"{agent}.json")
        self.drop_state(agent)

    def drop_state(self, agent: str) -> None:
        """The agent's conversation changed (or it is new): a state file of it is stale."""
        self._io.submit(self._unlink, self.states / f"{agent}.state")

    def drop_states(self) -> None:
        """Remove the state files no agent took at the start (their agent was not registered
        again, or its model changed): they would be stale by the next one."""
        for path in self.states.glob("*.state"):
            self._io.submit(self._unlink, path)

    def flush(self) -> None:
        """Wait for the writes already asked for (blocking: call it from a thread)."""
        self._io.submit(lambda: None).result()

    def close(self) -> None:
        """Wait for the writes already asked for, and take no more."""
        self._io.shutdown(wait=True)

    def save_state(
        self, record: AgentRecord, n_tokens: int, data: bytes, layout: StateLayout
    ) -> None:
        """Write an agent's KV state of ``n_tokens`` cells (later, in order, on the registry's
        thread)."""
        self._io.submit(self._write_state, record, n_tokens, data, layout)

    def load_state(self, record: AgentRecord) -> tuple[bytes, StateLayout, int] | None:
        """The agent's state (its bytes, their layout, the cells they hold), if its file
        verifies for ``record`` (the model file it names, this llama.cpp, no more cells than
        the conversation has tokens, its checksum); the file is removed either way."""
        path = self.states / f"{record.agent}.state"
        if not path.is_file():
            return None
        try:
            with path.open("rb") as f:
                header = msgspec.json.decode(f.readline(), type=StateHeader)
                data = f.read()
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("state file %s cannot be read (%s): prefilling instead", path, exc)
            return None
        finally:
            self._unlink(path)
        expected = (FORMAT, record.agent, record.path, record.model_size, record.model_mtime_ns)
        found = (header.format, header.agent, header.path, header.model_size, header.model_mtime_ns)
        why = None
        if found != expected:
            why = "it is for another agent or model file"
        elif header.llama_cpp != llama_cpp.__version__:
            why = f"it was written by llama-cpp-python {header.llama_cpp}"
        elif header.n_tokens > len(record.tokens) or len(data) != header.nbytes:
            why = "its length does not match the conversation"
        elif header.tokens_crc32 != _tokens_crc32(record.tokens[: header.n_tokens]):
            why = "it holds another conversation"
        elif StateLayout.HEADER + sum(header.sections) != header.nbytes:
            why = "its layout does not add up to its length"
        elif zlib.crc32(data) != header.crc32:
            why = "its checksum does not match"
        if why is not None:
            log.warning("state file %s does not verify (%s): prefilling instead", path, why)
            return None
        layout = StateLayout(header.n_stream, header.stream, tuple(header.sections))
        return data, layout, header.n_tokens

    def _write_state(
        self, record: AgentRecord, n_tokens: int, data: bytes, layout: StateLayout
    ) -> None:
        header = StateHeader(
            format=FORMAT,
            agent=record.agent,
            path=record.path,
            model_size=record.model_size,
            model_mtime_ns=record.model_mtime_ns,
            llama_cpp=llama_cpp.__version__,
            n_tokens=n_tokens,
            tokens_crc32=_tokens_crc32(record.tokens[:n_tokens]),
            n_stream=layout.n_stream,
            stream=layout.stream,
            sections=list(layout.sections),
            nbytes=len(data),
            crc32=zlib.crc32(data),
        )
        self._atomically(
            self.states / f"{record.agent}.state", msgspec.json.encode(header) + b"\n", data
        )

    def _write_latest(self, agent: str) -> None:
        with self._lock:
            record = self._pending.pop(agent, None)
        if record is not None:  # None: removed since
            self._atomically(self.dir / f"{agent}.json", msgspec.json.encode(record))

    def _atomically(self, path: Path, *chunks: bytes | memoryview) -> None:
        """``path`` holds ``chunks`` whole, or what it held before: written to a temporary
        name, flushed to disk, renamed over it, and the rename flushed too."""
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            temporary.replace(path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self._failed(f"cannot write {path}: {exc}")

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._failed(f"cannot remove {path}: {exc}")

    def _set_aside(self, path: Path) -> None:
        try:
            path.replace(path.with_name(path.name + ".bad"))
        except OSError as exc:
            self._failed(f"cannot set {path} aside: {exc}")

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.error("%s", message)


def _tokens_crc32(tokens: list[int]) -> int:
    return zlib.crc32(array.array("i", tokens).tobytes())
