"""``POST /v1/responses``, stateless: the Responses API that coding CLIs speak.

The input items (messages, function calls and their outputs) become a conversation like a
chat completion's, served the same way. A streamed response sends OpenAI's event sequence:
``response.created``, ``response.in_progress``, then per output item ``output_item.added``,
its content or arguments deltas and ``…done`` events, and ``response.completed`` (or
``response.incomplete`` when the token limit cut it, or an ``error`` event).
``previous_response_id`` needs stored responses and is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmxd.chat.messages import ChatMessage, ToolCall
from lmxd.chat.tools import (
    ArgumentsDelta,
    CallStarted,
    ReplyEvent,
    TextDelta,
    Tool,
)
from lmxd.errors import InvalidInput, LmxdError, PromptTooLong
from lmxd.fronts.http import schemas
from lmxd.fronts.http.errors import error_body
from lmxd.fronts.http.replies import (
    AGENT_HEADER,
    ReplyPlan,
    cut_short,
    max_tokens,
    new_id,
    now,
    plan_reply,
    sampling,
    streamed,
)
from lmxd.fronts.http.sse import EventStream, named_event, watched
from lmxd.results import DecodeResult, StopReason
from lmxd.service import DecodeStream, Exchange, Piece, Service


def _content(item: schemas.InputItem, index: int) -> str:
    if item.content is None or isinstance(item.content, str):
        return item.content or ""
    parts = []
    for part in item.content:
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise InvalidInput(
                f"only text content is supported, got {part.type!r}",
                param=f"input[{index}].content",
            )
        parts.append(part.text)
    return "".join(parts)


def input_messages(body: schemas.ResponsesRequest) -> tuple[ChatMessage, ...]:
    messages = [ChatMessage("system", body.instructions)] if body.instructions else []
    items = (
        [schemas.InputItem(role="user", content=body.input)]
        if isinstance(body.input, str)
        else body.input
    )
    for i, item in enumerate(items):
        if item.type == "message":
            if item.role is None:
                raise InvalidInput("a message item needs a role", param=f"input[{i}].role")
            role = "system" if item.role == "developer" else item.role
            messages.append(ChatMessage(role, _content(item, i)))
        elif item.type == "function_call":
            if not item.call_id or not item.name or item.arguments is None:
                raise InvalidInput(
                    "a function_call item needs call_id, name and arguments", param=f"input[{i}]"
                )
            call = ToolCall(item.call_id, item.name, item.arguments)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                messages[-1] = ChatMessage("assistant", None, (*last.tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", None, (call,)))
        else:
            if not item.call_id or item.output is None:
                raise InvalidInput(
                    "a function_call_output item needs call_id and output", param=f"input[{i}]"
                )
            messages.append(ChatMessage("tool", item.output, tool_call_id=item.call_id))
    if not any(m.role != "system" for m in messages):
        raise InvalidInput("input must hold at least one message", param="input")
    return tuple(messages)


def _format_schema(text: schemas.TextOptions | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    return {"type": "object"} if fmt.type == "json_object" else fmt.schema_


async def responses(service: Service, request: Request, body: schemas.ResponsesRequest) -> Response:
    if body.previous_response_id is not None:
        raise InvalidInput(
            "previous_response_id is not supported: lmxd stores no responses; send the whole input",
            param="previous_response_id",
        )
    messages = input_messages(body)
    tools = [Tool(t.name, t.description, t.parameters) for t in body.tools or ()]
    choice = body.tool_choice
    chosen = choice.name if isinstance(choice, schemas.NamedResponseToolChoice) else choice
    plan = plan_reply(
        tools, chosen, body.parallel_tool_calls is not False, _format_schema(body.text)
    )
    exchange = Exchange(
        model=body.model,
        agent=request.headers.get(AGENT_HEADER),
        messages=messages,
        tools=plan.tools,
        max_tokens=max_tokens(body.max_output_tokens),
        sampling=sampling(temperature=body.temperature, top_p=body.top_p),
        stream=body.stream,
        grammar=plan.grammar,
    )
    try:
        stream = await service.exchange(exchange)
    except PromptTooLong as exc:
        if exc.details.get("param") == "max_tokens":
            exc.details["param"] = "max_output_tokens"  # this API's name for it
        raise
    shell = Shell(body)
    headers = {AGENT_HEADER: stream.agent}
    if not body.stream:
        result = await watched(stream.result(), request.receive, stream.cancel)
        return JSONResponse(shell.finished(result, _items(result, plan)), headers=headers)
    events = _events(shell, stream, await streamed(stream, request), plan)
    return EventStream(events, on_close=stream.cancel, headers=headers, done=False)


@dataclass
class Shell:
    """The response object around the output: what the request asked for, echoed."""

    body: schemas.ResponsesRequest
    id: str = field(default_factory=lambda: new_id("resp_"))
    created_at: int = field(default_factory=now)

    def snapshot(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        body = self.body
        tools = [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": bool(t.strict),
            }
            for t in body.tools or ()
        ]
        choice = body.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": body.model,
            "output": output,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": choice
            if isinstance(choice, str) or choice is None
            else {"type": "function", "name": choice.name},
            "tools": tools,
            "text": {"format": {"type": "text"}},
            "metadata": body.metadata or {},
            "store": False,
            "truncation": "disabled",
            "usage": None,
        }

    def finished(self, result: DecodeResult, output: list[dict[str, Any]]) -> dict[str, Any]:
        cut = result.stop_reason in (StopReason.LENGTH, StopReason.CONTEXT)
        out = self.snapshot("incomplete" if cut else "completed", output)
        if cut:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        prompt = result.prompt_tokens + result.cached_tokens
        out["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": result.cached_tokens},
            "output_tokens": result.generated_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + result.generated_tokens,
        }
        return out


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [part] if status == "completed" else [],
    }


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _items(result: DecodeResult, plan: ReplyPlan) -> list[dict[str, Any]]:
    reader = plan.reader()
    if reader is None:
        return [_message(new_id("msg_"), result.text, "completed")]
    reader.feed(result.text)
    calls = [
        _call(new_id("fc_"), new_id("call_"), name, arguments, "completed")
        for name, arguments in reader.calls
    ]
    if calls and not reader.content:
        return calls
    return [_message(new_id("msg_"), reader.content or "", "completed"), *calls]


@dataclass
class _Emitter:
    """Turns reply events into the Responses API's stream events, one output item at a time."""

    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)  # finished items
    open: dict[str, Any] | None = None  # the item being streamed
    text: str = ""

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return named_event(kind, data)

    def _index(self) -> int:
        return len(self.output)

    def text_delta(self, text: str) -> list[bytes]:
        out = []
        if self.open is None or self.open["type"] != "message":
            out += self.close()
            self.open, self.text = _message(new_id("msg_"), "", "in_progress"), ""
            out.append(
                self.event("response.output_item.added", output_index=self._index(), item=self.open)
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.open["id"],
                    output_index=self._index(),
                    content_index=0,
                    part=part,
                )
            )
        self.text += text
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=self.open["id"],
                output_index=self._index(),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return out

    def call_started(self, name: str) -> list[bytes]:
        out = self.close()
        self.open = _call(new_id("fc_"), new_id("call_"), name, "", "in_progress")
        out.append(
            self.event("response.output_item.added", output_index=self._index(), item=self.open)
        )
        return out

    def arguments(self, delta: str) -> list[bytes]:
        assert self.open is not None
        self.open["arguments"] += delta
        return [
            self.event(
                "response.function_call_arguments.delta",
                item_id=self.open["id"],
                output_index=self._index(),
                delta=delta,
            )
        ]

    def close(self) -> list[bytes]:
        """Finish the item being streamed, if any."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, out = self._index(), []
        if item["type"] == "message":
            done = _message(item["id"], self.text, "completed")
            part = done["content"][0]
            out.append(
                self.event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=self.text,
                    logprobs=[],
                )
            )
            out.append(
                self.event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        else:
            done = {**item, "status": "completed"}
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        out.append(self.event("response.output_item.done", output_index=index, item=done))
        self.output.append(done)
        return out

    def feed(self, event: ReplyEvent) -> list[bytes]:
        if isinstance(event, TextDelta):
            return self.text_delta(event.text)
        if isinstance(event, CallStarted):
            return self.call_started(event.name)
        assert isinstance(event, ArgumentsDelta)
        return self.arguments(event.text)


async def _events(
    shell: Shell, stream: DecodeStream, pieces: AsyncIterator[Piece], plan: ReplyPlan
) -> AsyncIterator[bytes]:
    emit = _Emitter()
    started = shell.snapshot("in_progress", [])
    yield emit.event("response.created", response=started)
    yield emit.event("response.in_progress", response=started)
    reader = plan.reader()
    async for piece in pieces:
        events: list[ReplyEvent] = (
            reader.feed(piece.text)
            if reader is not None
            else [TextDelta(piece.text)]
            if piece.text
            else []
        )
        for event in events:
            for frame in emit.feed(event):
                yield frame
    try:
        result = await stream.result()
        cut_short(result)
    except LmxdError as exc:
        error = error_body(exc)["error"]
        assert isinstance(error, dict)
        yield emit.event(
            "error", code=error["code"], message=error["message"], param=error["param"]
        )
        return
    if not emit.output and emit.open is None:
        for frame in emit.text_delta(""):
            yield frame
    for frame in emit.close():
        yield frame
    final = shell.finished(result, emit.output)
    yield emit.event(f"response.{final['status']}", response=final)  # completed, incomplete
