"""The Service in this process, over the real engine and models: what no wire can show quickly.

A client that stops reading fills buffers in the kernel and in uvicorn before lmxd's own
stream buffer; these tests read the Service's stream directly, so that the buffer that decides
is the daemon's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from lmxd.bench.forks import SUBJECTS
from lmxd.chat import ChatMessage, Tool, ToolUse
from lmxd.daemon import DaemonConfig, assemble
from lmxd.results import StopReason
from lmxd.scheduler.jobs import STREAM_BUFFER
from lmxd.service import DecodeRequest, Exchange, Service, TextPrompt

T = TypeVar("T")


def run_service(models_dir: Path, test: Callable[[Service], Awaitable[T]], **options: object) -> T:
    config = DaemonConfig(
        socket=Path("/tmp/unused.sock"),
        models_dir=models_dir,
        allowed_dirs=(models_dir,),
        http=None,
        keep_alive_s=0,
        **options,  # type: ignore[arg-type]
    )

    async def main() -> T:
        service = assemble(config, lambda: None)
        loop = asyncio.create_task(service.scheduler.run())
        try:
            return await test(service)
        finally:
            await service.scheduler.shutdown()
            loop.cancel()

    return asyncio.run(main())


def test_an_unread_stream_pauses_its_agent_only_then_is_cancelled(models_dir: Path) -> None:
    async def test(svc: Service) -> None:
        await svc.register("unread", "gemma3-270m", n_ctx=2048)
        await svc.register("other", "smollm2-135m", n_ctx=512)
        counting = TextPrompt("1, 2, 3, 4, 5, 6, 7, 8,")  # a base model goes on counting
        stuck = svc.decode(DecodeRequest("unread", counting, max_tokens=1500, stream=True))
        tokens: list[int] = []
        started = time.monotonic()
        while time.monotonic() - started < 60:
            await asyncio.sleep(0.25)
            tokens.append(next(a.tokens for a in svc.list_agents() if a.agent == "unread"))
            if len(tokens) > 4 and tokens[-1] == tokens[-4]:
                break  # no new token for 0.75 s: paused
        # Another agent is served while the unread one waits.
        other = svc.decode(DecodeRequest("other", TextPrompt("Hello,"), max_tokens=8))
        assert (await asyncio.wait_for(other.result(), 30)).generated_tokens > 0
        result = await asyncio.wait_for(stuck.result(), 30)  # --stream-timeout 1
        assert result.stop_reason is StopReason.CANCELLED
        # It stopped within a slice of steps past the buffer's bound, far short of max_tokens.
        assert STREAM_BUFFER <= result.generated_tokens <= STREAM_BUFFER + 16
        pieces = [piece.text async for piece in stuck.pieces()]
        assert "".join(pieces) == result.text  # nothing the client was owed was dropped
        again = svc.decode(DecodeRequest("unread", TextPrompt(" 9,"), max_tokens=4))
        assert (await asyncio.wait_for(again.result(), 30)).generated_tokens > 0

    run_service(models_dir, test, stream_timeout_s=1.0)


def test_auto_agents_continue_conversations_and_respect_their_limit(models_dir: Path) -> None:
    system = ChatMessage("system", "You are a helpful assistant.")

    async def ask(svc: Service, *messages: ChatMessage) -> tuple[str, str, int]:
        stream = await svc.exchange(
            Exchange(model="smollm2-135m", messages=(system, *messages), max_tokens=8)
        )
        result = await stream.result()
        return stream.agent, result.text, result.cached_tokens

    async def test(svc: Service) -> None:
        q1, q2 = ChatMessage("user", "Name a fruit."), ChatMessage("user", "Name a city.")
        a1, reply1, _ = await ask(svc, q1)
        a2, reply2, _ = await ask(svc, q2)
        assert a1 != a2  # a new conversation gets its own agent while under the limit
        # Each continued conversation goes back to its own agent, with its KV.
        b2, _, cached2 = await ask(svc, q2, ChatMessage("assistant", reply2), q1)
        b1, _, cached1 = await ask(svc, q1, ChatMessage("assistant", reply1), q2)
        assert (b1, b2) == (a1, a2) and cached1 > 20 and cached2 > 20
        # At the limit, a new conversation takes the idle agent sharing most of it.
        a3, _, cached3 = await ask(svc, ChatMessage("user", "Name a colour."))
        assert a3 in (a1, a2) and cached3 > 0
        assert sum(a.auto for a in svc.list_agents()) == 2
        # Idle past their TTL, auto-agents go.
        svc.auto.ttl_s = 0.0
        await svc.expire_auto_agents()
        assert not any(a.auto for a in svc.list_agents())

    run_service(models_dir, test, auto_agents=2)


def test_concurrent_requests_respect_the_auto_agent_limit(models_dir: Path) -> None:
    async def test(svc: Service) -> None:
        await svc.register("socket-agent", "smollm2-135m", n_ctx=512)  # the model is loaded

        async def ask(i: int) -> str:
            question = ChatMessage("user", f"Say {i}.")
            stream = await svc.exchange(
                Exchange(model="smollm2-135m", messages=(question,), max_tokens=4)
            )
            await stream.result()
            return stream.agent

        served = await asyncio.gather(*(ask(i) for i in range(9)))
        made = {a.agent for a in svc.list_agents() if a.auto}
        assert set(served) == made and len(made) == 2  # --auto-agents 2, nine requests

        async def named() -> str:
            stream = await svc.exchange(
                Exchange(model="smollm2-135m", agent="pinned", prompt="Hi", max_tokens=2)
            )
            await stream.result()
            return stream.agent

        # Two first uses of one new name at once: one registers it, both use it.
        assert await asyncio.gather(named(), named()) == ["pinned", "pinned"]

    run_service(models_dir, test, auto_agents=2)


def test_a_registered_agent_keeps_its_system_prompt_beside_tools(models_dir: Path) -> None:
    tool = Tool("get_time", "The time", {"type": "object", "properties": {}})

    async def test(svc: Service) -> None:
        await svc.register("helper", "smollm2-135m", n_ctx=1024, system_prompt="Be terse.")
        ask = (ChatMessage("user", "What time is it?"),)
        stream = await svc.exchange(
            Exchange(model="helper", messages=ask, tools=ToolUse((tool,)), max_tokens=2)
        )
        await stream.result()
        system = svc.scheduler.agents["helper"].history[0]
        assert system.role == "system" and system.content is not None
        assert system.content.startswith("Be terse.\n\n") and '"get_time"' in system.content

    run_service(models_dir, test)


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_an_agents_greedy_text_does_not_depend_on_who_else_is_resident(
    models_dir: Path, model: str
) -> None:
    """Two turns of one agent, decoded alone, then again with five other agents of its model
    resident beside it (each holding some fifty tokens) and their DECODEs interleaved with its
    own: the same text, token for token. In one shared KV pool the neighbours' cells changed
    the order in which attention summed this agent's cells, and the text forked."""
    turns = [" The sea at night is", " In the morning, the fishermen"]

    async def say(svc: Service, agent: str, text: str) -> str:
        stream = svc.decode(DecodeRequest(agent, TextPrompt(text), max_tokens=24))
        return (await stream.result()).text

    async def test(svc: Service) -> tuple[list[str], list[str]]:
        await svc.register("solo", model, n_ctx=512)
        alone = [await say(svc, "solo", turn) for turn in turns]
        await svc.unregister("solo")
        for name in ("me", "n0", "n1", "n2", "n3", "n4"):
            await svc.register(name, model, n_ctx=512)
        for i in range(5):
            await say(svc, f"n{i}", f" Story number {i}: once upon a time, a {i * 7}-legged")
        beside = []
        for turn in turns:
            beside.append(await say(svc, "me", turn))
            for i in range(0, 5, 2):
                await say(svc, f"n{i}", " And then")
        resident = [a for a in svc.list_agents() if a.state == "resident"]
        assert len(resident) == 6  # nobody was parked: they shared the context
        return alone, beside

    alone, beside = run_service(models_dir, test, max_seqs=8)
    assert alone == beside


