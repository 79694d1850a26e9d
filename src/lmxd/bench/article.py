"""`lmxd bench article`: the article's experiment, both sides, on this card.

lmxd: one daemon that behaves as an 8 GiB card serves three models with an agent each,
concurrently; its process's device bytes are sampled through NVML all along (goal: the peak
stays under the cap). Naive: three separate processes, each loading one model the way the
article did (all layers on the GPU, n_ctx 172,032, n_batch 8192, llama.cpp's defaults
otherwise); what each allocates, and the total against 8 GiB.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmxd import catalog
from lmxd.bench.gpu import PeakSampler
from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.spawn import DaemonProcess
from lmxd.units import GiB, MiB, parse_bytes

MODELS = ("synth-smollm2-360m", "synth-qwen2-0.5b", "synth-llama3.2-1b")
ARTICLE_N_CTX = 172_032
ARTICLE_N_BATCH = 8192


async def _serve_three(socket: Path) -> dict[str, Any]:
    async with await AsyncClient.connect(socket) as client:
        for i, model in enumerate(MODELS):
            await client.register(f"agent{i}", model, n_ctx=8192)
        t0 = time.perf_counter()
        replies = []
        for _ in range(3):
            replies += await asyncio.gather(
                *(
                    client.decode(f"agent{i}", " The quick brown fox" * 50, max_tokens=128)
                    for i in range(len(MODELS))
                )
            )
        wall = time.perf_counter() - t0
        status = await client.status()
    return {
        "generated": sum(r.generated_tokens for r in replies),
        "wall_s": wall,
        "ledger": status["ledger"],
    }


def _naive_child(path: Path) -> dict[str, Any]:
    """In a fresh process: load like the article (llama.cpp defaults) and report."""
    import llama_cpp

    from lmxd.engine.runtime import Engine
    from lmxd.memory.device import probe_device

    engine = Engine.get()

    def load() -> int:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = -1
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch = ARTICLE_N_CTX, ARTICLE_N_BATCH
        ctx = llama_cpp.llama_init_from_model(model, cp)
        ok = bool(model) and bool(ctx)
        used = probe_device().process_used
        if ctx:
            llama_cpp.llama_free(ctx)
        if model:
            llama_cpp.llama_model_free(model)
        return used if ok else -1

    nvml, buffers = engine.measure(load)
    return {
        "model": path.stem,
        "nvml_bytes": nvml,
        "device_buffers": buffers.parts(True),
        "host_buffers": buffers.parts(False),
    }


def run(models_dir: Path, out: Path, limit: str = "8GiB") -> Report:
    report = Report("article")
    cap = int(parse_bytes(limit) * 0.9)
    with (
        DaemonProcess(
            "--vram-limit", limit, "--models-dir", str(models_dir), "--keep-alive", "0"
        ) as daemon,
        PeakSampler(daemon.pid) as sampler,
    ):
        served = asyncio.run(_serve_three(daemon.socket))
    report.rows.append(
        {
            "side": "lmxd",
            "peak_nvml_bytes": sampler.peak,
            "cap": cap,
            "samples": sampler.samples,
            **served,
        }
    )
    report.add("lmxd: three models served concurrently, tokens", served["generated"], "tokens")
    report.add("lmxd: ledger cap (90% of the 8 GiB card)", cap / MiB, "MiB")
    report.add("lmxd: ledger reserved at the end", served["ledger"]["reserved"] / MiB, "MiB")
    report.add(
        f"lmxd: peak device bytes, NVML ({sampler.samples} samples)",
        sampler.peak / MiB,
        "MiB",
        f"< cap {cap / MiB:,.0f} MiB",
        sampler.peak < cap if sampler.available else None,
    )
    total = 0
    for name in MODELS:
        path = catalog.resolve_model(name, models_dir)
        cmd = [sys.executable, "-m", "lmxd.bench.article", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            report.rows.append({"side": "naive", "model": name, "error": done.stderr[-2000:]})
            report.add(f"naive {name}: FAILED", 0, "MiB")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        report.rows.append({"side": "naive", **row})
        device = sum(row["device_buffers"].values())
        total += row["nvml_bytes"]
        report.add(f"naive {name}: llama.cpp device buffers", device / MiB, "MiB")
        report.add(f"naive {name}: NVML, process", row["nvml_bytes"] / MiB, "MiB")
    report.add(
        "naive: three processes together (NVML)",
        total / MiB,
        "MiB",
        "vs an 8 GiB card",
        total <= 8 * GiB,
    )
    labels = [
        "lmxd peak (3 models)",
        *[f"naive {m.removeprefix('synth-')}" for m in MODELS],
        "naive total",
    ]
    naive = [r.get("nvml_bytes", 0) / MiB for r in report.rows if r["side"] == "naive"]
    report.chart(
        "Device memory: lmxd vs one process per agent (MiB)",
        labels,
        {"MiB": [sampler.peak / MiB, *naive, total / MiB]},
        "MiB",
    )
    report.save(out)
    return report


if __name__ == "__main__":
    print(json.dumps(_naive_child(Path(sys.argv[1]))))
