"""`lmxd bench offload`: a model larger than its budget, served with the layers that fit.

The Llama-3.2-1B shape under budgets of 100, 75, 50, 25 and 0% of its full-offload need:
between the least a CUDA daemon can hold the model with (the CUDA overhead and the compute
buffer of a model with no layer on the device) and what it needs whole (its weights, one
context of N_CTX cells and that overhead: the estimator's figures, as the ledger counts them),
each with MARGIN for what CUDA holds beyond the ledger.
At each budget a daemon with ``--vram-limit`` set to it (``--vram-cap-percent 100``) places
the layers itself; one agent prefills PROMPT (3,999 tokens) and decodes
TOKENS greedy. Figures: the layers placed, prefill and decode tokens/s against full offload
and against CPU only, the NVML peak against the cap, and whether the greedy text is the full
offload's.

Then the budget for n_layer / 2 of the layers (with MARGIN: the daemon may place one more, and
the figures say how many) with llama.cpp's op_offload on and off: the goal for decode is >=
1.5x CPU only, for prefill with the host layers' weights streamed to the GPU (on) >= 1.3x
without (off). The seed's baseline, copy-then-compute, is measured in the same run: the host
layers' weights copied to the device with cudaMemcpy from pageable memory (as llama.cpp's
mapped weights are), plus the prefill at full offload. CPU only is a daemon that sees no GPU
(CUDA_VISIBLE_DEVICES empty).
"""

from __future__ import annotations

import asyncio
import ctypes
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
from lmxd.memory.estimator import CUDA_OVERHEAD, Backend, estimate, weight_bytes
from lmxd.modelfile import ModelInfo, read_model_info
from lmxd.spawn import DaemonProcess
from lmxd.units import MiB

MODEL = "synth-llama3.2-1b"
SHARES = (100, 75, 50, 25, 0)  # % of the way from the least budget to the full need
TOKENS = 128
N_CTX = 8192
# Room for what the device may hold beyond the ledger's figures (charged as ``unaccounted``
# once seen): a cap exactly at the estimate would leave the model no room for it.
MARGIN = 64 * MiB
# 3,999 tokens (each run reports its count), after which the synthetic model goes on for all
# TOKENS greedy (after a prompt of the numbers 1 to 1,400 it ended its reply at once)
PROMPT = " 1, 2, 3, 4, 5, 6, 7, 8, 9, 10," * 129
WARM_UP = " 1, 2, 3,"


def budget_for(info: ModelInfo, n_gpu_layers: int) -> int:
    """A cap for the model with ``n_gpu_layers`` on the GPU: its weights there, one context of
    N_CTX and the CUDA overhead, as the ledger charges them, and MARGIN."""
    est = estimate(info, N_CTX, backend=Backend.CUDA, n_gpu_layers=n_gpu_layers)
    return est.weights + est.kv + est.compute + CUDA_OVERHEAD + MARGIN


async def _serve(socket: Path) -> dict[str, Any]:
    """One agent: a warm-up turn (graphs built), then the timed prompt and reply."""
    async with await AsyncClient.connect(socket) as client:
        registered = await client.register("a", MODEL, n_ctx=N_CTX)
        await client.decode("a", WARM_UP, max_tokens=4)
        await client.reset("a")
        reply = await client.decode("a", PROMPT, max_tokens=TOKENS)
        models = await client.models()
    timings = reply.timings_ms
    return {
        "n_gpu_layers": models[0]["n_gpu_layers"],
        "layers": models[0]["layers"],
        "estimated_speed": registered["estimated_speed"],
        "prompt_tokens": reply.prompt_tokens,
        "generated": reply.generated_tokens,
        "prefill_tok_s": reply.prompt_tokens / (timings["prefill"] / 1000),
        "decode_tok_s": reply.generated_tokens / (timings["decode"] / 1000),
        "text": reply.text,
    }


def _run(models_dir: Path, budget: int | None, *flags: str, cpu: bool = False) -> dict[str, Any]:
    """A daemon at ``budget`` bytes (None: the device's own size), its run, its NVML peak."""
    args = ["--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", "1"]
    if budget is not None:
        args += ["--vram-limit", f"{budget}B", "--vram-cap-percent", "100"]
    env = {"CUDA_VISIBLE_DEVICES": ""} if cpu else None
    with DaemonProcess(*args, *flags, env=env) as daemon, PeakSampler(daemon.pid) as sampler:
        row = asyncio.run(_serve(daemon.socket))
    return row | {"budget": budget, "peak": sampler.peak, "flags": list(flags)}


