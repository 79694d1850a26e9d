"""`lmxd bench devices`: agents spread over two GPUs against the same agents on one.

Two model files of the Llama-3.2-1B shape (the synthetic one, and a copy of it under another
name: a file is loaded once, on one device), AGENTS agents of each, each decoding TOKENS
tokens greedy at once. Under ``--devices 0`` both models share GPU 0 and take turns a slice
at a time; over both GPUs the placement puts one model on each, and their slices run at the
same time. Goal: the aggregate over two GPUs >= 1.8x the aggregate over one; each model's
memory is on the device STATUS places it on (NVML per device); each device's NVML peak stays
under its cap. Greedy texts: identical under ``--deterministic`` (DET_AGENTS agents of each
model, one or two GPUs); the batched runs above are compared too, for information: there an
agent's text may fork where llama.cpp's kernels differ by batch size (``lmxd bench forks``),
and the two runs admit agents in other groups.

Then the article's three models (the SmolLM2-360M, Qwen2-0.5B and Llama-3.2-1B shapes) with
three agents each over both GPUs: where each model went, every device's peak against its cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from lmxd import catalog
from lmxd.bench.gpu import PeakSampler
from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.memory.device import probe_devices
from lmxd.spawn import DaemonProcess

MODEL = "synth-llama3.2-1b"
TWIN = "synth-llama3.2-1b-twin"  # the same weights under another name: a second model
THREE = ("synth-smollm2-360m", "synth-qwen2-0.5b", "synth-llama3.2-1b")
AGENTS = 32  # per model
DET_AGENTS = 4  # per model, under --deterministic
TOKENS = 256
ROUNDS = 3  # timed rounds; the median is reported
N_CTX = 1024
PROMPT = " 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


async def _decode_all(
    socket: Path, models: list[str], tokens: int = TOKENS
) -> tuple[float, list[str], dict[str, Any]]:
    """Every agent of ``models`` (one per entry) decodes TOKENS at once, after a warm-up of
    the same shape, ROUNDS times: the median aggregate tokens/s (one round is about two
    seconds, and rounds vary by up to 10%), each agent's text in the first round, and STATUS
    at the end."""
    async with await AsyncClient.connect(socket) as client:
        for i, model in enumerate(models):
            await client.register(f"a{i}", model, n_ctx=N_CTX)

        async def everyone() -> list[Any]:
            return await asyncio.gather(
                *(client.decode(f"a{i}", PROMPT, max_tokens=tokens) for i in range(len(models)))
            )

        async def reset() -> None:
            for i in range(len(models)):
                await client.reset(f"a{i}")

        await everyone()
        await reset()
        rates: list[float] = []
        texts: list[str] = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            replies = await everyone()
            rates.append(sum(r.generated_tokens for r in replies) / (time.perf_counter() - t0))
            texts = texts or [r.text for r in replies]
            await reset()
        status = await client.status()
        for i in range(len(models)):
            await client.unregister(f"a{i}")
    return statistics.median(rates), texts, status


def _run_daemon(
    models_dir: Path, models: list[str], *flags: str, tokens: int = TOKENS
) -> tuple[float, list[str], dict[str, Any], list[int]]:
    """A daemon with ``flags``: the run of :func:`_decode_all`, and each GPU's NVML peak."""
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", str(AGENTS))
    with DaemonProcess(*args, *flags) as daemon, contextlib.ExitStack() as stack:
        samplers = [
            stack.enter_context(PeakSampler(daemon.pid, index=d.index)) for d in probe_devices()
        ]
        rate, texts, status = asyncio.run(_decode_all(daemon.socket, models, tokens))
    return rate, texts, status, [s.peak for s in samplers]


def _placement(status: dict[str, Any]) -> dict[str, int]:
    """Each loaded model's device, from STATUS."""
    return {
        model: entry["index"]
        for entry in status["devices"]
        for model in entry["ledger"]["by_model"]
    }


def run(models_dir: Path, out: Path) -> Report:
    report = Report("devices")
    gpus = probe_devices()
    if len(gpus) < 2 or gpus[0].kind != "cuda":
        raise SystemExit("lmxd bench devices needs two GPUs")
    twin = models_dir / f"{TWIN}.gguf"
    if not twin.is_file():
        shutil.copyfile(catalog.resolve_model(MODEL, models_dir), twin)
    models = [MODEL] * AGENTS + [TWIN] * AGENTS
    one, one_texts, one_status, one_peaks = _run_daemon(models_dir, models, "--devices", "0")
    two, two_texts, two_status, two_peaks = _run_daemon(models_dir, models, "--devices", "0,1")
    report.add(f"one GPU, {2 * AGENTS} agents of 2 models: aggregate", one, "tok/s")
    report.add(f"two GPUs, {2 * AGENTS} agents of 2 models: aggregate", two, "tok/s")
    report.add("two GPUs / one GPU", two / one, "x", ">= 1.8", two / one >= 1.8)
    same = sum(a == b for a, b in zip(one_texts, two_texts, strict=True))
    report.add("batched greedy texts identical, two GPUs vs one", same, f"of {len(models)}")
    det = [MODEL] * DET_AGENTS + [TWIN] * DET_AGENTS
    texts = [
        _run_daemon(models_dir, det, "--deterministic", "--devices", devices, tokens=64)[1]
        for devices in ("0", "0,1")
    ]
    same = sum(a == b for a, b in zip(*texts, strict=True))
    report.add(
        "--deterministic greedy texts identical, two GPUs vs one",
        same,
        f"of {len(det)}",
        f"{len(det)}",
        same == len(det),
    )
    placed = _placement(two_status)
    report.add(
        "two GPUs: one model on each device",
        len(set(placed.values())),
        "devices",
        "2",
        sorted(placed.values()) == [0, 1],
    )
    report.rows.append(
        {
            "run": "2 models",
            "one_gpu": {"rate": one, "peaks": one_peaks, "placement": _placement(one_status)},
            "two_gpus": {"rate": two, "peaks": two_peaks, "placement": placed},
        }
    )
    three = [m for m in THREE for _ in range(3)]
    _, _, status, peaks = _run_daemon(models_dir, three)
    placed = _placement(status)
    report.rows.append({"run": "3 models x 3 agents", "placement": placed, "peaks": peaks})
    for entry, peak in zip(status["devices"], peaks, strict=True):
        index, ledger = entry["index"], entry["ledger"]
        here = sorted(m for m, d in placed.items() if d == index)
        weights = sum(ledger["by_model"][m]["weights"] for m in here)
        report.add(
            f"3 models: device {index} holds {', '.join(here) or 'none'}: NVML peak",
            peak / 2**20,
            "MiB",
            f"< cap {ledger['cap'] / 2**20:,.0f} MiB and >= its weights {weights / 2**20:,.0f} MiB",
            weights <= peak < ledger["cap"],
        )
    for entry, peak in zip(two_status["devices"], two_peaks, strict=True):
        cap = entry["ledger"]["cap"]
        report.add(
            f"2 models over two GPUs: device {entry['index']} NVML peak",
            peak / 2**20,
            "MiB",
            f"< cap {cap / 2**20:,.0f} MiB",
            peak < cap,
        )
    report.chart(
        f"Aggregate decode, {2 * AGENTS} agents of two {MODEL} models (tok/s)",
        ["one GPU", "two GPUs"],
        {"daemon": [one, two]},
        "tok/s",
    )
    report.save(out)
    return report
