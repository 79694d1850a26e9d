"""The agents on disk: who they are and what they have said, so that a restart brings them back.

Each agent registered over the socket has one file, ``<park dir>/agents/<id>.json``: its id,
owner, model (its name, and the file it named with its size and modification time), n_ctx,
sampling, system prompt, and its conversation (the tokens its KV holds, the text they spell,
the chat history). It is written after REGISTER, after each DECODE ends and after RESET, and
removed at UNREGISTER; the HTTP API's auto-agents, caches of conversations that expire by
themselves, have none. A file is written to a temporary name, flushed to disk and renamed over
the old one, so that a crash at any moment (``kill -9`` included) leaves the old file or the
new one, never part of one. The writes run on a thread of their own, in order, off the event
loop and the engine thread.

A restarted daemon registers every agent it finds again (:meth:`AgentRegistry.load`). Its
KV comes back from its state file when one matches (lmxd.kvdisk: written at a clean stop, or
when it was spilled); otherwise its next DECODE prefills the conversation kept here. A model
file that changed since (another size or time) keeps the agent but not its conversation, which
was tokenized for the old one (as does a name that now names another file). An agent file
that cannot be read is set aside as ``<id>.json.bad``.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import msgspec

from lmxd.atomic import write_atomically
from lmxd.chat.messages import ChatMessage
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


class AgentRegistry:
    """Agent files under ``directory``/agents; what went wrong is counted for STATUS."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / "agents"
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
        """The agent is gone: its file goes too."""
        with self._lock:
            self._pending.pop(agent, None)
        self._io.submit(self._unlink, self.dir / f"{agent}.json")

    def flush(self) -> None:
        """Wait for the writes already asked for (blocking: call it from a thread)."""
        self._io.submit(lambda: None).result()

    def close(self) -> None:
        """Wait for the writes already asked for, and take no more."""
        self._io.shutdown(wait=True)

    def _write_latest(self, agent: str) -> None:
        with self._lock:
            record = self._pending.pop(agent, None)
        if record is not None:  # None: removed since
            self._atomically(self.dir / f"{agent}.json", msgspec.json.encode(record))

    def _atomically(self, path: Path, data: bytes) -> None:
        try:
            write_atomically(path, data)
        except OSError as exc:
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