def measure_copy(nbytes: int) -> float:
    """Seconds cudaMemcpy takes to copy ``nbytes`` from pageable host memory to the device
    (the best of three), in this process (a child: the parent holds NVML)."""
    cudart = None
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13"):
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if cudart is None:
        raise RuntimeError("no libcudart to measure the copy with")
    device = ctypes.c_void_p()
    if cudart.cudaMalloc(ctypes.byref(device), ctypes.c_size_t(nbytes)) != 0:
        raise RuntimeError("cudaMalloc failed")
    host = (ctypes.c_char * nbytes)()
    ctypes.memset(host, 1, nbytes)  # the pages exist, as a mapped file's read ones do
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        if cudart.cudaMemcpy(device, host, ctypes.c_size_t(nbytes), 1) != 0:  # host to device
            raise RuntimeError("cudaMemcpy failed")
        best = min(best, time.perf_counter() - t0)
    cudart.cudaFree(device)
    return best


def _copy_seconds(nbytes: int) -> float:
    code = f"from lmxd.bench.offload import measure_copy; print(measure_copy({nbytes}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return float(out.stdout.strip().splitlines()[-1])


def run(models_dir: Path, out: Path) -> Report:
    report = Report("offload")
    info = read_model_info(catalog.resolve_model(MODEL, models_dir))
    layers = info.n_layer + 1
    least, full_need = budget_for(info, 0), budget_for(info, layers)
    report.meta.update(model=MODEL, least_budget=least, full_need=full_need, layers=layers)
    rows: dict[str, dict[str, Any]] = {}
    for share in SHARES:
        budget = least + (full_need - least) * share // 100
        rows[f"{share}%"] = _run(models_dir, budget)
    half = info.n_layer // 2
    rows["half"] = _run(models_dir, budget_for(info, half))
    rows["half, no op_offload"] = _run(models_dir, budget_for(info, half), "--no-op-offload")
    rows["cpu only"] = _run(models_dir, None, cpu=True)
    full, cpu = rows["100%"], rows["cpu only"]
    for name, row in rows.items():
        report.rows.append({"run": name, **{k: v for k, v in row.items() if k != "text"}})
    report.add("prompt tokens (each run)", full["prompt_tokens"], "tokens")
    for share in SHARES:
        row = rows[f"{share}%"]
        budget = row["budget"]
        report.add(
            f"{share}% budget ({budget / 2**20:,.0f} MiB): layers on the GPU",
            row["n_gpu_layers"],
            f"of {layers}",
        )
        report.add(f"{share}%: decode, {row['generated']} tokens", row["decode_tok_s"], "tok/s")
        report.add(f"{share}%: prefill", row["prefill_tok_s"], "tok/s")
        for what, key in (("decode", "decode_tok_s"), ("prefill", "prefill_tok_s")):
            report.add(f"{share}%: {what} / full offload", row[key] / full[key], "x")
            report.add(f"{share}%: {what} / cpu only", row[key] / cpu[key], "x")
        report.add(f"{share}%: decode / full offload, estimated", row["estimated_speed"], "x")
        report.add(
            f"{share}%: NVML peak",
            row["peak"] / 2**20,
            "MiB",
            f"< cap {budget / 2**20:,.0f} MiB",
            row["peak"] < budget,
        )
        report.add(
            f"{share}%: greedy text identical to full offload",
            float(row["text"] == full["text"]),
            "bool",
        )
    on, off = rows["half"], rows["half, no op_offload"]
    report.add(
        f"half ({on['n_gpu_layers']} of {layers}): decode / cpu only",
        on["decode_tok_s"] / cpu["decode_tok_s"],
        "x",
        ">= 1.5",
        on["decode_tok_s"] >= 1.5 * cpu["decode_tok_s"],
    )
    report.add(
        "half: prefill with op_offload / without",
        on["prefill_tok_s"] / off["prefill_tok_s"],
        "x",
        ">= 1.3",
        on["prefill_tok_s"] >= 1.3 * off["prefill_tok_s"],
    )
    _, host_bytes = weight_bytes(info, Backend.CUDA, half)
    copy_s = _copy_seconds(host_bytes)
    copy_then_compute = full["prompt_tokens"] / (
        copy_s + full["prompt_tokens"] / full["prefill_tok_s"]
    )
    report.rows.append({"run": "copy-then-compute", "host_bytes": host_bytes, "copy_s": copy_s})
    report.add(
        f"copy of the host layers' weights ({host_bytes / 2**20:,.0f} MiB), pageable",
        host_bytes / copy_s / 1e9,
        "GB/s",
    )
    report.add(
        "half: prefill with op_offload / copy-then-compute",
        on["prefill_tok_s"] / copy_then_compute,
        "x",
    )
    report.chart(
        f"{MODEL}: decode by budget (tok/s)",
        [f"{s}%" for s in SHARES] + ["cpu only"],
        {"decode": [rows[f"{s}%"]["decode_tok_s"] for s in SHARES] + [cpu["decode_tok_s"]]},
        "tok/s",
    )
    report.save(out)
    (out / "offload-texts.json").write_text(
        json.dumps({name: row["text"] for name, row in rows.items()}, indent=1)
    )
    return report
