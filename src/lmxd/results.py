"""What a DECODE gives back, defined once.

The scheduler makes these values, :class:`lmxd.service.Service` hands them to every front, the
fronts encode them on their wire, and the Python clients decode the JSON-lines frame back into
the same :class:`DecodeResult`. This module imports nothing of lmxd's, so a client process
that uses it never loads llama.cpp through it.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec


class StopReason(StrEnum):
    EOS = "eos"  # the model emitted an end-of-generation token
    STOP = "stop"  # a stop string appeared
    LENGTH = "length"  # max_tokens reached
    CONTEXT = "context"  # the agent's context is full
    CANCELLED = "cancelled"  # CANCEL, a client that went away, or a stream nobody read


class TopLogprob(msgspec.Struct, frozen=True):
    """One candidate for a position: its text, UTF-8 bytes and natural-log probability."""

    token: str
    bytes: list[int]
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True):
    """A generated token with its log probability and, if asked for, the best alternatives."""

    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopLogprob] = []


class Piece(msgspec.Struct, frozen=True):
    """New text of a streamed reply, with the log probabilities of the tokens behind it."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class DecodeResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """The final reply to a DECODE, whichever front it came through."""

    agent: str
    text: str
    prompt_tokens: int  # tokens prefilled for this request
    cached_tokens: int  # tokens of the request's conversation already in KV (not prefilled)
    generated_tokens: int
    stop_reason: StopReason
    timings_ms: dict[str, float]  # queued, park, restore, prefill, decode, total
    restored: bool  # the agent's KV came back from host RAM for this request
    parked: list[str]  # agents parked to make room for this request
    tokens_per_s: float  # generated_tokens / decode time
    logprobs: list[TokenLogprob] | None = None  # only when the request asked for them
