"""`lmxd bench forks`: how often an agent's greedy text depends on what else runs.

N agents of one model each decode a different prompt, first one at a time (each alone on the
card), then all at once (after a RESET); an agent *forks* when its two texts differ. Run for
the two real models (on a GPU build, two of the synthetic shapes: the real files do not travel
to the lent card), with and without ``--deterministic``. Goal: no fork under
``--deterministic``; without it, the count is what batching with other agents costs in
reproducibility (llama.cpp's kernels take other paths for other batch sizes).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.engine.runtime import Engine
from lmxd.spawn import DaemonProcess

CPU_MODELS = ("smollm2-135m", "gemma3-270m")
GPU_MODELS = ("synth-qwen2-0.5b", "synth-llama3.2-1b")
AGENTS = 8
TOKENS = 32
SUBJECTS = ["mayor", "baker", "river", "bridge", "church", "market", "school", "harbor"]


async def _forks(socket: Path, model: str) -> int:
    prompts = [f" Story {i}: the {s} of the old town was" for i, s in enumerate(SUBJECTS)]
    names = [f"{model}-{i}" for i in range(AGENTS)]
    async with await AsyncClient.connect(socket) as client:
        for name in names:
            await client.register(name, model, n_ctx=512)
        alone = [
            (await client.decode(n, p, max_tokens=TOKENS)).text
            for n, p in zip(names, prompts, strict=True)
        ]
        for name in names:
            await client.reset(name)
        together = await asyncio.gather(
            *(client.decode(n, p, max_tokens=TOKENS) for n, p in zip(names, prompts, strict=True))
        )
        for name in names:
            await client.unregister(name)
    return sum(a != b.text for a, b in zip(alone, together, strict=True))


def run(models_dir: Path, out: Path) -> Report:
    report = Report("forks")
    models = GPU_MODELS if Engine.get().gpu_offload else CPU_MODELS
    base = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", str(AGENTS))
    for flags in ((), ("--deterministic",)):
        label = "--deterministic" if flags else "default"
        with DaemonProcess(*base, *flags) as daemon:
            for model in models:
                forks = asyncio.run(_forks(daemon.socket, model))
                report.rows.append({"mode": label, "model": model, "forks": forks})
                goal, met = ("0", forks == 0) if flags else ("", None)
                report.add(f"{label}, {model}: agents of {AGENTS} that fork", forks, "", goal, met)
    report.save(out)
    return report
