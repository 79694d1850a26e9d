"""Rendering a conversation as the model was trained to see it.

A GGUF's own Jinja chat template is rendered in jinja2's sandbox by llama-cpp-python's
``Jinja2ChatFormatter`` (the environment Transformers uses: ``tojson``, ``raise_exception``,
``strftime_now``). Templates differ in what they can show: SmolLM2's is plain ChatML, which
renders ``role`` and ``content`` only and fails on a null content. Each template is probed once
for whether it shows a system turn and a tool turn, and turns it cannot show are rewritten into
turns it can:

- an assistant turn that called tools shows the calls as its content, in the JSON reply format
  the model is asked to write (:mod:`lmxd.chat.tools`): ``{"tool_calls": [...]}``;
- a tool result is a ``tool`` turn if the template shows one, else a user turn
  ``{"tool_response": {"tool": name, "content": ...}}``;
- a system turn the template drops goes at the head of the next user turn.

A model without a template (a base model such as Gemma 3 270M) gets a plain transcript::

    <system content>

    User: <content>

    Assistant: <content>

    Tool result (<name>): <content>

    Assistant:

whose generation stops at ``"\\nUser:"``. That text carries no BOS, so it is tokenized with the
model's BOS added (:attr:`Rendered.add_bos`); a Jinja template writes its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from lmxd.chat.messages import ChatMessage
from lmxd.errors import InvalidInput

_PROBE = "lmxd-probe-5f3a"
PLAIN_STOP = "\nUser:"


@dataclass(frozen=True)
class Rendered:
    """A conversation as text, ending where the assistant's reply starts."""

    text: str
    add_bos: bool  # tokenize with the model's BOS: the text does not carry one
    stops: tuple[str, ...]  # stop strings the format itself needs


class ChatTemplate:
    """One model's way of writing a conversation down. Pure Python: any thread may render."""

    def __init__(self, model: str, source: str | None, bos: str, eos: str) -> None:
        self.model = model  # the name errors use
        self.source = source
        self._jinja: Jinja2ChatFormatter | None = None
        self._broken: str | None = None  # why the GGUF's template cannot be used
        self.shows_system = self.shows_tool = True
        if source is not None:
            try:
                self._jinja = Jinja2ChatFormatter(source, eos_token=eos, bos_token=bos)
            except jinja2.TemplateError as exc:
                self._broken = f"the chat template of {model!r} does not parse: {exc}"
                return
            self.shows_system = self._shows(
                [{"role": "system", "content": _PROBE}, {"role": "user", "content": "u"}]
            )
            self.shows_tool = self._shows(
                [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                    {"role": "tool", "content": _PROBE},
                ]
            )

    def render(self, messages: Sequence[ChatMessage]) -> Rendered:
        if not messages:
            raise InvalidInput("a chat needs at least one message")
        if self._broken is not None:
            raise InvalidInput(self._broken, model=self.model)
        if self._jinja is None:
            return Rendered(_plain(messages), add_bos=True, stops=(PLAIN_STOP,))
        turns = self._adapt(messages)
        try:
            text = self._render(turns)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            # raise_exception() in a template raises ValueError ("roles must alternate").
            raise InvalidInput(
                f"the chat template of {self.model!r} refused this conversation: {exc}",
                model=self.model,
            ) from exc
        return Rendered(text, add_bos=False, stops=())

    def _render(self, turns: list[dict[str, Any]]) -> str:
        assert self._jinja is not None
        formatter: Any = self._jinja  # its stubs want llama-cpp-python's TypedDict messages
        return str(formatter(messages=turns).prompt)

    def _shows(self, turns: list[dict[str, Any]]) -> bool:
        assert self._jinja is not None
        try:
            return _PROBE in self._render(turns)
        except Exception:  # a template that refuses the probe does not show that turn
            return False

    def _adapt(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        names = {c.id: c.name for m in messages for c in m.tool_calls}
        turns: list[dict[str, Any]] = []
        held: list[str] = []  # system text waiting for the next user turn
        for m in messages:
            content = m.content or ""
            if m.role == "system" and not self.shows_system:
                held.append(content)
                continue
            if m.role == "assistant" and m.tool_calls:
                turns.append({"role": "assistant", "content": calls_as_content(m)})
                continue
            if m.role == "tool":
                name = m.name or names.get(m.tool_call_id or "", "")
                if self.shows_tool:
                    turns.append({"role": "tool", "content": content})
                else:
                    response = {"tool_response": {"tool": name, "content": content}}
                    turns.append({"role": "user", "content": json.dumps(response)})
                continue
            if m.role == "user" and held:
                content = "\n\n".join([*held, content])
                held = []
            turns.append({"role": m.role, "content": content})
        if held:
            turns.append({"role": "user", "content": "\n\n".join(held)})
        return turns


def calls_as_content(message: ChatMessage) -> str:
    """An assistant's tool calls written as the JSON reply the model was asked for."""
    calls = [{"name": c.name, "arguments": _json_or_text(c.arguments)} for c in message.tool_calls]
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _plain(messages: Sequence[ChatMessage]) -> str:
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    parts = []
    for m in messages:
        content = m.content or ""
        if m.role in ("system", "developer"):
            parts.append(f"{content}\n\n")
        elif m.role == "assistant":
            text = calls_as_content(m) if m.tool_calls else content
            parts.append(f"Assistant:{'' if text[:1].isspace() else ' '}{text}\n\n")
        elif m.role == "tool":
            name = m.name or names.get(m.tool_call_id or "") or "tool"
            parts.append(f"Tool result ({name}): {content}\n\n")
        else:
            parts.append(f"User: {content}\n\n")
    return "".join(parts) + "Assistant:"
