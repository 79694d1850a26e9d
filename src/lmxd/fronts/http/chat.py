"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI's shapes to Service calls.

Both are stateless on the wire (the whole conversation or prompt every time) and stateful
inside: :meth:`lmxd.service.Service.exchange` serves them with an agent whose KV already
holds as much of the conversation as possible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmxd.chat.messages import ChatMessage, ToolCall
from lmxd.chat.tools import Tool
from lmxd.errors import InvalidInput, LmxdError
from lmxd.fronts.http import schemas
from lmxd.fronts.http.errors import error_body
from lmxd.fronts.http.replies import (
    AGENT_HEADER,
    Calls,
    ReplyPlan,
    chat_logprobs,
    cut_short,
    delta_of,
    finish_reason,
    max_tokens,
    meta,
    plan_reply,
    refuse_unsupported,
    sampling,
    stops,
    streamed,
    usage,
)
from lmxd.fronts.http.sse import EventStream, watched
from lmxd.results import DecodeResult, TokenLogprob
from lmxd.service import DecodeStream, Exchange, Piece, Service


def _text(content: str | list[schemas.ContentPart] | None, param: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise InvalidInput(
                f"only text content parts are supported, got {part.type!r}", param=param
            )
        parts.append(part.text)
    return "".join(parts)


def chat_messages(messages: list[schemas.ChatMessage]) -> tuple[ChatMessage, ...]:
    if not messages:
        raise InvalidInput("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidInput(
                "a tool message needs tool_call_id", param=f"messages[{i}].tool_call_id"
            )
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()
        )
        role = "system" if m.role == "developer" else m.role
        content = _text(m.content, f"messages[{i}].content")
        out.append(ChatMessage(role, content, calls, m.tool_call_id, m.name))
    return tuple(out)


def response_schema(fmt: schemas.ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None:
        raise InvalidInput(
            "response_format json_schema needs its json_schema", param="response_format"
        )
    return fmt.json_schema.schema_


def _sampling(
    body: schemas.ChatCompletionRequest | schemas.CompletionRequest,
) -> dict[str, Any] | None:
    return sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
    )


def _agent_header(request: Request) -> str | None:
    return request.headers.get(AGENT_HEADER)


async def chat_completions(
    service: Service, request: Request, body: schemas.ChatCompletionRequest
) -> Response:
    refuse_unsupported(body.n, logit_bias=body.logit_bias)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInput("top_logprobs needs logprobs: true", param="top_logprobs")
    messages = chat_messages(body.messages)
    tools = [
        Tool(t.function.name, t.function.description, t.function.parameters)
        for t in body.tools or ()
    ]
    choice = body.tool_choice
    chosen = choice.function.name if isinstance(choice, schemas.NamedChatToolChoice) else choice
    plan = plan_reply(
        tools, chosen, body.parallel_tool_calls is not False, response_schema(body.response_format)
    )
    exchange = Exchange(
        model=body.model,
        agent=_agent_header(request),
        messages=messages,
        tools=plan.tools,
        max_tokens=max_tokens(body.max_tokens, body.max_completion_tokens),
        sampling=_sampling(body),
        stops=stops(body.stop),
        stream=body.stream,
        grammar=plan.grammar,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    stream = await service.exchange(exchange)
    shared = meta("chatcmpl-", body.model)
    headers = {AGENT_HEADER: stream.agent}
    if not body.stream:
        result = await watched(stream.result(), request.receive, stream.cancel)
        return JSONResponse(_completion(shared, result, plan), headers=headers)
    pieces = await streamed(stream, request)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunks = _chunks(shared, stream, pieces, plan, include_usage, bool(body.logprobs))
    return EventStream(chunks, on_close=stream.cancel, headers=headers)


def _completion(shared: dict[str, Any], result: DecodeResult, plan: ReplyPlan) -> dict[str, Any]:
    reader = plan.reader()
    content: str | None = result.text
    calls: list[dict[str, Any]] = []
    if reader is not None:
        reader.feed(result.text)
        content, calls = reader.content, Calls().of(reader)
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": chat_logprobs(result.logprobs) if result.logprobs is not None else None,
        "finish_reason": finish_reason(result, bool(calls)),
    }
    return {**shared, "object": "chat.completion", "choices": [choice], "usage": usage(result)}


