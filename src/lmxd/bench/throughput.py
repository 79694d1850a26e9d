"""`lmxd bench throughput`: aggregate decode tokens/s through the daemon against the card.

The reference is ``llama_decode`` alone over the same batch, measured in this run: B sequences
of one context, one token each per step, the batch filled once and only its positions moved,
the logits read after each step (which waits for the device), and nothing else. The daemon
then serves B agents of the same model, each decoding TOKENS tokens at once; its figure is
the tokens of all replies over the time from the requests to the last reply (prefill
included), for greedy decoding and for temperature 0.8 / top-k 40 / top-p 0.95; then greedy
again under ``--deterministic`` (one agent per step), for what that costs.

With a GPU: the Llama-3.2-1B shape at 1, 8, 16, 32 and 64 agents (goals: 1 agent >= 90% of
the reference, 8 to 32 >= 85%, 64 >= 75%; the aggregate grows from 8 to 64 agents), then
3 models x 3 agents, where no agent should fall below half the mean rate. On a CPU build:
SmolLM2-135M at 1 and 4 agents (goals: >= 90% and >= 85%).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from lmxd import catalog
from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.spawn import DaemonProcess

GPU_MODEL, GPU_AGENTS = "synth-llama3.2-1b", (1, 8, 16, 32, 64)
CPU_MODEL, CPU_AGENTS = "smollm2-135m", (1, 4)
THREE = ("synth-smollm2-360m", "synth-qwen2-0.5b", "synth-llama3.2-1b")
TOKENS = 256
N_CTX = 1024  # per agent: the prompt and TOKENS fit
PROMPT = " 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a list a model goes on with: no early EOS
HOT = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
SAMPLINGS: dict[str, dict[str, Any] | None] = {"greedy": None, "t=0.8 top-k 40 top-p 0.95": HOT}


def reference(path: Path, n_seq: int, threads: int = 0, steps: int = TOKENS) -> float:
    """Tokens/s of ``llama_decode`` alone: n_seq sequences, one token each per step, over
    ``steps`` steps (``threads``: a fixed CPU thread count; 0, lmxd's default)."""
    engine = Engine.get()

    def measure() -> float:
        registry = ModelRegistry(engine)
        model = registry.acquire(path)
        ctx = Context(model, ContextParams(n_ctx=N_CTX, n_seq_max=n_seq, n_threads=threads))
        batch = llama_cpp.llama_batch_init(n_seq, 0, 1)
        try:
            prompt = model.tokenize(PROMPT)
            n = len(prompt)
            for s in range(n_seq):  # the prompts, one sequence at a time (not timed)
                ctx.decode([s] * n, prompt, list(range(n)), [0] * n)
            for i in range(n_seq):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = prompt[-1], n, 1
                batch.seq_id[i][0], batch.logits[i] = i, 1
            batch.n_tokens = n_seq
            pos = np.ctypeslib.as_array(batch.pos, shape=(n_seq,))
            t0 = time.perf_counter()
            for _ in range(steps):
                if llama_cpp.llama_decode(ctx.ptr, batch) != 0:
                    raise RuntimeError("llama_decode failed in the reference run")
                llama_cpp.llama_get_logits(ctx.ptr)  # waits for the step, as reading does
                pos += 1
            return n_seq * steps / (time.perf_counter() - t0)
        finally:
            llama_cpp.llama_batch_free(batch)
            ctx.free()
            registry.release(model)

    return engine.call(measure)


async def _daemon(
    socket: Path, models: list[str], sampling: dict[str, Any] | None
) -> list[dict[str, Any]]:
    async with await AsyncClient.connect(socket) as client:
        for i, model in enumerate(models):
            await client.register(f"a{i}", model, n_ctx=N_CTX)
        # warm-up, the timed requests once: contexts opened in the shape the timed run
        # needs (streams are sized by use), graphs built, device sampler chains attached
        await asyncio.gather(
            *(
                client.decode(f"a{i}", PROMPT, max_tokens=TOKENS, sampling=sampling)
                for i in range(len(models))
            )
        )
        for i in range(len(models)):
            await client.reset(f"a{i}")
        t0 = time.perf_counter()
        replies = await asyncio.gather(
            *(
                client.decode(f"a{i}", PROMPT, max_tokens=TOKENS, sampling=sampling)
                for i in range(len(models))
            )
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


def _goal(n: int, gpu: bool) -> float:
    if n == 1:
        return 0.90
    if gpu:
        return 0.75 if n >= 64 else 0.85
    return 0.85


def run(models_dir: Path, out: Path) -> Report:
    report = Report("throughput")
    gpu = Engine.get().gpu_offload
    model, counts = (GPU_MODEL, GPU_AGENTS) if gpu else (CPU_MODEL, CPU_AGENTS)
    path = catalog.resolve_model(model, models_dir)
    alone = {n: reference(path, n) for n in counts}
    for n in counts:
        report.add(f"llama_decode alone, {n} sequences", alone[n], "tok/s")
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", str(max(counts)))
    rates: dict[str, dict[int, float]] = {}
    with DaemonProcess(*args) as daemon:
        for label, sampling in SAMPLINGS.items():
            rates[label] = {}
            for n in counts:
                rows = asyncio.run(_daemon(daemon.socket, [model] * n, sampling))
                rate = sum(r["tokens"] for r in rows) / rows[0]["wall_s"]
                rates[label][n] = rate
                report.rows.append(
                    {"sampling": label, "agents": n, "aggregate": rate, "per_agent": rows}
                )
                share = _goal(n, gpu)
                report.add(
                    f"daemon, {n} agents, {label}: share of llama_decode alone",
                    100 * rate / alone[n],
                    "%",
                    f">= {share:.0%} ({rate:,.0f} of {alone[n]:,.0f} tok/s)",
                    rate >= share * alone[n],
                )
            if gpu:
                report.add(
                    f"daemon, {label}: aggregate at 64 agents / at 8",
                    rates[label][64] / rates[label][8],
                    "x",
                    "> 1 (keeps growing)",
                    all(
                        rates[label][a] < rates[label][b] for a, b in ((8, 16), (16, 32), (32, 64))
                    ),
                )
        if gpu:
            rows = asyncio.run(_daemon(daemon.socket, [m for m in THREE for _ in range(3)], None))
            per_agent = [r["rate"] for r in rows]
            mean = statistics.mean(per_agent)
            report.rows.append({"agents": "3x3", "per_agent": rows})
            report.add(
                "3 models x 3 agents: aggregate",
                sum(r["tokens"] for r in rows) / rows[0]["wall_s"],
                "tok/s",
            )
            report.add(
                "3 models x 3 agents: slowest agent / mean",
                min(per_agent) / mean,
                "x",
                ">= 0.5",
                min(per_agent) >= 0.5 * mean,
            )
    # What --deterministic costs: one agent per step, so agents no longer share steps.
    rates["greedy, --deterministic"] = {}
    with DaemonProcess(*args, "--deterministic") as daemon:
        for n in counts:
            rows = asyncio.run(_daemon(daemon.socket, [model] * n, None))
            rate = sum(r["tokens"] for r in rows) / rows[0]["wall_s"]
            rates["greedy, --deterministic"][n] = rate
            report.rows.append(
                {"sampling": "greedy, --deterministic", "agents": n, "aggregate": rate}
            )
            report.add(
                f"daemon --deterministic, {n} agents, greedy: share of llama_decode alone",
                100 * rate / alone[n],
                "%",
            )
    report.meta["reference"] = {str(n): alone[n] for n in counts}
    report.meta["model"] = model
    series = {"llama_decode alone": [alone[n] for n in counts]}
    series.update({f"daemon, {label}": [rates[label][n] for n in counts] for label in rates})
    report.chart(f"Decode throughput, {model} (tok/s)", [str(n) for n in counts], series, "tok/s")
    report.save(out)
    return report
