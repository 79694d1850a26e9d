"""The scheduler against a fake engine (tests/fake_worker.py): decisions, in milliseconds.

Admission order, who is parked, fairness between models and between agents, cancel, the
queue bound, keep-alive. The real engine proves the system in test_daemon.py and the others;
these pin down the scheduler's choices, which a real model would make slow and noisy.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fake_worker import REFUSED, FakeWorker

from lmxd.engine.context import KV_PAD
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import Busy, InvalidInput, LedgerDenied, ParkBudgetExceeded
from lmxd.kvdisk import DiskTier
from lmxd.kvstore import KvStore
from lmxd.memory.device import DeviceInfo
from lmxd.memory.estimator import Backend
from lmxd.memory.ledger import Ledger, Request
from lmxd.memory.reconcile import Reconciler
from lmxd.modelfile import ModelInfo, read_model_info
from lmxd.results import DecodeResult, StopReason
from lmxd.scheduler import (
    Activity,
    Agent,
    DecodeRequest,
    Memory,
    Scheduler,
    SchedulerConfig,
    TextPrompt,
)
from lmxd.scheduler.devices import Device
from lmxd.scheduler.residency import Residency, ResidencyConfig
from lmxd.scheduler.slots import KEEPALIVE_HOLDER, ModelSlot

T = TypeVar("T")
GiB, MiB = 1 << 30, 1 << 20
SMOL, GEMMA = "SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"  # the model files' stems


def run(
    models_dir: Path,
    test: Callable[[Scheduler, FakeWorker], Awaitable[T]],
    *,
    cap: int = 64 * GiB,
    caps: list[int] | None = None,  # one device per cap, instead of one of ``cap``
    max_seqs: int = 2,
    park_budget: int = GiB,
    keep_alive_s: float = 300.0,
    max_queue: int = 64,
    park_after_decode: bool = False,
    unaccounted: int | None = None,  # a device that holds this much beyond the ledger
    disk: Path | None = None,  # state files for spills (lmxd.kvdisk)
    backend: Backend = Backend.CPU,  # CUDA: layers may be placed partially on a device
    host_cap: int | None = None,  # the host-RAM ledger's cap (CUDA)
    partial: bool = True,
    allow: Path | None = None,  # a second directory models may be loaded from
) -> T:
    async def main() -> T:
        worker = FakeWorker()
        devices = [
            Device(i, DeviceInfo("cuda", f"fake {i}", i, c, c, 0), Ledger(c))
            for i, c in enumerate(caps or [cap])
        ]
        if unaccounted is not None:
            ledger, extra = devices[0].ledger, unaccounted
            meter = lambda: ledger.reserved - ledger.unaccounted + extra  # noqa: E731
            devices[0].reconciler = Reconciler(ledger, meter)
        room = Residency(
            worker,
            devices,
            KvStore(park_budget),
            ResidencyConfig(backend, max_seqs=max_seqs, partial=partial),
            DiskTier(disk) if disk is not None else None,
            Ledger(host_cap, host=True) if backend is Backend.CUDA and host_cap else None,
        )
        config = SchedulerConfig(
            models_dir,
            (models_dir,) if allow is None else (models_dir, allow),
            max_queue=max_queue,
            keep_alive_s=keep_alive_s,
            park_after_decode=park_after_decode,
        )
        scheduler = Scheduler(worker, room, config)
        loop = asyncio.create_task(scheduler.run())
        try:
            return await asyncio.wait_for(test(scheduler, worker), 20)
        finally:
            loop.cancel()

    return asyncio.run(main())


async def register(s: Scheduler, agent: str, model: str = "smollm2-135m", n_ctx: int = 512) -> None:
    await s.register(agent, model, n_ctx, SamplingParams(), None, 0)


async def decode(s: Scheduler, agent: str, max_tokens: int = 8) -> DecodeResult:
    return await s.submit(DecodeRequest(agent, TextPrompt(" hi"), max_tokens)).done


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for a state of the scheduler that a test needs before it goes on: a fixed sleep
    is too short on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.001)


def ran(w: FakeWorker, model: str, since: int) -> bool:
    """Whether a slice of ``model`` ended after the log's first ``since`` entries: every job
    it stepped has a token."""
    return ("ran", model) in w.log[since:]


def test_agents_of_one_model_share_steps(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> list[tuple[str, ...]]:
        for name in ("a", "b"):
            await register(s, name)
        results = await asyncio.gather(decode(s, "a"), decode(s, "b"))
        assert all(r.stop_reason is StopReason.LENGTH and r.text == "x" * 8 for r in results)
        return [entry for entry in w.log if entry[0] == "run"]

    runs = run(models_dir, test)
    assert runs[0][2:] == ("0", "1")  # both sequences in the first slice's batch


def test_the_least_recently_used_idle_agent_is_parked_never_a_decoding_one(
    models_dir: Path,
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
        await decode(s, "a")
        await decode(s, "b")  # both resident now; a used longer ago
        busy = s.submit(DecodeRequest("b", TextPrompt(" more"), 200))
        await until(lambda: s.agents["b"].state == "decoding")
        result = await decode(s, "c")
        assert result.parked == ["a"]
        assert s.agents["a"].state == "parked"
        assert s.agents["b"].state == "decoding"
        await busy.done
        result = await decode(s, "a")  # restored, into the sequence of the idle one
        assert result.restored and result.parked == ["c"]

    run(models_dir, test, max_seqs=2)


def test_a_waiting_agent_is_seated_before_busy_agents_take_their_next_turn(
    models_dir: Path,
) -> None:
    """Two sequences, three agents whose clients send their next request the moment a reply
    ends: the third agent gets a sequence at the first reply's end, not when the others stop."""

    async def busy_client(s: Scheduler, agent: str, turns: int, done: list[str]) -> None:
        for _ in range(turns):
            await decode(s, agent, max_tokens=20)
            done.append(agent)

    async def test(s: Scheduler, w: FakeWorker) -> list[str]:
        for name in ("a", "b", "c"):
            await register(s, name)
        done: list[str] = []
        clients = [asyncio.create_task(busy_client(s, n, 5, done)) for n in ("a", "b")]
        await until(lambda: all(s.agents[n].state == "decoding" for n in ("a", "b")))
        await decode(s, "c", max_tokens=20)
        done.append("c")
        await asyncio.gather(*clients)
        return done

    done = run(models_dir, test, max_seqs=2)
    assert done.index("c") <= 4, done  # seated after the first replies, not after ten