async def _chunks(
    shared: dict[str, Any],
    stream: DecodeStream,
    pieces: AsyncIterator[Piece],
    plan: ReplyPlan,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[list[dict[str, Any]]]:
    base = {**shared, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(
        delta: dict[str, Any], finish: str | None = None, lp: tuple[TokenLogprob, ...] = ()
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": chat_logprobs(lp) if logprobs and lp else None,
            "finish_reason": finish,
        }
        return {**base, "choices": [choice], **extra}

    # One write per piece: its chunks together (the role's with the first piece's).
    batch = [chunk({"role": "assistant", "content": ""})]
    reader, calls = plan.reader(), Calls()
    async for piece in pieces:
        if reader is None:
            batch.append(chunk({"content": piece.text}, lp=piece.logprobs))
        else:
            events = reader.feed(piece.text)
            for i, event in enumerate(events):
                batch.append(chunk(delta_of(event, calls), lp=piece.logprobs if i == 0 else ()))
            if not events and logprobs and piece.logprobs:
                batch.append(chunk({}, lp=piece.logprobs))
        if batch:
            yield batch
            batch = []
    try:
        result = await stream.result()
        cut_short(result)
    except LmxdError as exc:
        yield [*batch, error_body(exc)]
        return
    batch.append(chunk({}, finish_reason(result, reader is not None and bool(reader.calls))))
    if include_usage:
        batch.append({**base, "choices": [], "usage": usage(result)})
    yield batch


# -- completions ----------------------------------------------------------------------------


async def completions(
    service: Service, request: Request, body: schemas.CompletionRequest
) -> Response:
    refuse_unsupported(body.n, logit_bias=body.logit_bias, suffix=body.suffix, echo=body.echo)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidInput("one prompt per request", param="prompt")
        prompt = prompt[0]
    exchange = Exchange(
        model=body.model,
        agent=_agent_header(request),
        prompt=prompt,
        max_tokens=max_tokens(body.max_tokens),
        sampling=_sampling(body),
        stops=stops(body.stop),
        stream=body.stream,
        top_logprobs=body.logprobs,
    )
    stream = await service.exchange(exchange)
    shared = meta("cmpl-", body.model)
    headers = {AGENT_HEADER: stream.agent}
    if not body.stream:
        result = await watched(stream.result(), request.receive, stream.cancel)
        choice = {
            "index": 0,
            "text": result.text,
            "finish_reason": finish_reason(result, False),
            "logprobs": _text_logprobs(result.logprobs),
        }
        body_out = {
            **shared,
            "object": "text_completion",
            "choices": [choice],
            "usage": usage(result),
        }
        return JSONResponse(body_out, headers=headers)
    pieces = await streamed(stream, request)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunks = _text_chunks(shared, stream, pieces, include_usage)
    return EventStream(chunks, on_close=stream.cancel, headers=headers)


def _text_logprobs(
    entries: tuple[TokenLogprob, ...] | list[TokenLogprob] | None, offset: int = 0
) -> dict[str, Any] | None:
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


async def _text_chunks(
    shared: dict[str, Any], stream: DecodeStream, pieces: AsyncIterator[Piece], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    base = {**shared, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    offset = 0
    async for piece in pieces:
        logprobs = _text_logprobs(piece.logprobs, offset) if piece.logprobs else None
        offset += sum(len(e.token) for e in piece.logprobs)
        choice = {"index": 0, "text": piece.text, "logprobs": logprobs, "finish_reason": None}
        yield {**base, "choices": [choice], **extra}
    try:
        result = await stream.result()
        cut_short(result)
    except LmxdError as exc:
        yield error_body(exc)
        return
    choice = {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": finish_reason(result, False),
    }
    yield {**base, "choices": [choice], **extra}
    if include_usage:
        yield {**base, "choices": [], "usage": usage(result)}
