"""`lmxd bench parking`: parking and restoring at PCIe speed.

1. Raw copies, in process: ``llama_state_seq_get_data`` / ``set_data`` of one sequence of the
   Llama-3.2-1B shape (4,000 and 16,000 tokens) into ordinary and into page-locked memory.
2. Through the daemon, end to end (``--park-after-decode``): a DECODE prefills the context and
   parks it; later DECODEs restore it and park it again. Park and restore throughput come from
   the daemon's own counters (STATUS) and reply timings; the buffers are warm by then (goal:
   >= 40 GB/s for states of 100 MB and more). Restore time against re-prefill time (goal:
   restore <= 1/20 of prefill at 16,000 tokens).
   Each against llama.cpp's own copy into and out of page-locked memory in the same run
   (goal, issue #8: >= 90%).
3. A decoding agent's longest pause while another agent is parked, against the park itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import time
from pathlib import Path
from typing import Any

import llama_cpp

from lmxd import catalog
from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.engine.sampling import SamplingParams
from lmxd.engine.stepper import ReplySpec, Stepper
from lmxd.kvstore import KvStore
from lmxd.spawn import DaemonProcess

MODEL = "synth-llama3.2-1b"
SIDE_MODEL = "synth-qwen2-0.5b"
SIZES = (4000, 16000)
GB = 1e9


def _raw(path: Path) -> list[dict[str, Any]]:
    engine = Engine.get()

    def measure() -> list[dict[str, Any]]:
        registry = ModelRegistry(engine)
        model = registry.acquire(path)
        ctx = Context(model, ContextParams(n_ctx=16384, n_seq_max=2))
        stepper = Stepper(ctx)
        rows = []
        try:
            for n in SIZES:
                ctx.clear_seq(0)
                tokens = [100 + i % 1000 for i in range(n)]
                t0 = time.perf_counter()
                stepper.generate(0, tokens, ReplySpec(1, SamplingParams()))
                prefill_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                size = ctx.seq_state_size(0)  # a park asks for it too: a walk over the cells
                size_s = time.perf_counter() - t0
                for kind, store in (
                    ("ordinary", KvStore(4 * size)),
                    ("page-locked", KvStore(4 * size, pinned=True)),
                ):
                    buf = store.allocate(size)
                    assert buf is not None
                    # llama.cpp's own copies, and nothing else: the reference parks and
                    # restores through the daemon are held to.
                    data = (ctypes.c_uint8 * len(buf)).from_buffer(buf)  # type: ignore[arg-type]
                    llama_cpp.llama_state_seq_get_data(ctx.ptr, data, size, 0)  # pages touched
                    t0 = time.perf_counter()
                    written = llama_cpp.llama_state_seq_get_data(ctx.ptr, data, size, 0)
                    get_s = time.perf_counter() - t0
                    ctx.clear_seq(1)
                    t0 = time.perf_counter()
                    read = llama_cpp.llama_state_seq_set_data(ctx.ptr, data, size, 1)
                    set_s = time.perf_counter() - t0
                    assert written == read == size
                    ctx.clear_seq(1)
                    rows.append(
                        {
                            "tokens": n,
                            "bytes": size,
                            "memory": kind,
                            "get_GBps": size / get_s / GB,
                            "set_GBps": size / set_s / GB,
                            "set_ms": set_s * 1000,
                            "get_ms": get_s * 1000,
                            "size_ms": size_s * 1000,
                            "prefill_ms": prefill_s * 1000,
                        }
                    )
        finally:
            ctx.free()
            registry.release(model)
        return rows

    return engine.call(measure)


async def _daemon_cycle(socket: Path, n_tokens: int) -> dict[str, Any]:
    prompt = " hello" * (n_tokens - 1)
    async with await AsyncClient.connect(socket) as client:
        agent = f"big{n_tokens}"
        await client.register(agent, MODEL, n_ctx=n_tokens + 512)
        first = await client.decode(agent, prompt, max_tokens=1)  # prefill, then park
        await client.decode(agent, " again", max_tokens=1)  # restore, park: buffers warm now
        before = (await client.status())["transfers"]
        third = await client.decode(agent, " more", max_tokens=1)  # restore + park, measured
        after = (await client.status())["transfers"]
        await client.unregister(agent)
    park_bytes = after["park_bytes"] - before["park_bytes"]
    park_s = after["park_s"] - before["park_s"]
    restore_bytes = after["restore_bytes"] - before["restore_bytes"]
    restore_s = third.timings_ms["restore"] / 1000
    return {
        "tokens": n_tokens,
        "prefill_ms": first.timings_ms["prefill"],
        "park_bytes": park_bytes,
        "park_ms": park_s * 1000,
        "park_GBps": park_bytes / park_s / GB if park_s else 0.0,
        "restore_bytes": restore_bytes,
        "restore_ms": restore_s * 1000,
        "restore_GBps": restore_bytes / restore_s / GB if restore_s else 0.0,
    }


async def _stall(socket: Path) -> dict[str, Any]:
    """An agent streams while another (16k tokens) is restored, decoded and parked."""
    async with await AsyncClient.connect(socket) as client:
        await client.register("streamer", SIDE_MODEL, n_ctx=2048)
        await client.register("idle", MODEL, n_ctx=16384)
        await client.decode("idle", " hello" * 15999, max_tokens=1)  # parked after this
        arrivals: list[float] = []
        before = (await client.status())["transfers"]

        async def stream() -> None:
            async for _ in client.stream("streamer", " The quick brown fox", max_tokens=300):
                arrivals.append(time.perf_counter())

        task = asyncio.create_task(stream())
        while len(arrivals) < 50:
            await asyncio.sleep(0.001)
        await client.decode("idle", " again", max_tokens=1)
        await task
        after = (await client.status())["transfers"]
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    return {
        "max_gap_ms": gaps[-1] * 1000,
        "median_gap_ms": gaps[len(gaps) // 2] * 1000,
        "park_ms": (after["park_s"] - before["park_s"]) * 1000,
        "restore_ms": (after["restore_s"] - before["restore_s"]) * 1000,
    }


def run(models_dir: Path, out: Path) -> Report:
    report = Report("parking")
    path = catalog.resolve_model(MODEL, models_dir)
    for row in _raw(path):
        report.rows.append({"part": "raw", **row})
        tag = f"raw {row['tokens']} tokens ({row['bytes'] / 1e6:.0f} MB), {row['memory']}"
        report.add(f"{tag}: get_data", row["get_GBps"], "GB/s")
        report.add(f"{tag}: set_data", row["set_GBps"], "GB/s")
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--park-after-decode")
    with DaemonProcess(*args, verbose=True) as daemon:
        cycles = [asyncio.run(_daemon_cycle(daemon.socket, n)) for n in SIZES]
        stall = asyncio.run(_stall(daemon.socket))
        out.mkdir(parents=True, exist_ok=True)
        (out / "parking-daemon.log").write_text(daemon.log())  # its parks, restores, contexts
    for c in cycles:
        report.rows.append({"part": "daemon", **c})
        big = c["park_bytes"] >= 100e6
        goal = ">= 40 GB/s" if big else ""
        tag = f"daemon {c['tokens']} tokens ({c['park_bytes'] / 1e6:.0f} MB)"
        report.add(
            f"{tag}: park", c["park_GBps"], "GB/s", goal, c["park_GBps"] >= 40 if big else None
        )
        report.add(
            f"{tag}: restore",
            c["restore_GBps"],
            "GB/s",
            goal,
            c["restore_GBps"] >= 40 if big else None,
        )
        report.add(f"{tag}: re-prefill", c["prefill_ms"], "ms")
        report.add(f"{tag}: restore", c["restore_ms"], "ms")
        own = next(
            r
            for r in report.rows
            if r["part"] == "raw" and r["tokens"] == c["tokens"] and r["memory"] == "page-locked"
        )
        for what, daemon_rate, raw_rate in (
            ("park", c["park_GBps"], own["get_GBps"]),
            ("restore", c["restore_GBps"], own["set_GBps"]),
        ):
            share = daemon_rate / raw_rate
            report.add(
                f"{tag}: {what} / llama.cpp's own copy (page-locked), same run",
                100 * share,
                "%",
                ">= 90%" if big else "",
                share >= 0.9 if big else None,
            )
        if c["tokens"] == 16000:
            ratio = c["restore_ms"] / c["prefill_ms"]
            report.add(
                "16,000 tokens: restore time / re-prefill time",
                ratio,
                "x",
                "<= 0.05 (1/20)",
                ratio <= 0.05,
            )
    report.rows.append({"part": "stall", **stall})
    report.add("decoding agent: median gap between tokens", stall["median_gap_ms"], "ms")
    report.add(
        "decoding agent: longest gap while the other was restored/parked", stall["max_gap_ms"], "ms"
    )
    report.add(
        "the other agent's park + restore copies", stall["park_ms"] + stall["restore_ms"], "ms"
    )
    raw = [r for r in report.rows if r["part"] == "raw"]
    report.chart(
        "Sequence state copies (GB/s)",
        [f"{r['tokens']} {r['memory']}" for r in raw] + [f"daemon {c['tokens']}" for c in cycles],
        {
            "save / park": [r["get_GBps"] for r in raw] + [c["park_GBps"] for c in cycles],
            "restore": [r["set_GBps"] for r in raw] + [c["restore_GBps"] for c in cycles],
        },
        "GB/s",
    )
    report.save(out)
    return report
