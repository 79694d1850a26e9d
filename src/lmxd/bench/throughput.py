"""`lmxd bench throughput`: aggregate decode tokens/s through the daemon against raw llama.cpp.

Raw: the engine layer driven in this process, one sequence, then eight in one batch, greedy.
Daemon: 1, 4, 8 and 16 agents of one model decoding at once; then 3 models x 3 agents, where
no agent should fall below half the mean rate.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from lmxd import catalog
from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.engine.context import Context, ContextParams
from lmxd.engine.generate import Generation, prefill
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.engine.sampling import SamplingParams
from lmxd.spawn import DaemonProcess

MODEL = "synth-llama3.2-1b"
THREE = ("synth-smollm2-360m", "synth-qwen2-0.5b", "synth-llama3.2-1b")
TOKENS = 256
PROMPT = " The quick brown fox jumps over the lazy dog"


def _raw(path: Path, n_seq: int) -> float:
    engine = Engine.get()

    def measure() -> float:
        registry = ModelRegistry(engine)
        model = registry.acquire(path)
        ctx = Context(model, ContextParams(n_ctx=1024 * n_seq, n_seq_max=n_seq))
        try:
            prompt = model.tokenize(PROMPT)
            gens = []
            for s in range(n_seq):
                out = prefill(ctx, s, prompt)
                gens.append((Generation(ctx, s, TOKENS, SamplingParams()), out))
            outs = {s: out for s, (_, out) in enumerate(gens)}
            t0 = time.perf_counter()
            produced = 0
            live = [g for g, _ in gens]
            while live:
                for g in live:
                    g.sample(outs[g.seq_id])
                    produced += 1
                live = [g for g in live if not g.done]
                if live:
                    outs = ctx.decode([g.next_input() for g in live])
            return produced / (time.perf_counter() - t0)
        finally:
            ctx.free()
            registry.release(model)

    return engine.call(measure)


async def _daemon(socket: Path, models: list[str]) -> list[dict[str, Any]]:
    async with await AsyncClient.connect(socket) as client:
        for i, model in enumerate(models):
            await client.register(f"a{i}", model, n_ctx=1024)
        # warm-up: contexts opened, graphs built
        await asyncio.gather(
            *(client.decode(f"a{i}", PROMPT, max_tokens=4) for i in range(len(models)))
        )
        for i in range(len(models)):
            await client.reset(f"a{i}")
        t0 = time.perf_counter()
        replies = await asyncio.gather(
            *(client.decode(f"a{i}", PROMPT, max_tokens=TOKENS) for i in range(len(models)))
        )
        wall = time.perf_counter() - t0
        for i in range(len(models)):
            await client.unregister(f"a{i}")
    return [
        {
            "agent": f"a{i}",
            "model": m,
            "tokens": r.generated_tokens,
            "wall_s": wall,
            "rate": r.generated_tokens / (r.timings_ms["total"] / 1000),
        }
        for i, (m, r) in enumerate(zip(models, replies, strict=True))
    ]


def run(models_dir: Path, out: Path) -> Report:
    report = Report("throughput")
    path = catalog.resolve_model(MODEL, models_dir)
    raw1, raw8 = _raw(path, 1), _raw(path, 8)
    report.add("raw llama.cpp, 1 sequence", raw1, "tok/s")
    report.add("raw llama.cpp, 8 sequences in one batch", raw8, "tok/s")
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", "16")
    daemon_rates = {}
    with DaemonProcess(*args) as daemon:
        for n in (1, 4, 8, 16):
            rows = asyncio.run(_daemon(daemon.socket, [MODEL] * n))
            rate = sum(r["tokens"] for r in rows) / rows[0]["wall_s"]
            daemon_rates[n] = rate
            report.rows.append({"agents": n, "aggregate": rate, "per_agent": rows})
            goal, met = "", None
            if n == 1:
                goal, met = f">= 95% of raw ({0.95 * raw1:,.0f})", rate >= 0.95 * raw1
            if n == 8:
                goal, met = f">= 90% of raw batched ({0.9 * raw8:,.0f})", rate >= 0.9 * raw8
            report.add(f"daemon, {n} agents of one model, aggregate", rate, "tok/s", goal, met)
        rows = asyncio.run(_daemon(daemon.socket, [m for m in THREE for _ in range(3)]))
    rates = [r["rate"] for r in rows]
    mean = statistics.mean(rates)
    report.rows.append({"agents": "3x3", "per_agent": rows})
    report.add(
        "3 models x 3 agents: aggregate",
        sum(r["tokens"] for r in rows) / rows[0]["wall_s"],
        "tok/s",
    )
    report.add(
        "3 models x 3 agents: slowest agent / mean",
        min(rates) / mean,
        "x",
        ">= 0.5",
        min(rates) >= 0.5 * mean,
    )
    report.meta["raw"] = {"1": raw1, "8": raw8}
    report.chart(
        f"Decode throughput, {MODEL} (tok/s)",
        ["1", "4", "8", "16"],
        {"daemon": [daemon_rates[n] for n in (1, 4, 8, 16)], "raw": [raw1, 0.0, raw8, 0.0]},
        "tok/s",
    )
    report.save(out)
    return report
