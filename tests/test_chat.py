"""Conversations without a daemon: templates, the plain fallback, tool prompts and grammars,
and the incremental reader of tool-call replies."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmxd.chat import ChatMessage, ChatTemplate, Tool, ToolCall, ToolUse, grammar_for
from lmxd.chat.template import PLAIN_STOP
from lmxd.chat.tools import ArgumentsDelta, CallStarted, ReplyReader, TextDelta, with_tool_prompt
from lmxd.errors import InvalidInput
from lmxd.modelfile import read_model_info

# A template that shows only user and assistant turns, as some models' do.
TERSE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<u>{{ m['content'] }}</u>"
    "{% elif m['role'] == 'assistant' %}<a>{{ m['content'] }}</a>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def test_smollm2_s_own_template_renders_every_turn(smollm2: Path) -> None:
    info = read_model_info(smollm2)
    template = ChatTemplate("smollm2-135m", info.chat_template, "<|im_start|>", "<|im_end|>")
    assert template.shows_system and template.shows_tool
    rendered = template.render(
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", None, (CALL,)),
            ChatMessage("tool", "21 C", tool_call_id="call_1"),
        ]
    )
    assert rendered.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}]}<|im_end|>\n<|im_start|>tool\n21 C<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert not rendered.add_bos and rendered.stops == ()


def test_turns_a_template_cannot_show_are_rewritten_into_turns_it_can() -> None:
    template = ChatTemplate("terse", TERSE, "", "")
    assert not template.shows_system and not template.shows_tool
    rendered = template.render(
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", None, (CALL,)),
            ChatMessage("tool", "21 C", tool_call_id="call_1"),
        ]
    )
    response = json.dumps({"tool_response": {"tool": "get_weather", "content": "21 C"}})
    assert rendered.text == (
        "<u>Be brief.\n\nWeather in Paris?</u>"
        '<a>{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}</a>'
        f"<u>{response}</u><a>"
    )


def test_a_model_without_a_template_gets_the_plain_transcript() -> None:
    template = ChatTemplate("gemma3-270m", None, "<bos>", "<eos>")
    rendered = template.render(
        [
            ChatMessage("system", "Notes."),
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", " Hello."),
            ChatMessage("user", "Bye"),
        ]
    )
    assert rendered.text == "Notes.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    assert rendered.add_bos and rendered.stops == (PLAIN_STOP,)


def test_template_errors_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="at least one message"):
        ChatTemplate("m", TERSE, "", "").render([])
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidInput, match="roles must alternate"):
        ChatTemplate("m", strict, "", "").render([ChatMessage("user", "x")])
    with pytest.raises(InvalidInput, match="does not parse"):
        ChatTemplate("m", "{% for %}", "", "").render([ChatMessage("user", "x")])


TIME = Tool("get_time", None, {"type": "object", "properties": {"tz": {"type": "string"}}})


def test_the_tool_prompt_goes_into_the_system_message_and_stays_the_same() -> None:
    tools = (WEATHER, TIME)
    uses = [
        ToolUse.chosen(tools, choice, True) for choice in ("auto", "none", "required", "get_time")
    ]
    assert len({use.system_prompt() for use in uses}) == 1  # turns keep one prefix in KV
    auto = uses[0]
    merged = with_tool_prompt([ChatMessage("system", "Be brief."), ChatMessage("user", "x")], auto)
    assert merged[0].content is not None and merged[0].content.startswith("Be brief.\n\n")
    assert '"get_weather"' in merged[0].content and len(merged) == 2
    added = with_tool_prompt([ChatMessage("user", "x")], auto)
    assert added[0].role == "system" and len(added) == 2


def test_reply_schemas_follow_tool_choice() -> None:
    tools = (WEATHER, TIME)
    auto = ToolUse.chosen(tools, "auto", parallel=True).schema()
    assert [set(form["properties"]) for form in auto["anyOf"]] == [{"tool_calls"}, {"response"}]
    assert ToolUse.chosen(tools, "none", True).schema()["properties"]["response"] == {
        "type": "string"
    }
    required = ToolUse.chosen(tools, "required", parallel=False).schema()
    assert set(required["properties"]) == {"tool_calls"}
    assert required["properties"]["tool_calls"]["maxItems"] == 1
    named = ToolUse.chosen(tools, "get_time", True).schema()["properties"]["tool_calls"]
    assert named["items"]["properties"]["name"] == {"const": "get_time"}
    assert "root ::=" in grammar_for(ToolUse.chosen(tools, None, True).schema())
    with pytest.raises(InvalidInput, match="not among the tools"):
        ToolUse.chosen(tools, "nope", True)
    with pytest.raises(InvalidInput, match="not a valid JSON Schema"):
        ToolUse((Tool("f", None, {"type": 12}),))
    with pytest.raises(InvalidInput, match="nested 30000 deep"):
        grammar_for({"type": "string", "maxLength": 30000})  # would overflow llama.cpp's stack


def test_tool_schemas_keep_their_definitions() -> None:
    """Pydantic writes nested models into $defs; inside the reply schema they move to its
    root under the tool's name, and every reference follows."""
    params = {
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "country": {"$ref": "#/$defs/Code"}},
                "required": ["city", "country"],
            },
            "Code": {"type": "string", "enum": ["FR", "DE"]},
        },
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}},
        "required": ["where"],
    }
    schema = ToolUse.chosen((Tool("get_weather", None, params),), "required", True).schema()
    assert set(schema["$defs"]) == {"get_weather.Place", "get_weather.Code"}
    place = schema["$defs"]["get_weather.Place"]["properties"]["country"]
    assert place == {"$ref": "#/$defs/get_weather.Code"}
    grammar = grammar_for(schema)
    assert '"\\"FR\\""' in grammar  # the enum reached through two references
    # JSON strings hold no raw control characters (the converter's own rule allowed them).
    string = grammar_for({"type": "string"})
    assert r'char ::= [^"\\\x7F\x00-\x1F]' in string and r'[^"\\] |' not in string
    with pytest.raises(InvalidInput, match="cannot be turned into a grammar"):
        grammar_for({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})


