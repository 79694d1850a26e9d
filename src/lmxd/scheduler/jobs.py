"""A DECODE inside the scheduler: what it asks for, and the job that carries it to its reply.

Three kinds of prompt reach the scheduler, one per way a front speaks:

- :class:`TextPrompt`: raw text appended to the conversation as is (the socket's ``prompt``);
- :class:`ChatTurn`: new messages after the agent's chat history (the socket's ``messages``),
  rendered with the model's template when the job is admitted, once earlier replies are in;
- :class:`Conversation`: the whole conversation, rendered already (the HTTP API resends it
  every time); it replaces the agent's history, and what KV holds of it is kept.

A streamed job's pieces wait in a bounded buffer (:data:`STREAM_BUFFER`): a client that does
not read pauses its own agent, never anyone else, and is cancelled if it stays full.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmxd.chat.messages import ChatMessage
from lmxd.chat.template import Rendered
from lmxd.engine.sampling import SamplingParams
from lmxd.engine.stepper import Reply
from lmxd.errors import LmxdError
from lmxd.results import DecodeResult, Piece

if TYPE_CHECKING:
    from lmxd.scheduler.agents import Agent

STREAM_BUFFER = 256  # pieces a streamed job may hold unread before its agent pauses


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class ChatTurn:
    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True)
class Conversation:
    rendered: Rendered
    messages: tuple[ChatMessage, ...]  # what was rendered: the agent's history from now on


Prompt = TextPrompt | ChatTurn | Conversation


@dataclass(frozen=True)
class DecodeRequest:
    """What a DECODE asks for, whichever front it came through."""

    agent: str
    prompt: Prompt
    max_tokens: int = 256
    sampling: Mapping[str, Any] | None = None  # SamplingParams fields over the agent's own
    stops: tuple[str, ...] = ()
    stream: bool = False
    grammar: str | None = None  # GBNF the reply must follow
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives each


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
    """One DECODE of one agent, from queue to reply."""

    agent: Agent
    request: DecodeRequest
    sampling: SamplingParams
    done: asyncio.Future[DecodeResult]
    events: asyncio.Queue[Piece | None] | None  # streamed pieces, then None; unbounded, but
    # the scheduler stops stepping the job while STREAM_BUFFER pieces wait unread
    stops: tuple[str, ...] = ()
    conversation: list[int] | None = None  # the agent's conversation with this prompt in
    started: bool = False  # its reply is on the stepper (prefill begun)
    prompt_tokens: int = 0  # tokens this job adds to the conversation's KV
    cached_tokens: int = 0  # tokens of the conversation found in KV already
    text: str | None = None  # the conversation's text once rendered (None: raw text prompts)
    add_bos: bool = False  # the text was tokenized with the model's BOS
    history: list[ChatMessage] | None = None  # chat jobs: the history once the reply is in
    reply: Reply | None = None  # once it has ended
    restored: bool = False
    parked: list[str] = field(default_factory=list)  # agents parked to make room for this job
    cancelled: bool = False
    stalled_since: float | None = None  # when its stream buffer filled up, if it is full
    timings: DecodeTimings = field(default_factory=DecodeTimings)

    def need(self, n_ctx: int) -> int:
        """KV cells this job may fill: its conversation and its longest reply, at most the
        agent's ``n_ctx``. Known once the conversation is tokenized."""
        assert self.conversation is not None
        return min(n_ctx, len(self.conversation) + self.request.max_tokens)

    @property
    def stream_full(self) -> bool:
        return self.events is not None and self.events.qsize() >= STREAM_BUFFER

    def fail(self, exc: LmxdError) -> None:
        """End the job with an error; a streaming client gets its end of stream too."""
        if self.events is not None:
            self.events.put_nowait(None)
        if not self.done.done():
            self.done.set_exception(exc)
