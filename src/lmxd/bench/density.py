"""`lmxd bench density`: how many agents one 8 GiB card serves at once, and parking's rotation.

One daemon at ``--vram-limit 8GiB`` with the three article shapes; N agents (12, 24, 48, 96,
192) registered round-robin over the models at n_ctx 4,096, and every one decodes 128 tokens
at once (temperature 0.8, top-k 40, top-p 0.95). Per N: agents served, refusals, aggregate
tokens/s and the slowest and median agent's (its tokens over the time from its request to its
reply), NVML's peak for the daemon against the cap. Then 200 more agents take turns (a
daemon of 4 sequences per model, so that they must): each decodes a turn (greedy) and goes
idle, the others push it out to host RAM, and its second turn must resume its own
conversation (restored from host RAM, the first turn's tokens found in KV). Goals: 96 agents
with every one >= 25 tok/s, 48 with every one >= 60 tok/s, NVML under the cap, all 200
resumed.

On a CPU build (no shapes to spare a card for) it runs smaller, to check its own workings:
the two real models, 4 and 8 agents, 16 rotating ones, no goals.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from lmxd.bench.gpu import PeakSampler
from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.engine.runtime import Engine
from lmxd.errors import LmxdError
from lmxd.spawn import DaemonProcess
from lmxd.units import parse_bytes

MiB = 1 << 20
LIMIT = "8GiB"
GPU_MODELS = ("synth-smollm2-360m", "synth-qwen2-0.5b", "synth-llama3.2-1b")
GPU_COUNTS, GPU_ROTATING = (12, 24, 48, 96, 192), 200
CPU_MODELS = ("smollm2-135m", "gemma3-270m")
CPU_COUNTS, CPU_ROTATING = (4, 8), 16
N_CTX = 4096
TOKENS = 128
HOT = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
GOALS = {96: 25.0, 48: 60.0}  # agents: the slowest agent's tokens/s at least


async def _at_once(socket: Path, models: tuple[str, ...], n: int) -> dict[str, Any]:
    names = [f"d{n}-{i}" for i in range(n)]
    async with await AsyncClient.connect(socket) as client:
        refused: list[str] = []
        registered = []
        for i, name in enumerate(names):
            try:
                await client.register(name, models[i % len(models)], n_ctx=N_CTX)
                registered.append(name)
            except LmxdError as exc:
                refused.append(exc.code)

        async def turn(name: str) -> tuple[int, float] | str:
            t0 = time.perf_counter()
            try:
                r = await client.decode(
                    name, f" Agent {name} says:", max_tokens=TOKENS, sampling=HOT
                )
            except LmxdError as exc:
                return exc.code
            return r.generated_tokens, time.perf_counter() - t0

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(turn(name) for name in registered))
        wall = time.perf_counter() - t0
        for name in registered:
            await client.unregister(name)
    served = [o for o in outcomes if not isinstance(o, str)]
    refused += [o for o in outcomes if isinstance(o, str)]
    rates = sorted(tokens / seconds for tokens, seconds in served)
    return {
        "agents": n,
        "served": len(served),
        "refused": refused,
        "aggregate": sum(tokens for tokens, _ in served) / wall,
        "slowest": rates[0] if rates else 0.0,
        "median": statistics.median(rates) if rates else 0.0,
    }


async def _rotation(socket: Path, models: tuple[str, ...], n: int) -> dict[str, Any]:
    names = [f"r{i}" for i in range(n)]
    async with await AsyncClient.connect(socket) as client:
        for i, name in enumerate(names):
            await client.register(name, models[i % len(models)], n_ctx=N_CTX)
        first = {
            name: await client.decode(name, f" Agent {name}:", max_tokens=16) for name in names
        }
        resumed = 0
        for name in names:
            second = await client.decode(name, " And then", max_tokens=16)
            held = first[name].prompt_tokens + first[name].generated_tokens
            # Restored, and every token of the first turn that was in KV found there (the
            # last token sampled is decoded with the second turn's prompt).
            resumed += int(second.restored and second.cached_tokens >= held - 1)
        status = await client.status()
        for name in names:
            await client.unregister(name)
    return {"agents": n, "resumed": resumed, "parks": status["transfers"]["parks"]}


def run(models_dir: Path, out: Path) -> Report:
    report = Report("density")
    gpu = Engine.get().gpu_offload
    models, counts, rotating = (
        (GPU_MODELS, GPU_COUNTS, GPU_ROTATING) if gpu else (CPU_MODELS, CPU_COUNTS, CPU_ROTATING)
    )
    cap = int(parse_bytes(LIMIT) * 0.9)
    args = ("--vram-limit", LIMIT, "--models-dir", str(models_dir), "--keep-alive", "0")
    seqs = ("--max-seqs", str(-(-max(counts) // len(models))))
    with DaemonProcess(*args, *seqs) as daemon, PeakSampler(daemon.pid) as sampler:
        rows = [asyncio.run(_at_once(daemon.socket, models, n)) for n in counts]
    with DaemonProcess(*args, "--max-seqs", "4") as daemon:
        rotation = asyncio.run(_rotation(daemon.socket, models, rotating))
    for row in rows:
        n = row["agents"]
        report.rows.append(row)
        report.add(f"{n} agents: served at once", row["served"], "agents")
        report.add(f"{n} agents: refused", len(row["refused"]), "agents")
        report.add(f"{n} agents: aggregate", row["aggregate"], "tok/s")
        report.add(f"{n} agents: median agent", row["median"], "tok/s")
        goal = GOALS.get(n) if gpu else None
        report.add(
            f"{n} agents: slowest agent",
            row["slowest"],
            "tok/s",
            f"every one >= {goal:.0f}, all served" if goal else "",
            row["slowest"] >= goal and row["served"] == n if goal else None,
        )
    report.rows.append({"rotation": rotation})
    report.add(
        f"{rotating} rotating agents: second turns resumed from host RAM",
        rotation["resumed"],
        "agents",
        f"all {rotating}" if gpu else "",
        rotation["resumed"] == rotating if gpu else None,
    )
    if sampler.available:
        report.add(
            f"NVML peak, daemon ({sampler.samples} samples)",
            sampler.peak / MiB,
            "MiB",
            f"< cap {cap / MiB:,.0f} MiB",
            sampler.peak < cap,
        )
    report.meta.update({"models": list(models), "cap": cap, "nvml_peak": sampler.peak})
    report.chart(
        "Agents decoding at once under an 8 GiB limit (tok/s)",
        [str(r["agents"]) for r in rows],
        {
            "slowest agent": [r["slowest"] for r in rows],
            "median agent": [r["median"] for r in rows],
        },
        "tok/s",
    )
    report.save(out)
    return report