REPLIES: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    ('{"response": "Hi \\"you\\" \\u00e9\\ud83d\\ude00\\n"}', 'Hi "you" é😀\n', []),
    # Lone surrogates (the grammar lets a model write them) cannot be encoded: U+FFFD.
    ('{"response": "a\\udc00b\\ud83dc\\ud83d"}', "a\ufffdb\ufffdc\ufffd", []),
    ('{ "response" : {"a": [1, 2.5e3, null]} }', '{"a": [1, 2.5e3, null]}', []),
    (
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "n": [1, {}]}},'
        ' {"name":"get_time","arguments":{}}]}',
        None,
        [("get_weather", '{"city": "Pa\\"ris", "n": [1, {}]}'), ("get_time", "{}")],
    ),
]


def _read(pieces: list[str]) -> tuple[ReplyReader, list[Any]]:
    reader, events = ReplyReader(), []
    for piece in pieces:
        events += reader.feed(piece)
    return reader, events


@pytest.mark.parametrize(("text", "content", "calls"), REPLIES)
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_the_reply_reader_gives_the_same_answer_however_the_text_is_cut(
    text: str, content: str | None, calls: list[tuple[str, str]], cuts: list[int]
) -> None:
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    reader, events = _read([text[a:b] for a, b in itertools.pairwise(bounds)])
    assert reader.content == content and reader.calls == calls
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == (content or "")
    starts = [(e.index, e.name) for e in events if isinstance(e, CallStarted)]
    assert starts == [(i, name) for i, (name, _) in enumerate(calls)]
    for i, (_, arguments) in enumerate(calls):
        deltas = "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == i)
        assert deltas == arguments and json.loads(arguments) is not None
    # A call is announced before any of its arguments arrive.
    for i in range(len(calls)):
        kinds = [type(e) for e in events if getattr(e, "index", None) == i]
        assert kinds[0] is CallStarted
