"""Conversations: messages, rendering them with a model's template, and tools for any model.

Pure Python over jinja2 and llama-cpp-python's helpers (its Jinja formatter, its JSON Schema
to grammar converter); nothing here calls llama.cpp, so any thread may use it.
"""

from lmxd.chat.messages import ChatMessage, ToolCall
from lmxd.chat.template import ChatTemplate, Rendered
from lmxd.chat.tools import Tool, ToolUse, grammar_for, with_tool_prompt

__all__ = [
    "ChatMessage",
    "ChatTemplate",
    "Rendered",
    "Tool",
    "ToolCall",
    "ToolUse",
    "grammar_for",
    "with_tool_prompt",
]
