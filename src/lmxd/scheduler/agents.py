"""An agent's life: where its KV is, what it is doing, and what it keeps between DECODEs.

Two small state machines, each with its own table of allowed moves (``_MEMORY_MOVES``,
``_ACTIVITY_MOVES``)::

    Memory, where its KV is
        NONE ─(seated)─▶ RESIDENT ─▶ PARKING ─▶ PARKED ─▶ RESTORING ─▶ RESIDENT
        PARKED ─(host RAM for parked state is short)─▶ SPILLING ─▶ SPILLED ─▶ RESTORING
        RESIDENT ─(nothing in KV to park; RESET; UNREGISTER)─▶ NONE
        PARKED, SPILLED ─(RESET; UNREGISTER)─▶ NONE
        NONE ─(its state file found after a restart)─▶ SPILLED
        a copy out that fails goes back: PARKING ─▶ RESIDENT, SPILLING ─▶ PARKED; a state
        that llama.cpp will not take back, or a file that does not verify, is dropped:
        RESTORING ─▶ NONE (the conversation is prefilled)

    Activity, what it is doing
        IDLE ─(DECODE)─▶ QUEUED ─(admitted)─▶ RUNNING ─(done)─▶ IDLE, or QUEUED (its next job)
        QUEUED ─(cancelled or failed, no job left)─▶ IDLE

An agent is parked only with something to park: a resident agent whose sequence holds no
token loses its sequence and has no KV anywhere (NONE). The two move independently: a DECODE
may queue an agent while its KV is on its way to host RAM, and a queued agent's KV may be
parked to seat a job that came first. UNREGISTER from any state frees everything it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from lmxd.chat.messages import ChatMessage
from lmxd.engine.sampling import SamplingParams
from lmxd.kvdisk import SpilledState
from lmxd.kvstore import ParkedState

if TYPE_CHECKING:
    from lmxd.scheduler.jobs import Job
    from lmxd.scheduler.slots import ModelSlot


class Memory(StrEnum):
    """Where an agent's KV is."""

    NONE = "none"  # in no KV: never decoded, RESET, or nothing was left to park
    RESIDENT = "resident"  # in a sequence of its model's context
    PARKING = "parking"  # on its way to host RAM
    PARKED = "parked"  # in host RAM
    SPILLING = "spilling"  # on its way from host RAM to its state file
    SPILLED = "spilled"  # in its state file only (lmxd.kvdisk)
    RESTORING = "restoring"  # on its way back into a sequence


class Activity(StrEnum):
    """What an agent is doing."""

    IDLE = "idle"
    QUEUED = "queued"  # a job waits for its turn
    RUNNING = "running"  # prefilling or generating


_MEMORY_MOVES: dict[Memory, set[Memory]] = {
    Memory.NONE: {Memory.RESIDENT, Memory.SPILLED},
    Memory.RESIDENT: {Memory.PARKING, Memory.NONE},
    Memory.PARKING: {Memory.PARKED, Memory.RESIDENT},
    Memory.PARKED: {Memory.RESTORING, Memory.SPILLING, Memory.NONE},
    Memory.SPILLING: {Memory.SPILLED, Memory.PARKED},
    Memory.SPILLED: {Memory.RESTORING, Memory.NONE},
    Memory.RESTORING: {Memory.RESIDENT, Memory.NONE},
}

_ACTIVITY_MOVES: dict[Activity, set[Activity]] = {
    Activity.IDLE: {Activity.QUEUED},
    Activity.QUEUED: {Activity.RUNNING, Activity.IDLE},
    Activity.RUNNING: {Activity.IDLE, Activity.QUEUED},
}

# The one word STATUS and LIST show for an agent (docs/protocol.md): a copy in progress,
# else what it is doing, else where its idle KV is.
_SHOWN = {
    Memory.NONE: "empty",
    Memory.RESIDENT: "resident",
    Memory.PARKED: "parked",
    Memory.SPILLED: "spilled",
}


@dataclass(eq=False)  # identity: agents are kept in sets and compared by who they are
class Agent:
    id: str
    slot: ModelSlot
    n_ctx: int
    sampling: SamplingParams
    system_prompt: str | None
    owner: int  # the uid that registered it: only it may decode, reset or unregister it
    memory: Memory = Memory.NONE
    activity: Activity = Activity.IDLE
    tokens: list[int] = field(default_factory=list)  # the conversation, in KV or to prefill
    # The text ``tokens`` spell when the conversation was rendered (chat, or the HTTP API's
    # whole prompts), and whether the model's BOS went before it. A request whose text
    # extends it needs only its new text tokenized and prefilled; None after raw prompts.
    text: str | None = None
    text_bos: bool = False
    reply_at: int = 0  # where in ``text`` the last reply starts
    history: list[ChatMessage] = field(default_factory=list)  # chat mode: messages so far
    seq: int | None = None  # sequence id while resident
    kv: int = 0  # tokens its sequence holds while resident, as the engine last reported
    parked: ParkedState | None = None  # saved state while parked
    spilled: SpilledState | None = None  # its state file while spilled
    # While resident and idle: a copy of its KV written ahead of need (when the engine had
    # nothing to do), so that parking it is only freeing its cells. Gone when a job starts.
    copy: ParkedState | None = None
    jobs: list[Job] = field(default_factory=list)  # FIFO; the head is the one in progress
    last_used: float = field(default_factory=time.time)
    # Since it registered, for `lmxd top`: tokens generated (counted after every slice, so a
    # reply in progress moves it), parks and restores of its KV.
    generated: int = 0
    parks: int = 0
    restores: int = 0

    def place(self, to: Memory) -> None:
        """Move its KV along an allowed edge; anything else is a scheduler bug."""
        if to not in _MEMORY_MOVES[self.memory]:
            raise RuntimeError(f"agent {self.id}: illegal move of its KV {self.memory} -> {to}")
        self.memory = to

    def do(self, to: Activity) -> None:
        """Change what it is doing along an allowed edge; anything else is a scheduler bug."""
        if to not in _ACTIVITY_MOVES[self.activity]:
            raise RuntimeError(f"agent {self.id}: illegal move {self.activity} -> {to}")
        self.activity = to

    @property
    def idle(self) -> bool:
        return self.activity is Activity.IDLE

    @property
    def state(self) -> str:
        """One word for STATUS and LIST: ``empty``, ``resident``, ``parked``, ``spilled``,
        ``queued``, ``decoding``, ``parking``, ``spilling`` or ``restoring``."""
        if self.memory in (Memory.PARKING, Memory.SPILLING, Memory.RESTORING):
            return self.memory.value
        if self.activity is Activity.RUNNING:
            return "decoding"
        if self.activity is Activity.QUEUED:
            return "queued"
        return _SHOWN[self.memory]

    @property
    def kv_tokens(self) -> int:
        """Tokens of this agent's conversation held in KV (resident, parked or spilled)."""
        if self.seq is not None:
            return self.kv
        state = self.parked or self.spilled
        return state.n_tokens if state is not None else 0
