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

A restarted daemon registers every agent it finds again (:meth:`AgentRegistry.load`). Its KV
did not survive, so its next DECODE prefills the conversation kept here; a model file that
changed since (another size or time) keeps the agent but not its conversation, which was
tokenized for the old one (as does a name that now names another file). A file that cannot
be read is set aside as ``<id>.json.bad``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from lmxd.chat.messages import ChatMessage

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

    def load(self) -> list[AgentRecord]:
        """Every agent file that reads; creates the directory if need be."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._failed(f"cannot create {self.dir}: {exc}")
            return []
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
        """Write ``record`` (later, in order, on the registry's thread)."""
        self._io.submit(self._write, record)

    def remove(self, agent: str) -> None:
        self._io.submit(self._unlink, agent)

    def close(self) -> None:
        """Wait for the writes already asked for."""
        self._io.shutdown(wait=True)

    def _write(self, record: AgentRecord) -> None:
        path = self.dir / f"{record.agent}.json"
        temporary = self.dir / f".{record.agent}.json.tmp"
        try:
            with temporary.open("wb") as f:
                f.write(msgspec.json.encode(record))
                f.flush()
                os.fsync(f.fileno())
            temporary.replace(path)
            directory = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self._failed(f"cannot save agent {record.agent!r} in {self.dir}: {exc}")

    def _unlink(self, agent: str) -> None:
        try:
            (self.dir / f"{agent}.json").unlink(missing_ok=True)
        except OSError as exc:
            self._failed(f"cannot remove agent {agent!r} from {self.dir}: {exc}")

    def _set_aside(self, path: Path) -> None:
        try:
            path.replace(path.with_name(path.name + ".bad"))
        except OSError as exc:
            self._failed(f"cannot set {path} aside: {exc}")

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.error("%s", message)
