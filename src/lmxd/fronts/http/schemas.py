"""The request bodies of the OpenAI API endpoints lmxd serves, typed (msgspec).

Fields a client may send and lmxd does not use (``user``, ``metadata``, ``store``...) are
accepted and ignored, as OpenAI-compatible servers do; a known field of the wrong type or out
of range is a 400 naming it. Fields lmxd cannot honour are refused by the endpoints, not here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=16)]
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
ToolChoiceMode = Literal["auto", "none", "required"]


class _Body(msgspec.Struct, kw_only=True):
    """Unknown fields are ignored."""


# -- chat completions -----------------------------------------------------------------------


class FunctionDefinition(_Body):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] = {}
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Body):
    name: str


class NamedChatToolChoice(_Body):
    type: Literal["function"]
    function: ChosenFunction


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    function: ToolCallFunction
    type: Literal["function"] = "function"


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchema(_Body):
    name: str = "reply"
    schema_: dict[str, Any] = msgspec.field(default_factory=dict, name="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatCompletionRequest(_Body):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: list[ChatMessage]
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoiceMode | NamedChatToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    logit_bias: dict[str, float] | None = None


# -- completions ----------------------------------------------------------------------------


class CompletionRequest(_Body):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str | list[str]
    max_tokens: Positive | None = 16
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


# -- responses ------------------------------------------------------------------------------


class ResponseTool(FunctionDefinition, kw_only=True):
    """A chat tool's function, flat, with its type beside it."""

    type: Literal["function"]


class NamedResponseToolChoice(_Body):
    type: Literal["function"]
    name: str


class InputContent(_Body):
    type: str
    text: str | None = None


class InputItem(_Body):
    """A message (``role`` + ``content``), a function call, or a function call's output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputContent] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "reply"
    schema_: dict[str, Any] = msgspec.field(default_factory=dict, name="schema")
    strict: bool | None = None


class TextOptions(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: ToolChoiceMode | NamedResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    max_output_tokens: Positive | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextOptions | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
