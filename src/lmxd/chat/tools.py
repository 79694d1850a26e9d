"""Tools for any model: described in a system message, answered as JSON through a grammar.

Our models' templates know nothing of tools (SmolLM2's is plain ChatML; Gemma 3 270M has
none), so lmxd does what llama.cpp's server does for such "generic" templates: it lists the
functions in a system message and constrains the reply with a grammar to one JSON object,

    {"tool_calls": [{"name": "<function>", "arguments": {...}}, ...]}   to call tools, or
    {"response": "<text for the user>"}                                  to answer,

where each call's ``arguments`` must validate against that function's schema. ``required``
and a named function allow only the first form (a named one, calls of that function only);
``none`` only the second; ``auto`` both. The grammar is built from the JSON Schema by
llama-cpp-python's converter (:func:`grammar_for`), which puts ``name`` before ``arguments``:
a streaming reader can announce a call as soon as its name is complete (:class:`ReplyReader`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from llama_cpp.llama_grammar import json_schema_to_gbnf

from lmxd.chat.messages import ChatMessage
from lmxd.errors import InvalidInput


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # the JSON Schema of the arguments


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and what its tool_choice allows the reply to be.

    The system message always lists every tool, whatever tool_choice says: the turns of one
    conversation then share their prefix in KV, and the grammar alone enforces the choice.
    """

    tools: tuple[Tool, ...]
    calls: bool = True  # the reply may call tools
    answer: bool = True  # the reply may answer directly
    only: str | None = None  # calls of this function alone (a named tool_choice)
    parallel: bool = True  # more than one call in a reply

    def __post_init__(self) -> None:
        for tool in self.tools:
            check_schema(tool.parameters, f"the parameters of tool {tool.name!r}", "tools")
        if self.only is not None and all(t.name != self.only for t in self.tools):
            raise InvalidInput(
                f"tool_choice names {self.only!r}, which is not among the tools",
                param="tool_choice",
            )

    @classmethod
    def chosen(cls, tools: tuple[Tool, ...], choice: str | None, parallel: bool) -> ToolUse:
        """``choice``: ``auto`` (or None), ``none``, ``required``, or a function's name."""
        if choice in (None, "auto"):
            return cls(tools, parallel=parallel)
        if choice == "none":
            return cls(tools, calls=False, parallel=parallel)
        if choice == "required":
            return cls(tools, answer=False, parallel=parallel)
        return cls(tools, answer=False, only=choice, parallel=parallel)

    def system_prompt(self) -> str:
        """The tools and the reply format, in words."""
        listing = [
            {"name": t.name, "description": t.description or "", "parameters": t.parameters}
            for t in self.tools
        ]
        calls = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
        return (
            "You can call these tools (each one's arguments follow its JSON Schema):\n"
            f"{json.dumps(listing, ensure_ascii=False)}\n\n"
            f"Reply with one JSON object and nothing else: either {calls} to call tools, "
            'or {"response": "<your reply>"} to answer directly.'
        )

    def schema(self, response: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON Schema of a reply; ``response`` is the schema of a direct answer (a
        string unless the request asked for a JSON format)."""
        forms = []
        defs: dict[str, Any] = {}
        if self.calls:
            call_schemas = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": _hoisted(t, defs)},
                    "required": ["name", "arguments"],
                }
                for t in self.tools
                if self.only in (None, t.name)
            ]
            items = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
            calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
            if not self.parallel:
                calls["maxItems"] = 1
            forms.append(
                {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
            )
        if self.answer:
            forms.append(
                {
                    "type": "object",
                    "properties": {"response": response or {"type": "string"}},
                    "required": ["response"],
                }
            )
        schema = forms[0] if len(forms) == 1 else {"anyOf": forms}
        return {**schema, "$defs": defs} if defs else schema


def _hoisted(tool: Tool, defs: dict[str, Any]) -> dict[str, Any]:
    """``tool``'s parameters, their definitions moved into ``defs`` (the reply schema's root,
    where ``#/$defs/...`` now points) under the tool's name, and every reference rewritten.
    Schemas made by pydantic (the Agents SDK, LangChain) keep nested models in ``$defs``."""
    params = tool.parameters
    local = {**params.get("definitions", {}), **params.get("$defs", {})}

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                for base in ("#/$defs/", "#/definitions/"):
                    if value.startswith(base):
                        value = f"#/$defs/{tool.name}.{value[len(base) :]}"
            out[key] = rewrite(value)
        return out

    for name, definition in local.items():
        defs[f"{tool.name}.{name}"] = rewrite(definition)
    return {k: rewrite(v) for k, v in params.items() if k not in ("$defs", "definitions")}


def with_tool_prompt(messages: Sequence[ChatMessage], use: ToolUse) -> list[ChatMessage]:
    """The conversation with the tools described in its system message."""
    prompt = use.system_prompt()
    if messages and messages[0].role == "system":
        first = messages[0]
        merged = f"{first.content}\n\n{prompt}" if first.content else prompt
        return [ChatMessage("system", merged), *messages[1:]]
    return [ChatMessage("system", prompt), *messages]


MAX_GRAMMAR_DEPTH = 1024  # llama.cpp's grammar parser recurses once per nested group
MAX_GRAMMAR_BYTES = 1 << 20


def check_schema(schema: dict[str, Any], what: str, param: str | None = None) -> None:
    """InvalidInput unless ``schema`` is a valid JSON Schema (whatever the validator throws)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInput(
            f"{what} is not a valid JSON Schema: {exc.message}", param=param
        ) from exc
    except Exception as exc:  # "$schema": 5 and friends: TypeError, AttributeError, RecursionError
        raise InvalidInput(
            f"{what} is not a valid JSON Schema: {type(exc).__name__}: {exc}", param=param
        ) from exc


def grammar_for(schema: dict[str, Any]) -> str:
    """GBNF for replies that validate against ``schema``; InvalidInput if it cannot be one."""
    check_schema(schema, "the schema")
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises whatever it meets (KeyError, ValueError...)
        raise InvalidInput(
            f"this JSON Schema cannot be turned into a grammar: {type(exc).__name__}: {exc}"
        ) from exc
    # The converter writes a bounded repetition (maxLength, maxItems...) as one nested group per
    # repetition; llama.cpp's parser recurses into each, and a schema with "maxLength": 20000
    # overflowed the engine thread's stack and killed the daemon (seen 2026-11-29).
    depth = _depth(grammar)
    if depth > MAX_GRAMMAR_DEPTH or len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidInput(
            f"this JSON Schema makes a grammar {len(grammar)} bytes long, nested {depth} deep "
            f"(at most {MAX_GRAMMAR_BYTES} and {MAX_GRAMMAR_DEPTH}): lower its maxLength, "
            "maxItems or similar bounds"
        )
    # llama-cpp-python's converter lets a string hold any character but `"` and `\`; JSON
    # forbids raw control characters, and a random-weight model on the H200 wrote \x19 into a
    # json_schema reply that json.loads then refused (2026-11-29). llama.cpp's own converter
    # excludes them: use its rule.
    return "\n".join(
        _JSON_CHAR if line.startswith("char ::= ") else line for line in grammar.splitlines()
    )


_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def _depth(grammar: str) -> int:
    """The deepest nesting of parentheses in a GBNF text (outside literals and classes)."""
    depth = deepest = 0
    quote: str | None = None  # '"' inside a literal, "]" inside a character class
    escaped = False
    for ch in grammar:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == '"':
            quote = '"'
        elif ch == "[":
            quote = "]"
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


# -- reading a reply -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ReplyEvent = TextDelta | CallStarted | ArgumentsDelta

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass
class _Container:
    kind: str  # "{" or "["
    key: str | None = None  # objects: the key whose value comes next
    index: int = 0  # arrays: the element being read


@dataclass
class ReplyReader:
    """Reads the reply format above as it is generated, one piece of text at a time.

    It announces each call when its name is complete and passes its ``arguments`` through as
    the raw JSON text the model writes, so that the deltas of a streamed reply concatenate to
    exactly the final arguments. A ``response`` string comes out unescaped.
    """

    content: str | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON text)
    _stack: list[_Container] = field(default_factory=list)
    _in_string: bool = False
    _is_key: bool = False
    _escape: str = ""  # an escape sequence being read, from its backslash
    _high: str = ""  # a UTF-16 high surrogate waiting for its pair
    _key: str = ""
    _target: str | None = None  # what the current value is: "name", "arguments", "response"
    _capture_depth: int | None = None  # stack depth where a raw capture (arguments) began
    _in_scalar: bool = False  # inside a number or literal, which a delimiter ends
    _events: list[ReplyEvent] = field(default_factory=list)

    def feed(self, text: str) -> list[ReplyEvent]:
        for ch in text:
            self._char(ch)
        events, self._events = self._events, []
        return _merged(events)

    # -- the scanner -----------------------------------------------------------------------

    def _char(self, ch: str) -> None:
        if self._in_string:
            self._string_char(ch)
            return
        if self._in_scalar:
            if ch not in ",}] \t\r\n":
                if self._capture_depth is not None:
                    self._raw(ch)
                return
            self._in_scalar = False
            self._end_capture_at(len(self._stack))
        if self._capture_depth is not None:
            self._raw(ch)
        top = self._stack[-1] if self._stack else None
        if ch in " \t\r\n:":
            return
        if ch == ",":
            if top is not None and top.kind == "[":
                top.index += 1
            elif top is not None:
                top.key = None
            return
        if ch in "}]":
            if self._stack:
                self._stack.pop()
            self._end_capture_at(len(self._stack))
            return
        if ch == '"' and top is not None and top.kind == "{" and top.key is None:
            self._in_string, self._is_key, self._key = True, True, ""
            return
        self._value_starts(ch)
        if ch in "{[":
            self._stack.append(_Container(ch))
        elif ch == '"':
            self._in_string, self._is_key = True, False
        else:
            self._in_scalar = True

    def _end_capture_at(self, depth: int) -> None:
        if self._capture_depth == depth:
            self._capture_depth = None

    def _value_starts(self, ch: str) -> None:
        if self._capture_depth is not None:
            return
        self._target = self._where()
        if self._target == "name" or (self._target == "arguments" and not self.calls):
            self.calls.append(("", ""))
        if self._target == "arguments" or (self._target == "response" and ch != '"'):
            self._capture_depth = len(self._stack)
            self._raw(ch)
        elif self._target == "response":
            self.content = ""

    def _where(self) -> str | None:
        keys = [(c.kind, c.key) for c in self._stack]
        if keys == [("{", "response")]:
            return "response"
        if len(keys) == 3 and keys[0] == ("{", "tool_calls") and keys[1][0] == "[":
            return {"name": "name", "arguments": "arguments"}.get(keys[2][1] or "")
        return None

    def _string_char(self, ch: str) -> None:
        if self._capture_depth is not None:
            self._raw(ch)
        if self._escape:
            self._escape += ch
            if self._escape[1] != "u":
                self._lone_surrogate()
                self._text(_ESCAPES.get(ch, ch))
                self._escape = ""
            elif len(self._escape) == 6:
                self._unicode(int(self._escape[2:], 16))
                self._escape = ""
            return
        if ch == "\\":
            self._escape = "\\"  # a low surrogate may follow: the high one waits for it
            return
        self._lone_surrogate()
        if ch == '"':
            self._in_string = False
            if self._is_key:
                self._stack[-1].key = self._key
            elif self._capture_depth is not None:
                self._end_capture_at(len(self._stack))
            elif self._target == "name":
                index = len(self.calls) - 1
                self._events.append(CallStarted(index, self.calls[index][0]))
        else:
            self._text(ch)

    def _unicode(self, code: int) -> None:
        """A \\uXXXX escape; UTF-16 surrogates pair up, and one left alone becomes U+FFFD (a
        lone surrogate cannot be encoded, and the grammar does not forbid writing one)."""
        if 0xDC00 <= code < 0xE000 and self._high:
            pair = (self._high + chr(code)).encode("utf-16", "surrogatepass")
            self._high = ""
            self._text(pair.decode("utf-16"))
            return
        self._lone_surrogate()
        if 0xD800 <= code < 0xDC00:
            self._high = chr(code)
        else:
            self._text("\ufffd" if 0xDC00 <= code < 0xE000 else chr(code))

    def _lone_surrogate(self) -> None:
        if self._high:
            self._high = ""
            self._text("\ufffd")

    def _text(self, text: str) -> None:
        """A decoded character of the current string."""
        if self._is_key:
            self._key += text
        elif self._capture_depth is not None:
            return  # inside arguments: the raw text is what counts
        elif self._target == "response":
            self.content = (self.content or "") + text
            self._events.append(TextDelta(text))
        elif self._target == "name":
            name, args = self.calls[-1]
            self.calls[-1] = (name + text, args)

    def _raw(self, ch: str) -> None:
        """A character of a raw capture: a call's arguments, or a non-string response."""
        if self._target == "response":
            self.content = (self.content or "") + ch
            self._events.append(TextDelta(ch))
            return
        index = len(self.calls) - 1
        name, args = self.calls[index]
        self.calls[index] = (name, args + ch)
        self._events.append(ArgumentsDelta(index, ch))


def _merged(events: list[ReplyEvent]) -> list[ReplyEvent]:
    """Adjacent deltas of the same kind and call joined into one."""
    out: list[ReplyEvent] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, TextDelta) and isinstance(last, TextDelta):
            out[-1] = TextDelta(last.text + e.text)
        elif (
            isinstance(e, ArgumentsDelta)
            and isinstance(last, ArgumentsDelta)
            and last.index == e.index
        ):
            out[-1] = ArgumentsDelta(e.index, last.text + e.text)
        else:
            out.append(e)
    return out
