"""An agent's life, and the DECODE jobs it runs.

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

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from lmxd.engine.generate import Generation, StopReason
from lmxd.engine.model import ChatMessage
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import LmxdError
from lmxd.kvstore import ParkedState

if TYPE_CHECKING:
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


class DecodeTimings:
    """Milliseconds a job spent in each phase."""

    def __init__(self) -> None:
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.park = 0.0  # parking other agents to make room for this job
        self.restore = 0.0
        self.prefill = 0.0
        self.decode = 0.0

    def as_ms(self) -> dict[str, float]:
        queued = (self.admitted or time.perf_counter()) - self.submitted
        total = time.perf_counter() - self.submitted
        return {
            "queued": round(queued * 1000, 3),
            "park": round(self.park * 1000, 3),
            "restore": round(self.restore * 1000, 3),
            "prefill": round(self.prefill * 1000, 3),
            "decode": round(self.decode * 1000, 3),
            "total": round(total * 1000, 3),
        }


@dataclass(eq=False)
class Job:
    """One DECODE request of one agent, from queue to reply."""

    agent: Agent
    prompt: str | None
    messages: list[ChatMessage] | None
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    events: asyncio.Queue[str] | None  # streamed text pieces, when the client asked for them
    done: asyncio.Future[JobResult]
    pending: list[int] = field(default_factory=list)  # tokens still to prefill
    prompt_tokens: int = 0  # tokens this job added to the conversation's KV
    generation: Generation | None = None
    restored: bool = False
    parked: list[str] = field(default_factory=list)  # agents parked to make room for this job
    cancelled: bool = False
    timings: DecodeTimings = field(default_factory=DecodeTimings)

    def fail(self, exc: LmxdError) -> None:
        """End the job with an error; a streaming client gets its end of stream too."""
        if self.events is not None:
            self.events.put_nowait("")
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass(frozen=True)
class JobResult:
    agent: str
    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: StopReason
    timings_ms: dict[str, float]
    restored: bool
    parked: list[str]

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.timings_ms["decode"] / 1000
        return round(self.generated_tokens / decode_s, 2) if decode_s > 0 else 0.0


@dataclass(eq=False)  # identity: agents are kept in sets and compared by who they are
class Agent:
    id: str
    slot: ModelSlot
    n_ctx: int
    sampling: SamplingParams
    system_prompt: str | None
    state: AgentState = AgentState.EMPTY
    tokens: list[int] = field(default_factory=list)  # the conversation, in KV or to prefill
    history: list[ChatMessage] = field(default_factory=list)  # chat mode: messages so far
    seq: int | None = None  # sequence id while resident
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
        if self.seq is not None and self.slot.context is not None:
            return self.slot.context.seq_len[self.seq]
        return self.parked.n_tokens if self.parked is not None else 0