def test_a_busy_model_does_not_starve_another_that_waits_for_memory(models_dir: Path) -> None:
    """The cap holds both models' weights but one context at a time. The first model's agents
    always have work; the second model's job is served once the first model's running jobs
    end, not when its clients stop."""
    smol = read_model_info(models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma = read_model_info(models_dir / "gemma-3-270m-q4_k_m.gguf")

    async def busy_client(s: Scheduler, agent: str, stop: asyncio.Event, turns: list[str]) -> None:
        while not stop.is_set():
            await decode(s, agent, max_tokens=10)
            turns.append(agent)

    async def test(s: Scheduler, w: FakeWorker) -> int:
        for name in ("a", "b"):
            await register(s, name, n_ctx=256)
        await register(s, "g", "gemma3-270m", n_ctx=256)
        stop, turns = asyncio.Event(), []
        clients = [asyncio.create_task(busy_client(s, n, stop, turns)) for n in ("a", "b")]
        await asyncio.sleep(0.01)
        result = await decode(s, "g", max_tokens=4)
        served_after = len(turns)
        stop.set()
        await asyncio.gather(*clients)
        assert result.stop_reason is StopReason.LENGTH
        return served_after

    room = _room_for_one_context((smol, 2), (gemma, 1))
    served_after = run(models_dir, test, cap=room, max_seqs=2)
    assert served_after <= 4  # the turns a and b had in flight, then g's


def test_models_take_turns_a_slice_at_a_time(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> list[str]:
        await register(s, "a")
        await register(s, "g", "gemma3-270m")
        await asyncio.gather(decode(s, "a", 100), decode(s, "g", 100))
        return [entry[1] for entry in w.log if entry[0] == "run"]

    order = run(models_dir, test)
    assert len(order) >= 12  # 100 tokens in slices of 16 steps, for each model
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches >= len(order) - 3  # alternating, save the slices after one ended


def test_cancel_a_queued_and_a_running_job(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        mark = len(w.log)
        running = s.submit(DecodeRequest("a", TextPrompt(" go"), 10_000))
        queued = s.submit(DecodeRequest("a", TextPrompt(" next"), 10))
        await until(lambda: ran(w, SMOL, mark))
        s.cancel(queued)
        s.cancel(running)
        first, second = await running.done, await queued.done
        assert first.stop_reason is StopReason.CANCELLED and 0 < first.generated_tokens < 10_000
        assert second.stop_reason is StopReason.CANCELLED and second.generated_tokens == 0
        assert s.agents["a"].state == "resident"
        assert (await decode(s, "a")).stop_reason is StopReason.LENGTH  # and it goes on

    run(models_dir, test)


def test_the_queue_is_bounded_per_agent_with_a_named_error(models_dir: Path) -> None:
    """One client flooding its agent is refused at once; 96 agents with one turn each all
    get in (a bound of 3 in all would have refused 93 of them)."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        jobs = [s.submit(DecodeRequest("a", TextPrompt(" x"), 5)) for _ in range(3)]
        with pytest.raises(Busy) as refused:
            s.submit(DecodeRequest("a", TextPrompt(" x"), 5))
        assert refused.value.details == {"agent": "a", "max_queue": 3}
        others = [f"o{i}" for i in range(96)]
        for name in others:
            await register(s, name)
        turns = [s.submit(DecodeRequest(name, TextPrompt(" y"), 2)) for name in others]
        await asyncio.gather(*(j.done for j in jobs + turns))
        await decode(s, "a")  # room again once they are done

    run(models_dir, test, max_queue=3, max_seqs=16)


def test_a_model_unloads_after_its_keep_alive_and_a_register_meanwhile_keeps_it(
    models_dir: Path,
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> list[tuple[str, ...]]:
        await register(s, "a")
        await decode(s, "a")
        await s.unregister("a", 0)
        await asyncio.sleep(0.02)
        await register(s, "b")  # within the keep-alive: the same weights, no reload
        await s.unregister("b", 0)
        await asyncio.sleep(0.1)
        return [e for e in w.log if e[0] in ("load", "unload")]

    events = run(models_dir, test, keep_alive_s=0.05)
    assert events == [
        ("load", "SmolLM2-135M-Instruct.Q4_1"),
        ("unload", "SmolLM2-135M-Instruct.Q4_1"),
    ]


def test_parking_an_agent_with_nothing_in_kv_does_not_call_it_parked(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
        refused = s.submit(DecodeRequest("a", TextPrompt(" y"), 4, grammar=REFUSED))
        with pytest.raises(InvalidInput):  # after it was seated: its sequence stays, empty
            await refused.done
        agent = s.agents["a"]
        assert agent.state == "resident" and agent.kv_tokens == 0  # a sequence, empty
        await decode(s, "b")
        await decode(s, "c")  # takes a's sequence
        assert agent.state == "empty" and agent.parked is None
        assert not [e for e in w.log if e[0] == "save" and e[3] == "0"]  # nothing was copied

    run(models_dir, test)


def _sizing() -> Residency:
    """A residency only to size requests with."""
    return Residency(FakeWorker(), [], KvStore(GiB), ResidencyConfig(Backend.CPU))


def _room_for_one_context(*models: tuple[ModelInfo, int]) -> int:
    """The models' weights and the larger of their contexts (``n_seq`` streams of 256 cells,
    what agents of n_ctx 256 get), as the residency sizes them, but not both contexts."""
    room = _sizing()
    weights = sum(room.weights_request(i.path.stem, i).bytes for i, _ in models)
    contexts = [room.context_request("m", i, 256, n_seq).bytes for i, n_seq in models]
    return weights + max(contexts) + min(contexts) // 2


def test_restore_step_and_park_of_one_agent_each_wait_for_another_models_slice(
    models_dir: Path,
) -> None:
    """A decoding agent of one model waits for at most one state copy of another model's
    agent at a time: its slices come between that agent's restore, its step and its park."""

    async def test(s: Scheduler, w: FakeWorker) -> list[tuple[str, ...]]:
        await register(s, "streamer")
        await register(s, "big", "gemma3-270m")
        await decode(s, "big")  # then parked (forced)
        mark = len(w.log)
        streaming = s.submit(DecodeRequest("streamer", TextPrompt(" go"), 2000))
        await until(lambda: ran(w, SMOL, mark))
        start = len(w.log)
        result = await decode(s, "big", max_tokens=1)
        assert result.restored and s.agents["big"].state == "parked"
        s.cancel(streaming)
        await streaming.done
        return w.log[start:]

    log = run(models_dir, test, park_after_decode=True)
    copies_and_runs = ("restore", "run", "save")
    big = [
        i for i, e in enumerate(log) if e[1] == "gemma-3-270m-q4_k_m" and e[0] in copies_and_runs
    ]
    assert [log[i][0] for i in big] == ["restore", "run", "save"], log
    for a, b in itertools.pairwise(big):
        assert any(e[:2] == ("run", "SmolLM2-135M-Instruct.Q4_1") for e in log[a + 1 : b]), log


def test_a_context_stays_open_while_its_agents_are_parked(models_dir: Path) -> None:
    """An agent parked and then restored finds its model's context still open: coming back
    costs its restore, not a context opened again as well."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        await decode(s, "a")
        assert s.agents["a"].state == "parked" and s.agents["a"].slot.context is not None
        again = await decode(s, "a")
        assert again.restored
        assert len([e for e in w.log if e[0] == "open"]) == 1

    run(models_dir, test, park_after_decode=True)


@pytest.mark.parametrize("unaccounted", [0, 4 * GiB])
def test_what_the_device_holds_beyond_the_ledger_counts_for_admission(
    models_dir: Path, unaccounted: int
) -> None:
    """Before each admission the device's figure is read: what it holds beyond the
    reservations is charged to ``unaccounted``, and models whose weights and contexts fit in
    what the reservations leave, but not in what the device leaves, are refused."""
    smol = read_model_info(models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma = read_model_info(models_dir / "gemma-3-270m-q4_k_m.gguf")
    probe = _sizing()
    need = sum(
        probe.weights_request(i.path.stem, i).bytes + probe.context_request("m", i, 256, 1).bytes
        for i in (smol, gemma)
    )

    async def test(s: Scheduler, w: FakeWorker) -> str | None:
        try:
            await register(s, "a", n_ctx=256)
            await decode(s, "a")
            await register(s, "g", "gemma3-270m", n_ctx=256)
            await decode(s, "g")
            return None
        except LedgerDenied as exc:
            return str(exc.details["reason"])
        finally:
            assert s.room.devices[0].ledger.unaccounted == unaccounted
            assert s.room.devices[0].ledger.snapshot().get("unaccounted", 0) == unaccounted

    refused = run(models_dir, test, cap=need + GiB, max_seqs=1, unaccounted=unaccounted)
    assert refused == (None if unaccounted == 0 else "CAP")


def test_a_state_the_engine_will_not_take_back_is_dropped_and_the_conversation_prefilled(
    models_dir: Path,
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        first = await decode(s, "a")  # then parked (forced)
        assert s.agents["a"].state == "parked"
        w.fail_restores = True
        again = await decode(s, "a")
        assert again.stop_reason is StopReason.LENGTH and not again.restored
        assert again.cached_tokens == 0
        assert again.prompt_tokens > first.prompt_tokens  # the whole conversation, prefilled

    run(models_dir, test, park_after_decode=True)


def test_an_agents_two_states_move_only_along_their_tables() -> None:
    agent = Agent("a", None, 512, SamplingParams(), None, 0)  # type: ignore[arg-type]
    assert agent.state == "empty"
    with pytest.raises(RuntimeError):
        agent.place(Memory.PARKING)  # parking what it never held
    with pytest.raises(RuntimeError):
        agent.place(Memory.RESTORING)  # restoring no parked state
    with pytest.raises(RuntimeError):
        agent.do(Activity.RUNNING)  # running without being queued
    agent.do(Activity.QUEUED)
    agent.place(Memory.RESIDENT)
    assert agent.state == "queued"
    agent.place(Memory.PARKING)  # a queued agent's KV may be parked for an earlier job
    assert agent.state == "parking"
    agent.place(Memory.PARKED)
    agent.place(Memory.RESTORING)
    with pytest.raises(RuntimeError):
        agent.place(Memory.PARKED)  # a failed restore drops the state: only to NONE
    agent.place(Memory.RESIDENT)
    agent.do(Activity.RUNNING)
    assert agent.state == "decoding"
    with pytest.raises(RuntimeError):
        agent.place(Memory.PARKED)  # only through PARKING
    agent.do(Activity.IDLE)
    assert agent.state == "resident"


def test_kv_is_charged_by_use_and_grows_when_a_conversation_needs_more(models_dir: Path) -> None:
    """Agents registered with n_ctx 4,096 whose turns need a few hundred cells get 256-cell
    streams; one whose next turn needs more gets a larger stream once no agent decodes, and
    the others' conversations come back with them."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b"):
            await s.register(name, "smollm2-135m", 4096, SamplingParams(), None, 0)
        await asyncio.gather(decode(s, "a", 100), decode(s, "b", 100))
        slot = s.agents["a"].slot
        assert slot.stream_cells == 256 and slot.pool_cells == 512
        charged = sum(r.bytes for r in slot.context_reservation or ())
        full = s.room.context_request(slot.key, slot.info, 4096, 2).bytes
        assert charged < full / 4  # KV 1/16, compute buffers less
        long = await s.submit(DecodeRequest("a", TextPrompt(" more" * 100), 200)).done
        assert long.stop_reason is StopReason.LENGTH
        assert slot.stream_cells == 1024  # 106 + 500 + 200 cells, rounded up to a power of 2
        again = await decode(s, "b", 4)
        assert again.restored and again.cached_tokens > 100  # b's turn was kept meanwhile
        opens = [e for e in w.log if e[0] == "open"]
        assert [e[3] for e in opens] == ["256", "1024"]

    run(models_dir, test)


def test_a_job_that_needs_a_larger_stream_waits_for_the_decoding_ones(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b"):
            await s.register(name, "smollm2-135m", 4096, SamplingParams(), None, 0)
        await decode(s, "b", 4)
        running = s.submit(DecodeRequest("a", TextPrompt(" go"), 150))
        await asyncio.sleep(0.01)
        big = await s.submit(DecodeRequest("b", TextPrompt(" x" * 400), 10)).done
        first = await running.done
        assert first.stop_reason is StopReason.LENGTH and first.generated_tokens == 150
        assert big.stop_reason is StopReason.LENGTH and big.timings_ms["queued"] > 0
        assert s.agents["b"].slot.stream_cells >= 1024

    run(models_dir, test)


def test_many_agents_fit_where_their_full_n_ctx_would_not(models_dir: Path) -> None:
    """64 agents at n_ctx 4,096, under a cap that holds the weights and 64 streams of 256
    cells but not one context of 64 x 4,096: all of them decode at once."""
    info = read_model_info(models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    sizing = _sizing()
    weights = sizing.weights_request("m", info).bytes
    cap = weights + sizing.context_request("m", info, 256, 64).bytes + (1 << 20)
    assert sizing.context_request("m", info, 4096, 64).bytes > 8 * (cap - weights)

    async def test(s: Scheduler, w: FakeWorker) -> list[DecodeResult]:
        names = [f"a{i}" for i in range(64)]
        for name in names:
            await s.register(name, "smollm2-135m", 4096, SamplingParams(), None, 0)
        return await asyncio.gather(*(decode(s, n, 64) for n in names))

    results = run(models_dir, test, cap=cap, max_seqs=64)
    assert all(r.stop_reason is StopReason.LENGTH and r.generated_tokens == 64 for r in results)
    assert not any(r.parked for r in results)


def test_a_job_waiting_for_larger_streams_is_not_overtaken_by_busy_agents(
    models_dir: Path,
) -> None:
    """Two agents resubmit the moment their replies end; a third's job needs the streams to
    grow, which can only happen while none decodes: the ones after it wait, and it is served."""

    async def busy_client(s: Scheduler, agent: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await decode(s, agent, max_tokens=30)

    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await s.register(name, "smollm2-135m", 4096, SamplingParams(), None, 0)
        await asyncio.gather(*(decode(s, n, 4) for n in ("a", "b", "c")))
        stop = asyncio.Event()
        clients = [asyncio.create_task(busy_client(s, n, stop)) for n in ("a", "b")]
        await asyncio.sleep(0.01)
        big = await s.submit(DecodeRequest("c", TextPrompt(" x" * 600), 10)).done
        stop.set()
        await asyncio.gather(*clients)
        assert big.stop_reason is StopReason.LENGTH

    run(models_dir, test, max_seqs=3)


def test_a_job_of_another_model_waits_for_an_earlier_one_instead_of_failing(
    models_dir: Path,
) -> None:
    """Room for one context. Model A's context is open and idle; A's job comes first, B's
    right after: B's job waits for A's turn to end, then runs; neither fails."""
    smol = read_model_info(models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma = read_model_info(models_dir / "gemma-3-270m-q4_k_m.gguf")

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a", n_ctx=256)
        await register(s, "g", "gemma3-270m", n_ctx=256)
        await decode(s, "a")
        first = s.submit(DecodeRequest("a", TextPrompt(" more"), 8))
        second = s.submit(DecodeRequest("g", TextPrompt(" hi"), 8))
        results = await asyncio.gather(first.done, second.done)
        assert all(r.stop_reason is StopReason.LENGTH for r in results)

    for _ in range(5):  # whichever model's turn comes first
        run(models_dir, test, cap=_room_for_one_context((smol, 1), (gemma, 1)))


def test_a_parked_agent_comes_back_whole_when_its_conversation_is_sent_again_shorter(
    models_dir: Path,
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b"):
            await s.register(name, "smollm2-135m", 4096, SamplingParams(), None, 0)
        await s.submit(DecodeRequest("a", TextPrompt(" x" * 400), 100)).done  # 900 in KV
        await s.submit(DecodeRequest("b", TextPrompt(" y" * 400), 100)).done  # a parked
        assert s.agents["a"].state == "parked"
        short = await s.submit(DecodeRequest("a", TextPrompt(" z"), 4)).done
        assert short.restored and short.stop_reason is StopReason.LENGTH

    run(models_dir, test, max_seqs=1)


def test_the_loop_waits_instead_of_spinning_when_no_model_can_move(models_dir: Path) -> None:
    """A stream nobody reads holds one model's only running agent; another model waits for
    memory: the scheduler sleeps until something happens."""
    smol = read_model_info(models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma = read_model_info(models_dir / "gemma-3-270m-q4_k_m.gguf")

    async def test(s: Scheduler, w: FakeWorker) -> float:
        await register(s, "a", n_ctx=256)
        await register(s, "g", "gemma3-270m", n_ctx=256)
        unread = s.submit(DecodeRequest("a", TextPrompt(" go"), 10_000, stream=True))
        await asyncio.sleep(0.5)  # its stream fills up: a sits out
        waiting = s.submit(DecodeRequest("g", TextPrompt(" hi"), 4))
        await asyncio.sleep(0.05)
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        spent = time.process_time() - cpu
        s.cancel(unread)
        await unread.done
        assert (await waiting.done).stop_reason is StopReason.LENGTH
        return spent

    assert run(models_dir, test, cap=_room_for_one_context((smol, 1), (gemma, 1))) < 0.1


def test_replies_held_for_forced_parks_go_out_when_a_park_fails(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        w.fail_saves = True
        result = await asyncio.wait_for(decode(s, "a"), 5)
        assert result.stop_reason is StopReason.LENGTH

    run(models_dir, test, park_after_decode=True)


def test_idle_agents_are_written_ahead_and_then_parked_without_a_copy(models_dir: Path) -> None:
    """While the engine is idle, agents that may be parked have their KV copied to host RAM;
    parking one later only frees its cells, and it comes back from that copy."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
        await decode(s, "a")
        await decode(s, "b")
        await asyncio.sleep(0.3)  # idle: both are written ahead, and stay resident
        saves = [e for e in w.log if e[0] == "save"]
        assert [e[2] for e in saves] == ["0", "1"]  # a's sequence first (used longer ago)
        assert s.agents["a"].state == s.agents["b"].state == "resident"
        kv_a = s.agents["a"].kv_tokens
        start = len(w.log)
        result = await decode(s, "c")  # takes a's sequence: only its cells are freed
        assert result.parked == ["a"] and s.agents["a"].state == "parked"
        assert not [e for e in w.log[start:] if e[0] == "save"]
        assert ("clear", "SmolLM2-135M-Instruct.Q4_1", "0", str(kv_a)) in w.log[start:]
        assert s.room.transfers.parks == s.room.transfers.parks_ahead == 1
        result = await decode(s, "b")  # its next job changes its KV: the copy goes
        assert s.agents["b"].copy is None
        result = await decode(s, "a")  # back from the copy written ahead
        assert result.restored and result.cached_tokens == kv_a
        assert ("restore", "SmolLM2-135M-Instruct.Q4_1", "0", str(kv_a)) in w.log

    run(models_dir, test, max_seqs=2)


def test_nothing_is_written_ahead_where_no_park_can_come(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        await register(s, "b")
        await decode(s, "a")
        await decode(s, "b")
        await asyncio.sleep(0.3)
        assert not [e for e in w.log if e[0] == "save"]
        assert s.room.store.used == 0

    run(models_dir, test, max_seqs=2)


def test_copies_written_ahead_make_way_for_a_park_when_the_budget_is_spent(
    models_dir: Path,
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        await register(s, "x", "gemma3-270m")
        await register(s, "y", "gemma3-270m")
        await decode(s, "a")
        await asyncio.sleep(0.3)  # another model has no context: a is written ahead
        assert s.agents["a"].copy is not None and s.room.store.used == s.room.store.budget
        await decode(s, "x")
        result = await decode(s, "y")  # x is parked: a's copy gives its room up
        assert result.parked == ["x"] and s.agents["x"].state == "parked"
        assert s.agents["a"].copy is None and s.agents["a"].state == "resident"

    run(models_dir, test, max_seqs=1, park_budget=1 << 20)


def test_a_park_past_the_budget_spills_the_least_recently_used_parked_agent(
    models_dir: Path, tmp_path: Path
) -> None:
    """The park budget holds one state: parking b spills a to its file, and a's next job
    reads it back and restores it; the file is read once."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
        await decode(s, "a")
        kv_a = s.agents["a"].kv_tokens
        await decode(s, "b")  # a is parked in RAM, which it fills
        result = await decode(s, "c")  # b is parked: a goes to disk to make room
        assert result.parked == ["b"] and s.agents["b"].state == "parked"
        assert s.agents["a"].state == "spilled" and s.agents["a"].kv_tokens == kv_a
        assert (tmp_path / "a.state").is_file() and s.room.disk is not None
        assert s.room.disk.files == 1 and s.room.transfers.spills == 1
        result = await decode(s, "a")
        assert result.restored and result.cached_tokens == kv_a
        assert ("restore", "SmolLM2-135M-Instruct.Q4_1", "0", str(kv_a)) in w.log
        assert not (tmp_path / "a.state").exists()  # read once
        assert s.room.transfers.disk_reads == 1
        # c was parked for a, and b went to disk to make room
        assert s.agents["b"].state == "spilled" and s.room.disk.files == 1

    run(models_dir, test, max_seqs=1, park_budget=1 << 20, disk=tmp_path)


def test_while_idle_parked_agents_spill_until_a_quarter_of_the_budget_is_free(
    models_dir: Path, tmp_path: Path
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        names = ["a", "b", "c", "d", "e"]
        for name in names:
            await register(s, name)
            await decode(s, name)  # the one before is parked: four 1 MiB states in the end
        await asyncio.sleep(0.3)
        states = {n: s.agents[n].state for n in names}
        assert states == {
            "a": "spilled",
            "b": "parked",
            "c": "parked",
            "d": "parked",
            "e": "resident",
        }
        parked = [a.parked for a in s.agents.values() if a.parked is not None]
        assert sum(len(p.buffer) for p in parked) == 3 << 20  # e's copy ahead takes the rest

    run(models_dir, test, max_seqs=1, park_budget=4 << 20, disk=tmp_path)


def test_a_disk_that_refuses_a_spill_loses_nothing(models_dir: Path, tmp_path: Path) -> None:
    """The state stays parked in RAM; the job that needed the room fails with the reason;
    once the disk takes writes again, the same job succeeds, and the parked agent comes
    back whole."""
    blocked = tmp_path / "states"
    blocked.write_text("a file where the directory should be")

    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
        await decode(s, "a")
        kv_a = s.agents["a"].kv_tokens
        await decode(s, "b")
        with pytest.raises(ParkBudgetExceeded):
            await decode(s, "c")
        assert s.agents["a"].state == "parked" and s.agents["b"].state == "resident"
        disk = s.room.disk
        assert disk is not None and disk.errors >= 1 and str(blocked) in str(disk.last_error)
        blocked.unlink()
        result = await decode(s, "c")
        assert result.parked == ["b"] and s.agents["a"].state == "spilled"
        result = await decode(s, "a")  # c parked: b goes to disk, then a's file is read back
        assert result.restored and result.cached_tokens == kv_a

    run(models_dir, test, max_seqs=1, park_budget=1 << 20, disk=blocked)


def test_the_agent_a_park_makes_room_for_is_spilled_last(models_dir: Path, tmp_path: Path) -> None:
    """With room for one parked state: a, parked, comes back by going to disk first, as b's
    park needs its room before a's restore frees it."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        await register(s, "b")
        await decode(s, "a")
        kv_a = s.agents["a"].kv_tokens
        await decode(s, "b")
        result = await decode(s, "a")
        assert result.parked == ["b"] and result.restored and result.cached_tokens == kv_a
        assert s.room.transfers.spills == s.room.transfers.disk_reads == 1

    run(models_dir, test, max_seqs=1, park_budget=1 << 20, disk=tmp_path)


def test_a_state_file_that_does_not_verify_is_prefilled_instead(
    models_dir: Path, tmp_path: Path
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
            await decode(s, name)
        assert s.agents["a"].state == "spilled"
        path = tmp_path / "a.state"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        result = await decode(s, "a")
        assert not result.restored and result.cached_tokens == 0
        assert s.room.disk is not None and s.room.disk.rejected == 1
        assert "checksum does not match" in str(s.room.disk.last_error)
        assert not path.exists()

    run(models_dir, test, max_seqs=1, park_budget=1 << 20, disk=tmp_path)


@pytest.mark.parametrize("op", ["reset", "unregister"])
def test_a_spilled_agent_reset_or_unregistered_leaves_no_file(
    models_dir: Path, tmp_path: Path, op: str
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("a", "b", "c"):
            await register(s, name)
            await decode(s, name)
        assert s.agents["a"].state == "spilled" and (tmp_path / "a.state").is_file()
        await (s.reset("a", 0) if op == "reset" else s.unregister("a", 0))
        assert s.room.disk is not None
        await s.room.disk.flush()
        assert not (tmp_path / "a.state").exists() and s.room.disk.files == 0

    run(models_dir, test, max_seqs=1, park_budget=1 << 20, disk=tmp_path)


# -- several devices ---------------------------------------------------------------------------


def _need(models_dir: Path, name: str, n_ctx: int = 512) -> int:
    """Bytes a model's weights and one agent's context of ``n_ctx`` take in a ledger."""
    info = read_model_info(models_dir / f"{name}.gguf")
    sizing = _sizing()
    return (
        sizing.weights_request("m", info).bytes + sizing.context_request("m", info, n_ctx, 1).bytes
    )


def _device_of(s: Scheduler, agent: str) -> int:
    return s.agents[agent].slot.device.index


def test_a_new_model_goes_where_it_fits_with_the_most_room_left(models_dir: Path) -> None:
    """Two equal devices: the first model on device 0 (a tie goes to the lowest index), the
    second on device 1 (more room left there); a second agent of a model joins it where it
    is, even where another device has more room; each ledger charges only its own models."""
    cap = 4 * _need(models_dir, GEMMA)

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a", "smollm2-135m")
        await register(s, "b", "gemma3-270m")
        await register(s, "c", "smollm2-135m")
        assert [_device_of(s, x) for x in "abc"] == [0, 1, 0]
        await decode(s, "a")
        await decode(s, "b")
        zero, one = (d.ledger.snapshot() for d in s.room.devices)
        assert set(zero) == {"model:smollm2-135m", "context:smollm2-135m"}
        assert set(one) == {"model:gemma3-270m", "context:gemma3-270m"}

    run(models_dir, test, caps=[cap, cap])


def test_a_model_that_fits_no_device_is_refused_with_each_devices_numbers(
    models_dir: Path,
) -> None:
    need = _need(models_dir, GEMMA)

    async def test(s: Scheduler, w: FakeWorker) -> None:
        with pytest.raises(LedgerDenied) as refused:
            await register(s, "g", "gemma3-270m")
        details = refused.value.details
        assert [d["device"] for d in details["devices"]] == [0, 1]
        assert [d["cap_bytes"] for d in details["devices"]] == [need // 2, need * 3 // 4]
        assert all(d["requested_bytes"] == need for d in details["devices"])
        assert details["cap_bytes"] == need * 3 // 4  # the device that came closest
        assert "device 0" in str(refused.value) and "device 1" in str(refused.value)
        assert not s.room.slots and not [e for e in w.log if e[0] == "load"]

    run(models_dir, test, caps=[need // 2, need * 3 // 4])


def test_an_agent_is_admitted_on_its_models_device_only(models_dir: Path) -> None:
    """A model on device 0, whose next agent's context does not fit there, is refused with
    device 0's numbers: the agent is not placed on device 1, which has more room now."""
    small, gemma = _need(models_dir, SMOL, 256), _need(models_dir, GEMMA)

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "g", "gemma3-270m")  # device 1, which then has less room left
        await s.register("a", "smollm2-135m", 256, SamplingParams(), None, 0)
        assert (_device_of(s, "g"), _device_of(s, "a")) == (1, 0)
        await s.unregister("g", 0)  # device 1 is empty again
        with pytest.raises(LedgerDenied) as refused:
            await s.register("big", "smollm2-135m", 8192, SamplingParams(), None, 0)
        assert refused.value.details["cap_bytes"] == small + (1 << 20)
        assert "devices" not in refused.value.details

    run(models_dir, test, caps=[small + (1 << 20), gemma + small // 2], keep_alive_s=0)


def test_contexts_are_closed_for_room_only_on_the_same_device(models_dir: Path) -> None:
    """Device 0 holds two models' weights but one context at a time: they take turns there,
    while the model on device 1 keeps its context throughout."""
    gemma, tiny = _need(models_dir, GEMMA), _need(models_dir, "synth-tiny", 256)
    infos = [read_model_info(models_dir / f"{m}.gguf") for m in (SMOL, "synth-tiny")]
    one_context = _room_for_one_context(*((info, 1) for info in infos))

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "far", "gemma3-270m")  # fits device 1 only
        await decode(s, "far")
        await s.register("a", "smollm2-135m", 256, SamplingParams(), None, 0)
        await s.register("x", "synth-tiny", 256, SamplingParams(), None, 0)
        assert [_device_of(s, x) for x in ("far", "a", "x")] == [1, 0, 0]
        for _ in range(2):
            await decode(s, "a")
            await decode(s, "x")
        closed = [e[1] for e in w.log if e[0] == "close"]
        assert closed and GEMMA not in closed
        assert s.agents["far"].slot.context is not None

    run(models_dir, test, caps=[one_context, gemma + tiny // 2])


def test_parked_agents_come_back_on_their_models_device(models_dir: Path) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "pad", "smollm2-135m")  # device 0 is then the fuller one
        for name in ("a", "b"):
            await register(s, name, "gemma3-270m")
        assert _device_of(s, "a") == _device_of(s, "b") == 1
        await decode(s, "a")
        await decode(s, "b")  # one sequence: a is parked
        assert s.agents["a"].state == "parked"
        result = await decode(s, "a")
        assert result.restored and result.parked == ["b"]
        context = s.agents["a"].slot.context
        assert context is not None and context.device == 1  # type: ignore[attr-defined]

    run(models_dir, test, caps=[16 * GiB, 16 * GiB], max_seqs=1)


def test_models_on_two_devices_decode_at_the_same_time(models_dir: Path) -> None:
    """A slice of device 1's model starts while device 0's is still running: each device's
    steps go to its own engine lane."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a", "smollm2-135m")
        await register(s, "b", "gemma3-270m")
        assert {_device_of(s, "a"), _device_of(s, "b")} == {0, 1}
        await asyncio.gather(decode(s, "a", 64), decode(s, "b", 64))
        runs = [e for e in w.log if e[0] in ("run", "ran")]
        overlapping = any(
            first[0] == "run" and second[0] == "run" and first[1] != second[1]
            for first, second in itertools.pairwise(runs)
        )
        assert overlapping, runs

    run(models_dir, test, caps=[16 * GiB, 16 * GiB])


def test_a_device_starts_its_next_slice_without_waiting_for_the_other(models_dir: Path) -> None:
    """Device 0's model steps five times slower than device 1's: while device 0 runs one
    slice, device 1 runs its four, back to back (each device at its own pace)."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a", "smollm2-135m")
        await register(s, "b", "gemma3-270m")
        assert (_device_of(s, "a"), _device_of(s, "b")) == (0, 1)
        await asyncio.gather(decode(s, "a"), decode(s, "b"))  # both warm
        w.log.clear()
        w.step_s_of = {SMOL: 0.010, GEMMA: 0.002}
        await asyncio.gather(decode(s, "a", 16), decode(s, "b", 64))  # 1 slice, and 4
        runs = [e[:2] for e in w.log if e[0] in ("run", "ran")]
        slow_ends = runs.index(("ran", SMOL))
        assert runs[:slow_ends].count(("ran", GEMMA)) == 4, runs

    run(models_dir, test, caps=[16 * GiB, 16 * GiB])


def test_an_operation_waits_for_one_slice_at_most(models_dir: Path) -> None:
    """A turn runs several slices while nobody waits; a REGISTER arriving meanwhile gets the
    lock as soon as the slice in flight ends, not after the turn's other slices."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        long = asyncio.ensure_future(decode(s, "a", 2000))
        await asyncio.sleep(0.05)
        before = len(w.log)
        await register(s, "c")
        started = [e for e in w.log[before:] if e[0] == "run"]
        assert len(started) <= 1, started
        assert not long.done()
        s.cancel(s.agents["a"].jobs[0])
        await long

    run(models_dir, test)


# -- partial placement (issue #12) -------------------------------------------------------------


def _cuda_sizing() -> Residency:
    return Residency(FakeWorker(), [], KvStore(GiB), ResidencyConfig(Backend.CUDA))


def _device_need(info: ModelInfo, n_gpu_layers: int, n_ctx: int = 512) -> int:
    """Device bytes of a model with ``n_gpu_layers`` on the device and one context."""
    sizing = _cuda_sizing()
    weights = sizing.weights_request("m", info, n_gpu_layers).bytes
    return weights + sizing.context_request("m", info, n_ctx, 1, n_gpu_layers).bytes


def _most_that_fit(info: ModelInfo, cap: int) -> int:
    """The largest n_gpu_layers below all of them whose bytes fit ``cap``, by trying each."""
    return max(k for k in range(info.n_layer + 1) if _device_need(info, k) <= cap)


def test_a_model_too_large_for_every_device_gets_the_most_layers_that_fit(
    models_dir: Path,
) -> None:
    """Gemma fits whole on neither device, nor split over both (device 0 holds none of its
    layers but a few blocks): it goes where the most of its layers fit, with that many (the
    same count as trying each), its host part charged to the host ledger; its agent
    decodes; the host ledger's charges go when it unloads."""
    info = read_model_info(models_dir / f"{GEMMA}.gguf")
    layers = info.n_layer + 1
    caps = [_device_need(info, 0) + 8 * MiB, _device_need(info, layers // 2) + 1]
    expected = _most_that_fit(info, caps[1])
    assert expected == layers // 2 and _most_that_fit(info, caps[0]) == 0

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "g", "gemma3-270m")
        slot = s.agents["g"].slot
        assert (slot.device.index, slot.n_gpu_layers, slot.partial) == (1, expected, True)
        assert slot.model.n_gpu_layers == expected  # type: ignore[attr-defined]
        assert (await decode(s, "g")).text == "x" * 8
        host = s.room.host
        assert host is not None
        sizing = _cuda_sizing()
        weights, _ = sizing.host_requests("m", info, 512, 1, expected)
        charged = host.snapshot()
        assert charged["model:gemma3-270m"] == weights.bytes > 0
        assert charged["context:gemma3-270m"] > 0
        await s.unregister("g", 0)
        assert host.reserved == 0 and s.room.devices[1].ledger.reserved == 0

    run(models_dir, test, caps=caps, backend=Backend.CUDA, host_cap=16 * GiB, keep_alive_s=0)


def _split_need(info: ModelInfo, span: range, n_ctx: int = 512) -> int:
    """Device bytes of ``span``'s layers of a model split by layer, and one context's."""
    sizing, layers = _cuda_sizing(), info.n_layer + 1
    weights = sizing.weights_request("m", info, layers, span).bytes
    return weights + sizing.context_request("m", info, n_ctx, 1, layers, span).bytes


def test_a_model_too_large_for_each_device_is_split_over_them_by_layer(models_dir: Path) -> None:
    """Gemma fits whole on neither device, but split over both: device 0 takes the most of
    its first layers that fit (the same count as trying each), device 1 the rest with the
    output layer. Each ledger is charged its share, llama.cpp is asked for that split, host
    RAM holds only what it holds at full offload; an agent is parked and restored across
    both; both ledgers and the host's are empty once the model unloads."""
    info = read_model_info(models_dir / f"{GEMMA}.gguf")
    layers = info.n_layer + 1
    caps = [_device_need(info, 3), _device_need(info, layers // 2) + 1]
    first = max(k for k in range(layers) if _split_need(info, range(k)) <= caps[0])
    assert 0 < first < layers and _split_need(info, range(first, layers)) <= caps[1]
    spans = (range(first), range(first, layers))
    sizing = _cuda_sizing()

    async def test(s: Scheduler, w: FakeWorker) -> None:
        for name in ("g", "h"):
            await register(s, name, "gemma3-270m")
        slot = s.agents["g"].slot
        assert [(sh.device.index, sh.span) for sh in slot.placement.shares] == [
            (0, spans[0]),
            (1, spans[1]),
        ]
        assert not slot.partial and slot.n_gpu_layers == layers
        assert w.splits[GEMMA] == ((0, first), (1, layers - first))
        assert (await decode(s, "g")).text == "x" * 8
        for device, span in zip(s.room.devices, spans, strict=True):
            charged = device.ledger.snapshot()
            weights = sizing.weights_request("m", info, layers, span)
            context = sizing.context_request("m", info, slot.stream_cells, 1, layers, span)
            assert charged["model:gemma3-270m"] == weights.bytes
            assert charged["context:gemma3-270m"] == context.bytes
        host = s.room.host
        assert host is not None
        weights, _ = sizing.host_requests("m", info, 512, 1, layers)
        assert host.snapshot()["model:gemma3-270m"] == weights.bytes
        assert (await decode(s, "h")).parked == ["g"]  # one sequence
        again = await decode(s, "g")
        assert again.restored and again.parked == ["h"]
        for name in ("g", "h"):
            await s.unregister(name, 0)
        assert [d.ledger.reserved for d in s.room.devices] == [0, 0] and host.reserved == 0

    run(
        models_dir,
        test,
        caps=caps,
        backend=Backend.CUDA,
        host_cap=16 * GiB,
        keep_alive_s=0,
        max_seqs=1,
    )


def test_a_split_model_and_another_make_room_for_each_other_on_the_device_they_share(
    models_dir: Path,
) -> None:
    """SmolLM2 on device 1, then Gemma split over both: device 1 holds both models' weights
    and one context of the two. Gemma's context takes SmolLM2's room there (its agent
    parked), then SmolLM2's takes Gemma's back, which closes on both devices."""
    gemma = read_model_info(models_dir / f"{GEMMA}.gguf")
    smol = read_model_info(models_dir / f"{SMOL}.gguf")
    layers, sizing = gemma.n_layer + 1, _cuda_sizing()
    cap0 = _device_need(gemma, 3)
    first = max(k for k in range(layers) if _split_need(gemma, range(k), KV_PAD) <= cap0)
    span = range(first, layers)
    weights = sizing.weights_request("m", gemma, layers, span).bytes
    weights += sizing.weights_request("m", smol).bytes
    contexts = [
        sizing.context_request("m", gemma, KV_PAD, 1, layers, span).bytes,
        sizing.context_request("m", smol, KV_PAD, 1).bytes,
    ]
    assert min(contexts) > MiB
    cap1 = weights + max(contexts) + MiB

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a", "smollm2-135m", n_ctx=KV_PAD)
        assert s.agents["a"].slot.device.index == 1
        await decode(s, "a")
        await register(s, "g", "gemma3-270m", n_ctx=KV_PAD)
        split = s.agents["g"].slot.placement
        assert [(sh.device.index, sh.span) for sh in split.shares] == [(0, range(first)), (1, span)]
        assert (await decode(s, "g")).parked == ["a"]
        assert (await decode(s, "a")).parked == ["g"] and s.agents["g"].slot.context is None
        assert all("context:gemma3-270m" not in d.ledger.snapshot() for d in s.room.devices)
        assert (await decode(s, "g")).restored

    run(models_dir, test, caps=[cap0, cap1], backend=Backend.CUDA, host_cap=16 * GiB)


def test_a_split_context_short_on_one_device_is_refused_whatever_holds_the_other(
    models_dir: Path, tmp_path: Path
) -> None:
    """Gemma split: its blocks on device 0, its output layer on device 1. A copy of SmolLM2
    (B) then takes device 0's room beside Gemma's blocks, with a context open there, and
    SmolLM2 (A) device 1's. Gemma's long reply finds no room on device 1, where nothing can
    be closed: VRAM_LEDGER_DENY at once, not a wait on B's context, which is on the other
    device and would free nothing on device 1."""
    gemma = read_model_info(models_dir / f"{GEMMA}.gguf")
    smol = read_model_info(models_dir / f"{SMOL}.gguf")
    copy = tmp_path / "copy.gguf"
    try:
        os.link(smol.path, copy)
    except OSError:
        shutil.copyfile(smol.path, copy)
    layers, n_ctx, sizing = gemma.n_layer + 1, 4096, _cuda_sizing()
    smol_need = _device_need(smol, smol.n_layer + 1, KV_PAD)
    blocks, output = range(gemma.n_layer), range(gemma.n_layer, layers)
    cap0 = _split_need(gemma, blocks, n_ctx) + smol_need + MiB
    weights1 = sizing.weights_request("m", gemma, layers, output).bytes
    cap1 = weights1 + smol_need + 3 * MiB
    assert _split_need(gemma, output, n_ctx) <= cap1  # admitted
    smol_weights = sizing.weights_request("m", smol).bytes
    for cells in (4096, 3072):  # the reply's stream, or what it needs alone: neither fits
        reply = sizing.context_request("m", gemma, cells, 1, layers, output).bytes
        assert weights1 + smol_weights + reply > cap1

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "g", "gemma3-270m", n_ctx=n_ctx)
        split = s.agents["g"].slot.placement
        assert [(sh.device.index, sh.span) for sh in split.shares] == [(0, blocks), (1, output)]
        await register(s, "b", str(copy), n_ctx=KV_PAD)
        await register(s, "a", "smollm2-135m", n_ctx=KV_PAD)
        assert [s.agents[n].slot.device.index for n in "ab"] == [1, 0]
        await decode(s, "b")  # its context stays open on device 0
        with pytest.raises(LedgerDenied) as refused:
            await s.submit(DecodeRequest("g", TextPrompt(" go"), 3000)).done
        assert refused.value.details["cap_bytes"] == cap1

    run(
        models_dir,
        test,
        caps=[cap0, cap1],
        backend=Backend.CUDA,
        host_cap=16 * GiB,
        allow=tmp_path,
    )


def test_refused_with_each_devices_numbers_when_not_even_a_split_fits(models_dir: Path) -> None:
    """With --no-partial, a model that fits neither whole on a device nor split over them
    is refused with each device's numbers for the whole model."""
    info = read_model_info(models_dir / f"{GEMMA}.gguf")
    full = _device_need(info, info.n_layer + 1)
    caps = [_device_need(info, 0) + 8 * MiB, _device_need(info, info.n_layer // 2)]

    async def test(s: Scheduler, w: FakeWorker) -> None:
        with pytest.raises(LedgerDenied) as refused:
            await register(s, "g", "gemma3-270m")
        details = refused.value.details
        assert details["reason"] == "CAP"
        assert [(d["device"], d["requested_bytes"]) for d in details["devices"]] == [
            (0, full),
            (1, full),
        ]
        assert not [e for e in w.log if e[0] == "load"]

    run(models_dir, test, caps=caps, backend=Backend.CUDA, host_cap=16 * GiB, partial=False)


def test_no_partial_keeps_all_or_nothing(models_dir: Path) -> None:
    info = read_model_info(models_dir / f"{GEMMA}.gguf")
    full = _device_need(info, info.n_layer + 1)

    async def test(s: Scheduler, w: FakeWorker) -> None:
        with pytest.raises(LedgerDenied) as refused:
            await register(s, "g", "gemma3-270m")
        assert refused.value.details["reason"] == "CAP"
        assert refused.value.details["requested_bytes"] == full
        assert not [e for e in w.log if e[0] == "load"]

    run(models_dir, test, caps=[full // 2], backend=Backend.CUDA, host_cap=16 * GiB, partial=False)


def test_refused_when_the_host_cannot_hold_the_rest_with_both_numbers(models_dir: Path) -> None:
    info = read_model_info(models_dir / f"{GEMMA}.gguf")
    cap = _device_need(info, info.n_layer // 2)
    expected = _most_that_fit(info, cap)
    assert expected == info.n_layer // 2
    weights, context = _cuda_sizing().host_requests("m", info, 512, 1, expected)
    host_cap = (weights.bytes + context.bytes) // 2

    async def test(s: Scheduler, w: FakeWorker) -> None:
        with pytest.raises(LedgerDenied) as refused:
            await register(s, "g", "gemma3-270m")
        details = refused.value.details
        assert details["reason"] == "HOST" and details["cap_bytes"] == host_cap
        assert details["requested_bytes"] == weights.bytes + context.bytes
        assert details["device"]["n_gpu_layers"] == expected
        assert details["device"]["cap_bytes"] == cap
        assert details["device"]["requested_bytes"] == _device_need(info, expected)
        assert "host RAM" in str(refused.value)
        assert not [e for e in w.log if e[0] == "load"]

    run(models_dir, test, caps=[cap], backend=Backend.CUDA, host_cap=host_cap)


def test_refused_with_each_devices_numbers_when_not_even_no_layers_fit(models_dir: Path) -> None:
    """A device too small for the compute buffer alone: refused with the numbers at 0 layers."""
    info = read_model_info(models_dir / f"{GEMMA}.gguf")
    nothing = _device_need(info, 0)

    async def test(s: Scheduler, w: FakeWorker) -> None:
        with pytest.raises(LedgerDenied) as refused:
            await register(s, "g", "gemma3-270m")
        details = refused.value.details
        assert details["reason"] == "CAP" and details["requested_bytes"] == nothing
        assert details["parts"]["weights"] == 0
        assert [d["requested_bytes"] for d in details["devices"]] == [nothing, nothing]

    caps = [nothing // 2, nothing - 1]
    run(models_dir, test, caps=caps, backend=Backend.CUDA, host_cap=16 * GiB)


def _room_for_gemma_and_half_smollm2(models_dir: Path) -> int:
    """A device for Gemma whole, or SmolLM2 whole and Gemma in part."""
    gemma = read_model_info(models_dir / f"{GEMMA}.gguf")
    smol = read_model_info(models_dir / f"{SMOL}.gguf")
    return _device_need(gemma, gemma.n_layer + 1) + _device_need(smol, smol.n_layer + 1) // 2


async def _gemma_partly_beside_smollm2(s: Scheduler) -> ModelSlot:
    """Agent ``a`` of SmolLM2, then agent ``g`` of Gemma, placed partially; one turn each."""
    await register(s, "a", "smollm2-135m")
    await decode(s, "a")
    await register(s, "g", "gemma3-270m")
    slot = s.agents["g"].slot
    assert 0 < slot.n_gpu_layers <= slot.info.n_layer
    await decode(s, "g")
    return slot


def test_a_partial_model_gets_more_layers_when_room_frees_never_while_decoding(
    models_dir: Path,
) -> None:
    """SmolLM2 holds part of the device, so Gemma gets only some layers. SmolLM2's agent
    leaves while Gemma's decodes: Gemma keeps its layers until its reply ends, then is
    reloaded with all of them, and its agent's conversation goes on from its parked KV."""
    layers = read_model_info(models_dir / f"{GEMMA}.gguf").n_layer + 1

    async def test(s: Scheduler, w: FakeWorker) -> None:
        slot = await _gemma_partly_beside_smollm2(s)
        before = slot.n_gpu_layers
        long = asyncio.ensure_future(decode(s, "g", 400))
        await asyncio.sleep(0.05)
        await s.unregister("a", 0)  # keep-alive 0: SmolLM2 unloads, its room is free
        await asyncio.sleep(0.1)
        assert slot.n_gpu_layers == before and not long.done()  # not while decoding
        result = await long
        assert result.generated_tokens == 400 and slot.n_gpu_layers == before
        await until(lambda: slot.n_gpu_layers == layers)
        assert not slot.partial
        assert slot.model.n_gpu_layers == layers  # type: ignore[attr-defined]
        assert [e for e in w.log if e[:2] == ("unload", GEMMA)]
        held = len(s.agents["g"].tokens)
        again = await decode(s, "g")
        assert again.restored and again.text == "x" * 8
        # The conversation went on from its parked KV (all but the last token generated)
        assert again.cached_tokens == held - 1
        assert slot.decode_tokens == 8  # its speed is measured anew from the reload
        ledger = s.room.devices[0].ledger
        assert (
            ledger.snapshot()["model:gemma3-270m"]
            == _cuda_sizing().weights_request("m", slot.info, layers).bytes
        )

    cap = _room_for_gemma_and_half_smollm2(models_dir)
    run(models_dir, test, caps=[cap], backend=Backend.CUDA, host_cap=16 * GiB, keep_alive_s=0)


def test_a_reload_with_more_layers_that_fails_goes_back_and_is_not_tried_again(
    models_dir: Path,
) -> None:
    async def test(s: Scheduler, w: FakeWorker) -> None:
        slot = await _gemma_partly_beside_smollm2(s)
        before = slot.n_gpu_layers
        w.most_layers = before  # llama.cpp will fail to load it with more
        await s.unregister("a", 0)
        await until(lambda: not slot.may_grow)
        assert slot.n_gpu_layers == before
        loads = [e for e in w.log if e == ("load", GEMMA)]
        assert len(loads) == 3  # the first, the one that failed, and back as it was
        await asyncio.sleep(0.3)  # idle again: no more tries
        assert [e for e in w.log if e == ("load", GEMMA)] == loads
        again = await decode(s, "g")
        assert again.restored and again.text == "x" * 8

    cap = _room_for_gemma_and_half_smollm2(models_dir)
    run(models_dir, test, caps=[cap], backend=Backend.CUDA, host_cap=16 * GiB, keep_alive_s=0)


def test_the_host_ledger_makes_room_by_closing_idle_contexts(models_dir: Path) -> None:
    """Host RAM is one for every device: a model whose host part fits only once idle contexts
    close is admitted, and opening its context closes one (least recently used first), as the
    device's ledger does."""
    tiny = read_model_info(models_dir / "synth-tiny.gguf")

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a", "smollm2-135m")
        await register(s, "g", "gemma3-270m")
        await decode(s, "a")
        await decode(s, "g")
        host = s.room.host
        assert host is not None
        weights, context = _cuda_sizing().host_requests("m", tiny, 512, 1, tiny.n_layer + 1)
        # Without counting what idle contexts give back, synth-tiny does not fit.
        host.cap = host.reserved + weights.bytes + context.bytes - 1
        await register(s, "x", "synth-tiny")
        assert (await decode(s, "x")).text == "x" * 8
        assert ("close", SMOL) in w.log  # the least recently used idle context
        assert host.reserved <= host.cap
        for slot in s.room.slots.values():
            if slot.context is not None and slot.key != "synth-tiny":
                await s.room.close_context(slot)
        host.cap = host.reserved  # nothing more, and nothing idle left to close but x's
        with pytest.raises(LedgerDenied) as refused:
            await s.room.reserve_host(Request("context:y", {"kv": 1}), exclude=s.agents["x"].slot)
        assert refused.value.details["reason"] == "HOST"

    run(models_dir, test, caps=[16 * GiB], backend=Backend.CUDA, host_cap=16 * GiB)


def test_the_last_agent_leaves_cleanly_while_the_device_is_over_its_cap(models_dir: Path) -> None:
    """What a device holds beyond the ledger can take it past its cap; the last UNREGISTER
    still hands the model's weights to its keep-alive, which brings no new bytes."""

    async def test(s: Scheduler, w: FakeWorker) -> None:
        await register(s, "a")
        await decode(s, "a")
        ledger = s.room.devices[0].ledger
        ledger.set_unaccounted(ledger.cap)
        await s.unregister("a", 0)
        slot = next(iter(s.room.slots.values()))
        assert list(slot.weights) == [KEEPALIVE_HOLDER] and slot.unload_timer is not None
        assert "model:smollm2-135m" in ledger.snapshot()

    run(models_dir, test)
