"""What the OpenAI endpoints share: turning a request's tools and formats into a grammar and a
way to read the reply, sampling fields into lmxd's, and lmxd's results into OpenAI's usage,
finish reasons and logprobs.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from lmxd import __version__
from lmxd.chat.tools import (
    ArgumentsDelta,
    CallStarted,
    ReplyEvent,
    ReplyReader,
    TextDelta,
    Tool,
    ToolUse,
    grammar_for,
)
from lmxd.errors import Cancelled, InvalidInput
from lmxd.fronts.http.sse import watched
from lmxd.results import DecodeResult, StopReason, TokenLogprob
from lmxd.service import DecodeStream, Piece

FINGERPRINT = f"lmxd-{__version__}"
AGENT_HEADER = "X-Lmxd-Agent"  # names the agent a request wants, and the one that answered


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def sampling(**fields: float | int | None) -> dict[str, Any] | None:
    """The sampling fields a request set (the others stay the agent's)."""
    chosen = {k: v for k, v in fields.items() if v is not None}
    return chosen or None


def max_tokens(*limits: int | None) -> int | None:
    """The smallest limit given (the schemas check each is positive); None: no limit."""
    given = [n for n in limits if n is not None]
    return min(given) if given else None


@dataclass(frozen=True)
class ReplyPlan:
    """How a reply is constrained and read: a grammar, and tools to read calls for."""

    tools: ToolUse | None = None
    grammar: str | None = None

    def reader(self) -> ReplyReader | None:
        return ReplyReader() if self.tools is not None else None


def plan_reply(
    tools: list[Tool],
    choice: str | None,  # "auto", "none", "required", or a function's name
    parallel: bool,
    response_schema: dict[str, Any] | None,
) -> ReplyPlan:
    """The grammar for a request's tools and response format (both lmxd-enforced)."""
    if tools:
        use = ToolUse.chosen(tuple(tools), choice, parallel)
        return ReplyPlan(use, grammar_for(use.schema(response_schema)))
    if choice not in (None, "auto", "none"):
        raise InvalidInput(f"tool_choice {choice!r} needs tools", param="tool_choice")
    if response_schema is not None:
        return ReplyPlan(None, grammar_for(response_schema))
    return ReplyPlan()


def cut_short(result: DecodeResult) -> None:
    """Raise for a streamed reply that was cancelled: its client stopped reading for
    --stream-timeout (one that left reads nothing anyway), and OpenAI has no finish reason
    that says the text is incomplete for that reason."""
    if result.stop_reason is StopReason.CANCELLED:
        raise Cancelled(
            "the reply was cancelled before its end: its stream went unread for too long",
            agent=result.agent,
        )


def finish_reason(result: DecodeResult, called: bool) -> str:
    if result.stop_reason in (StopReason.LENGTH, StopReason.CONTEXT):
        return "length"
    return "tool_calls" if called else "stop"


def usage(result: DecodeResult) -> dict[str, Any]:
    """OpenAI's usage: the prompt is the whole conversation, cached tokens included."""
    prompt = result.prompt_tokens + result.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": result.generated_tokens,
        "total_tokens": prompt + result.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "bytes": e.bytes,
                "logprob": e.logprob,
                "top_logprobs": [
                    {"token": t.token, "bytes": t.bytes, "logprob": t.logprob}
                    for t in e.top_logprobs
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


@dataclass
class Calls:
    """The tool calls of one reply, with the ids lmxd gives them."""

    ids: list[str] = field(default_factory=list)

    def id(self, index: int) -> str:
        while len(self.ids) <= index:
            self.ids.append(new_id("call_"))
        return self.ids[index]

    def of(self, reader: ReplyReader) -> list[dict[str, Any]]:
        return [
            {
                "id": self.id(i),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for i, (name, arguments) in enumerate(reader.calls)
        ]


def delta_of(event: ReplyEvent, calls: Calls) -> dict[str, Any]:
    """A chat stream's delta for one event of a tool-reading reply."""
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, CallStarted):
        call = {
            "index": event.index,
            "id": calls.id(event.index),
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
        return {"tool_calls": [call]}
    assert isinstance(event, ArgumentsDelta)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def refuse_unsupported(n: int | None, **fields: object) -> None:
    """InvalidInput for ``n`` other than 1, or the first of ``fields`` that is set."""
    if n not in (None, 1):
        raise InvalidInput("n must be 1: lmxd generates one choice per request", param="n")
    for name, value in fields.items():
        if value:
            raise InvalidInput(f"{name} is not supported", param=name)


def meta(prefix: str, model: str) -> dict[str, Any]:
    """The fields every reply and chunk of one request share."""
    return {
        "id": new_id(prefix),
        "created": now(),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }


async def streamed(stream: DecodeStream, request: Request) -> AsyncIterator[Piece]:
    """A streamed reply's pieces, once the first is generated. Waiting for it before answering
    lets errors found at admission (a prompt past the context, no room) still get their status
    code (raised here) instead of arriving inside a 200 stream; a client that leaves
    meanwhile cancels the DECODE."""
    pieces = stream.pieces()

    async def first() -> Piece | None:
        try:
            return await anext(pieces)
        except StopAsyncIteration:
            return None

    head = await watched(first(), request.receive, stream.cancel)
    if head is None:
        await stream.result()  # ended before its first piece: raise what ended it
    return _chained(head, pieces)


async def _chained(first: Piece | None, rest: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    if first is not None:
        yield first
        async for piece in rest:
            yield piece
