"""The HTTP front end to end: a real daemon, real HTTP, the official `openai` client, real models.

One daemon serves most tests (each uses conversations of its own); tests that need other
settings (an API key, a queue of one, a short stream timeout) start their own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from daemon_harness import Daemon
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
JSON = {"Content-Type": "application/json"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}


def ask(text: str) -> list[dict[str, Any]]:
    return [SYSTEM, {"role": "user", "content": text}]


_serial = itertools.count()


def fresh() -> dict[str, Any]:
    """Request options that give the request an agent of its own, with nothing in KV. Greedy
    replies compare exactly only between requests computed alike: llama.cpp's kernels round
    differently for batches of different sizes (and, before each sequence had a KV stream of
    its own, for KV pools of different sizes), which can flip a near-tied token. So these run
    on :func:`exact_daemon`, one request at a time, each on a fresh agent."""
    return {"extra_headers": {"X-Lmxd-Agent": f"fresh-{next(_serial)}"}}


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon("--keep-alive", "300", http=True)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def url(daemon: Daemon) -> str:
    return daemon.http_url


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def exact_daemon() -> Iterator[Daemon]:
    """A daemon whose contexts hold one sequence, so that they never change shape: the tests
    that compare greedy replies of different requests run here (see :func:`fresh`)."""
    d = Daemon("--keep-alive", "300", "--max-seqs", "1", "--auto-agents", "64", http=True)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def exact(exact_daemon: Daemon) -> OpenAI:
    url = exact_daemon.http_url
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_and_streamed_chat_give_the_same_reply_and_usage(exact: OpenAI) -> None:
    messages = ask("Name three colours.")
    plain = exact.chat.completions.create(
        **fresh(), model="smollm2-135m", messages=messages, max_tokens=24
    )
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 24
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(
        exact.chat.completions.create(
            **fresh(),
            model="smollm2-135m",
            messages=messages,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same conversation, the same reply
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *body, finish, usage = chunks
    assert finish.choices[0].finish_reason == choice.finish_reason
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in [*body, finish])


def test_stop_strings_cut_the_reply(exact: OpenAI) -> None:
    messages = ask("Describe the sea in two sentences.")
    full = exact.chat.completions.create(
        **fresh(), model="smollm2-135m", messages=messages, max_tokens=40
    )
    text = full.choices[0].message.content or ""
    assert len(text) > 30
    stop = text[len(text) // 2 : len(text) // 2 + 4]  # spans tokens, most likely
    cut = exact.chat.completions.create(
        **fresh(), model="smollm2-135m", messages=messages, max_tokens=40, stop=["@@never@@", stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = exact.chat.completions.create(
        **fresh(), model="smollm2-135m", messages=messages, max_tokens=40, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_greedy_output_over_http_is_the_socket_s(exact_daemon: Daemon, exact: OpenAI) -> None:
    w = exact_daemon.wire()
    question = "Write one sentence about the moon."
    for agent in ("twin-socket", "twin-http"):
        w.ok(
            "REGISTER",
            agent=agent,
            model="smollm2-135m",
            n_ctx=1024,
            system_prompt=SYSTEM["content"],
        )
    over_socket = w.ok(
        "DECODE",
        agent="twin-socket",
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
    )
    w.close()
    over_http = exact.chat.completions.create(
        model="twin-http", messages=[{"role": "user", "content": question}], max_tokens=32
    )
    assert over_http.choices[0].message.content == over_socket["text"]
    assert over_http.usage is not None
    assert over_http.usage.completion_tokens == over_socket["generated_tokens"]


def test_a_seed_gives_the_same_sampled_text_twice(exact: OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = exact.chat.completions.create(
            **fresh(),
            model="smollm2-135m",
            messages=ask("Tell me a short story about a cat."),
            max_tokens=24,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
        )
        return reply.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_a_json_schema_reply_validates(client: OpenAI) -> None:
    # Every string is bounded, so the grammar itself guarantees the reply ends in time.
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "maxItems": 3,
            },
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    for model, messages in (
        ("smollm2-135m", ask("Describe a person as JSON.")),
        ("gemma3-270m", [{"role": "user", "content": "A person, as JSON:"}]),
    ):
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=150, response_format=fmt
        )
        assert reply.choices[0].finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    loose = client.chat.completions.create(
        model="smollm2-135m",
        messages=ask("Give me a JSON object with your name."),
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    content = loose.choices[0].message.content or ""
    assert content.lstrip().startswith("{")
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def _validate_call(name: str, arguments: str) -> None:
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])  # type: ignore[index]


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_tool_calls_validate_streamed_and_not(exact: OpenAI, choice: Any) -> None:
    messages = ask("What is the weather in Paris, in celsius?")
    reply = exact.chat.completions.create(
        **fresh(),
        model="smollm2-135m",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        max_tokens=80,
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        _validate_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert {c.function.name for c in message.tool_calls} == {"get_time"}

    raw = list(
        exact.chat.completions.create(
            **fresh(),
            model="smollm2-135m",
            messages=messages,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=80,
            stream=True,
        )
    )
    deltas = [d for c in raw for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.index is not None for d in deltas)
    firsts = {}
    for d in deltas:
        if d.index not in firsts:  # a call's first fragment names it, as the SDK requires
            assert d.id and d.type == "function" and d.function and d.function.name
            firsts[d.index] = d
    assert raw[-1].choices[0].finish_reason == "tool_calls"

    with exact.chat.completions.stream(
        **fresh(),
        model="smollm2-135m",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        max_tokens=80,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls
    ]  # streamed and not: the same calls, the same arguments
    for call in calls:
        _validate_call(call.function.name, call.function.arguments)


def test_a_tool_result_continues_the_conversation(client: OpenAI) -> None:
    messages: list[Any] = ask("What is the weather in Rome, in celsius?")
    first = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model="smollm2-135m", messages=messages, tools=[WEATHER], max_tokens=60
    )
    message = second.choices[0].message
    assert message.content or message.tool_calls
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result
    details = second.usage.prompt_tokens_details
    assert details is not None and (details.cached_tokens or 0) >= first.usage.prompt_tokens - 1
    plain = client.chat.completions.create(
        model="smollm2-135m", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=30
    )
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_responses_plain_streamed_and_with_tools(exact: OpenAI) -> None:
    plain = exact.responses.create(
        **fresh(),
        model="smollm2-135m",
        instructions=SYSTEM["content"],
        input="Say hello to Ada.",
        max_output_tokens=24,
    )
    assert plain.object == "response" and plain.status in ("completed", "incomplete")
    assert plain.output_text and plain.usage is not None and plain.usage.output_tokens > 0

    events = list(
        exact.responses.create(
            **fresh(),
            model="smollm2-135m",
            instructions=SYSTEM["content"],
            input="Say hello to Ada.",
            max_output_tokens=24,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    # OpenAI's last event: response.completed, or response.incomplete at the token limit.
    assert kinds[-1] == f"response.{plain.status}" and "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == plain.output_text
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text

    tool = {"type": "function", **WEATHER["function"]}  # type: ignore[dict-item]
    called = exact.responses.create(
        **fresh(),
        model="smollm2-135m",
        input="What is the weather in Oslo, in celsius?",
        tools=[tool],
        tool_choice="required",
        max_output_tokens=80,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls
    for item in calls:
        _validate_call(item.name, item.arguments)
    followed = exact.responses.create(
        **fresh(),
        model="smollm2-135m",
        tools=[tool],
        tool_choice="none",
        max_output_tokens=30,
        input=[
            {"role": "user", "content": "What is the weather in Oslo, in celsius?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": calls[0].name,
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "-3, snow"},
        ],
    )
    assert followed.output_text


def test_models_lists_models_and_agents(daemon: Daemon, client: OpenAI) -> None:
    w = daemon.wire()
    w.ok("REGISTER", agent="listed", model="gemma3-270m", n_ctx=512)
    w.close()
    ids = {m.id for m in client.models.list()}
    assert {"smollm2-135m", "gemma3-270m", "listed"} <= ids
    assert client.models.retrieve("listed").id == "listed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_the_second_turn_of_a_long_conversation_prefills_only_the_new_message(
    client: OpenAI,
) -> None:
    background = " ".join(
        f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(160)
    )
    messages: list[Any] = [
        {"role": "system", "content": f"You answer from these notes.\n{background}"},
        {"role": "user", "content": "Is 7 even or odd?"},
    ]
    first = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16)
    assert first.usage is not None and first.usage.prompt_tokens >= 2000
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And 12?"},
    ]
    second = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    # Everything up to the first reply was in KV: only the new user turn (and the end of the
    # assistant's) is prefilled.
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens - cached <= 16


def test_sixteen_concurrent_streams_across_both_models(url: str) -> None:
    async def one(client: AsyncOpenAI, i: int) -> str:
        model = "smollm2-135m" if i % 2 else "gemma3-270m"
        messages = (
            ask(f"Say the number {i} in words.")
            if i % 2
            else [{"role": "user", "content": f"Number {i} in words is"}]
        )
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return "".join(pieces)

    async def main() -> list[str]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    replies = asyncio.run(main())
    assert len(replies) == 16 and all(replies)


def test_a_client_that_leaves_mid_stream_leaves_its_agent_able_to_decode(
    daemon: Daemon, client: OpenAI
) -> None:
    headers = {"X-Lmxd-Agent": "leaver"}
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=ask("Write a long essay about rivers."),
        max_tokens=500,
        stream=True,
        extra_headers=headers,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    w = daemon.wire()
    deadline = time.monotonic() + 10
    state = "decoding"
    while time.monotonic() < deadline:
        state = next(a["state"] for a in w.ok("LIST")["agents"] if a["agent"] == "leaver")
        if state != "decoding":
            break
        time.sleep(0.05)
    w.close()
    assert state in ("resident", "parked"), state
    again = client.chat.completions.create(
        model="smollm2-135m", messages=ask("Say yes."), max_tokens=4, extra_headers=headers
    )
    assert again.choices[0].message.content


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_metrics_parse_and_move_as_requests_run(url: str, client: OpenAI) -> None:
    before = _metrics(url)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "lmxd_ledger_cap_bytes",
        "lmxd_device_total_bytes",
    ):
        assert name in before, name
    reply = client.chat.completions.create(model="smollm2-135m", messages=ask("Hi!"), max_tokens=8)
    after = _metrics(url)
    assert reply.usage is not None
    generated = after["lmxd_generation_tokens_total"] - before.get(
        "lmxd_generation_tokens_total", 0
    )
    assert generated == reply.usage.completion_tokens
    # none yet when this test runs first: the /metrics request above is counted once answered
    assert after["lmxd_http_requests_total"] > before.get("lmxd_http_requests_total", 0)
    assert after["lmxd_ledger_reserved_bytes"] > 0


BAD_BODIES: list[tuple[str, Any, int, str | None]] = [
    ("malformed JSON", b'{"model": "smollm2-135m", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("wrong type", {"model": "smollm2-135m", "messages": "hi"}, 400, "messages"),
    (
        "wrong type of a field",
        {"model": "smollm2-135m", "messages": [], "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "unknown model",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    ("empty messages", {"model": "smollm2-135m", "messages": []}, 400, "messages"),
    ("a missing field", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    (
        "a missing nested field",
        {"model": "smollm2-135m", "messages": [{"content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "a model name no file can have",
        {"model": "m" * 5000, "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),
    (
        "a bound that would nest a grammar too deep",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 30000}},
            },
        },
        400,
        None,
    ),
    (
        "a $schema that is no JSON Schema's",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$schema": 5}},
            },
        },
        400,
        None,
    ),
    (
        "unknown role",
        {"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "n=3",
        {"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "n": 3},
        400,
        "n",
    ),
    (
        "max_tokens 0",
        {"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens past the context",
        {
            "model": "smollm2-135m",
            "max_tokens": 100_000,
            "messages": [{"role": "user", "content": "x"}],
        },
        400,
        "max_tokens",
    ),
    (
        "a prompt past the context",
        {"model": "smollm2-135m", "messages": [{"role": "user", "content": "word " * 6000}]},
        400,
        None,
    ),
    (
        "a schema that cannot be a grammar",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                },
            },
        },
        400,
        None,
    ),
    (
        "a tool whose parameters are not JSON Schema",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}],
        },
        400,
        "tools",
    ),
    (
        "a tool_choice naming no tool",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        400,
        "tool_choice",
    ),
    (
        "an image part",
        {
            "model": "smollm2-135m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
        },
        400,
        "messages[0].content",
    ),
]


@pytest.mark.parametrize(
    ("what", "body", "status", "param"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_bad_input_gets_an_openai_shaped_4xx(
    url: str, what: str, body: Any, status: int, param: str | None
) -> None:
    for stream in (False, True):
        if isinstance(body, dict):
            response = httpx.post(
                f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=120
            )
        else:
            response = httpx.post(
                f"{url}/v1/chat/completions", content=body, headers=JSON, timeout=120
            )
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"} and error["message"]
        if param is not None:
            assert error["param"] == param, error
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # and everyone else goes on


def test_oversized_bodies_and_unknown_routes(url: str, client: OpenAI) -> None:
    big = (
        b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "'
        + b"x" * (9 << 20)
        + b'"}]}'
    )
    response = httpx.post(f"{url}/v1/chat/completions", content=big, headers=JSON, timeout=120)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    body = b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}]}'
    plain_text = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=120)
    assert plain_text.status_code == 415  # what a web page can send without asking first
    for header in ({"Origin": "https://evil.example"}, {"Host": "evil.example"}):
        foreign = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={**JSON, **header}, timeout=120
        )
        assert foreign.status_code == 403, header
        assert foreign.json()["error"]["code"] == "forbidden_origin"
    local = {"Origin": "http://localhost:3000"}
    assert httpx.get(f"{url}/v1/models", headers=local).status_code == 200
    missing = httpx.get(f"{url}/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m", messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask("x"), max_tokens=4)
    reply = client.completions.create(
        model="gemma3-270m", prompt="Paris is the capital of", max_tokens=4, logprobs=2
    )
    assert reply.choices[0].text and reply.choices[0].logprobs is not None
    assert len(reply.choices[0].logprobs.tokens or []) == reply.usage.completion_tokens  # type: ignore[union-attr]


def test_an_api_key_is_required_when_set() -> None:
    d = Daemon("--api-key", "s3cret", http=True)
    try:
        url = d.http_url
        good = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert {m.id for m in good.models.list()} >= {"smollm2-135m"}
        for key in ("wrong", "s3cre", "s3crett"):
            bad = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/no-such-route").status_code == 401  # routes stay unknown
        assert httpx.get(f"{url}/health").status_code == 200  # health checks need no key
    finally:
        assert d.stop() == 0, d.log()


def test_listening_beyond_loopback_without_a_key_is_refused_at_start_up() -> None:
    probe = socket.socket()
    probe.bind(("0.0.0.0", 0))
    port = probe.getsockname()[1]
    probe.close()

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lmxd.cli", "serve", "--socket", "/tmp/lmxd-never.sock"]
        env = {k: v for k, v in os.environ.items() if k != "LMXD_API_KEY"}
        return subprocess.run(
            [*command, "--http", f"0.0.0.0:{port}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    done = serve()
    assert done.returncode == 2
    assert "without an API key" in done.stderr
    empty = serve("--api-key", "")
    assert empty.returncode == 2 and "is empty" in empty.stderr


def test_a_full_queue_is_a_rate_limit_error_with_retry_after() -> None:
    # The bound is per agent; with one auto-agent both requests queue on it.
    d = Daemon("--max-queue", "1", "--auto-agents", "1", http=True)
    try:
        url = d.http_url
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        long = client.chat.completions.create(
            model="smollm2-135m", messages=ask("Write a long poem."), max_tokens=400, stream=True
        )
        next(iter(long))  # the one job of the queue is running
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model="smollm2-135m", messages=ask("Hi"), max_tokens=2)
        assert raised.value.response.headers["retry-after"] == "1"
        assert raised.value.code == "rate_limit_exceeded"
        long.close()
    finally:
        assert d.stop() == 0, d.log()
