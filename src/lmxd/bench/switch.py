"""`lmxd bench switch`: time to first token of a parked agent, split into park, restore, prefill.

Two agents share one sequence of the Llama-3.2-1B shape's context (``--max-seqs 1``), each with
about 2,000 tokens of conversation, while agents of the two other models stay resident. Each
DECODE of one parks the other and restores itself; p50 and p99 over 100 switches.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.spawn import DaemonProcess

SWITCHES = 100
CONTEXT = 2000


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _switches(socket: Path) -> list[dict[str, Any]]:
    async with await AsyncClient.connect(socket) as client:
        for name, model in (("side1", "synth-smollm2-360m"), ("side2", "synth-qwen2-0.5b")):
            await client.register(name, model, n_ctx=1024)
            await client.decode(name, " hello", max_tokens=2)  # resident from now on
        for name in ("A", "B"):
            await client.register(name, "synth-llama3.2-1b", n_ctx=4096)
            await client.decode(name, " hello" * CONTEXT, max_tokens=1)
        rows = []
        for i in range(SWITCHES + 2):
            r = await client.decode("AB"[i % 2], " next", max_tokens=1)
            if i >= 2:  # the first two warm the buffers
                t = r.timings_ms
                rows.append(
                    {
                        **t,
                        "ttft": t["queued"] + t["park"] + t["restore"] + t["prefill"],
                        "restored": r.restored,
                        "parked": r.parked,
                    }
                )
    return rows


def run(models_dir: Path, out: Path) -> Report:
    report = Report("switch")
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", "1")
    with DaemonProcess(*args, verbose=True) as daemon:
        rows = asyncio.run(_switches(daemon.socket))
        out.mkdir(parents=True, exist_ok=True)
        (out / "switch-daemon.log").write_text(daemon.log())  # its parks, restores, contexts
    report.rows = rows
    report.add(
        "switches that parked one agent and restored the other",
        sum(1 for r in rows if r["restored"] and r["parked"]),
        "of 100",
    )
    parts = ("park", "restore", "prefill", "ttft")
    for part in parts:
        values = [r[part] for r in rows]
        report.add(f"{part} p50", _pct(values, 50), "ms")
        report.add(f"{part} p99", _pct(values, 99), "ms")
    report.chart(
        "Switching to a parked agent (ms)",
        list(parts),
        {
            "p50": [_pct([r[p] for r in rows], 50) for p in parts],
            "p99": [_pct([r[p] for r in rows], 99) for p in parts],
        },
        "ms",
    )
    report.save(out)
    return report
