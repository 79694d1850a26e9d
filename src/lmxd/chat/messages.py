"""A conversation's messages, as every front hands them to the daemon."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant asked for: ``arguments`` is the JSON text of its arguments."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One turn. ``content`` is None for an assistant turn that only calls tools; a ``tool``
    turn answers the call ``tool_call_id`` (of the function ``name``)."""

    role: str
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