def test_deterministic_agents_decode_alike_alone_and_together(models_dir: Path) -> None:
    """Eight Gemma 3 agents decoding at once: by default some texts differ from the ones each
    gives alone (their prompts are prefilled in one batch of about 100 tokens, where
    llama.cpp's CPU kernels take another path); under --deterministic, one agent per step,
    none does. The prompts are those of `lmxd bench forks`."""
    prompts = [f" Story {i}: the {s} of the old town was" for i, s in enumerate(SUBJECTS)]

    async def say(svc: Service, agent: str, text: str) -> str:
        stream = svc.decode(DecodeRequest(agent, TextPrompt(text), max_tokens=32))
        return (await stream.result()).text

    async def test(svc: Service) -> int:
        names = [f"d{i}" for i in range(len(prompts))]
        for name in names:
            await svc.register(name, "gemma3-270m", n_ctx=512)
        alone = [await say(svc, n, p) for n, p in zip(names, prompts, strict=True)]
        for name in names:
            await svc.reset(name)
        together = await asyncio.gather(
            *(say(svc, n, p) for n, p in zip(names, prompts, strict=True))
        )
        return sum(a != b for a, b in zip(alone, together, strict=True))

    assert run_service(models_dir, test, max_seqs=8) > 0  # the premise, on this CPU build
    assert run_service(models_dir, test, max_seqs=8, deterministic=True) == 0
