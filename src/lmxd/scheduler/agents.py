"""An agent's life: its states, and what it keeps between DECODEs.

::

    REGISTER ─▶ EMPTY ─(job)─▶ QUEUED ─(admitted)─▶ ACTIVE ─(done)─▶ RESIDENT
                  ▲               ▲  └─(KV parked)─▶ RESTORING ─▶ ACTIVE    │
                  │               └──────────── PARKED ◀── PARKING ◀──(idle, room needed)
                  └── RESET from EMPTY / RESIDENT / PARKED
    A QUEUED agent whose KV is resident may be parked too (its context is being reopened
    larger); it stays QUEUED. UNREGISTER from any state frees everything the agent holds.

Where the agent's KV is follows from its fields: a sequence id while resident, a
:class:`ParkedState` while parked, neither while empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from lmxd.chat.messages import ChatMessage
from lmxd.engine.sampling import SamplingParams
from lmxd.kvstore import ParkedState

if TYPE_CHECKING:
    from lmxd.scheduler.jobs import Job
    from lmxd.scheduler.slots import ModelSlot


class AgentState(StrEnum):
    EMPTY = "empty"  # registered, nothing in any KV
    RESIDENT = "resident"  # idle, KV in a sequence of its model's context
    PARKED = "parked"  # idle, KV in host RAM
    QUEUED = "queued"  # a job waits for its turn
    RESTORING = "restoring"  # KV on its way back from host RAM
    ACTIVE = "decoding"  # prefilling or generating
    PARKING = "parking"  # KV on its way to host RAM


_TRANSITIONS: dict[AgentState, set[AgentState]] = {
    AgentState.EMPTY: {AgentState.QUEUED},
    AgentState.RESIDENT: {AgentState.QUEUED, AgentState.PARKING, AgentState.EMPTY},
    AgentState.PARKED: {AgentState.QUEUED, AgentState.EMPTY},
    AgentState.QUEUED: {
        AgentState.ACTIVE,
        AgentState.RESTORING,
        AgentState.EMPTY,
        AgentState.RESIDENT,
        AgentState.PARKED,
        AgentState.PARKING,
    },
    AgentState.RESTORING: {
        AgentState.ACTIVE,
        AgentState.PARKED,
        AgentState.EMPTY,
        AgentState.RESIDENT,
    },
    AgentState.ACTIVE: {AgentState.RESIDENT, AgentState.EMPTY},
    AgentState.PARKING: {
        AgentState.PARKED,
        AgentState.RESIDENT,
        AgentState.EMPTY,
        AgentState.QUEUED,
    },
}


@dataclass(eq=False)  # identity: agents are kept in sets and compared by who they are
class Agent:
    id: str
    slot: ModelSlot
    n_ctx: int
    sampling: SamplingParams
    system_prompt: str | None
    state: AgentState = AgentState.EMPTY
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
    jobs: list[Job] = field(default_factory=list)  # FIFO; the head is the one in progress
    last_used: float = field(default_factory=time.time)

    def move(self, to: AgentState) -> None:
        """Change state along an allowed edge; anything else is a scheduler bug."""
        if to not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"agent {self.id}: illegal transition {self.state} -> {to}")
        self.state = to

    @property
    def idle(self) -> bool:
        return self.state in (AgentState.EMPTY, AgentState.RESIDENT, AgentState.PARKED)

    @property
    def kv_tokens(self) -> int:
        """Tokens of this agent's conversation held in KV (resident or parked)."""
        if self.seq is not None:
            return self.kv
        return self.parked.n_tokens if self.parked is not None else 0
