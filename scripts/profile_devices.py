"""Where two GPUs' time goes: the devices benchmark's agents, with py-spy on the daemon.

    python scripts/profile_devices.py OUT_DIR DEVICES[@THREADS]...     (e.g. 0 0,1 0,1@4)

For each ``--devices`` value (with ``--threads THREADS`` after an @): a daemon with 32 agents
on each of two Llama-3.2-1B-shape models (the synthetic one and a copy, as `lmxd bench devices`
has them), a greedy run of 256 tokens each (the benchmark's), then (unless $NO_SPY is set) one
of 1,024 tokens sampled by py-spy (every thread, idle ones too, without pausing the daemon)
into OUT_DIR/spy-DEVICES.txt as collapsed stacks. Prints each run's aggregate tokens/s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmxd import catalog
from lmxd.bench.devices import MODEL, PROMPT, TWIN
from lmxd.client import AsyncClient
from lmxd.spawn import DaemonProcess

AGENTS = 32


async def greedy(socket: Path, models: list[str], tokens: int, register: bool) -> float:
    """Every agent decodes ``tokens`` at once, after a warm-up of the same shape."""
    async with await AsyncClient.connect(socket) as client:
        for i, model in enumerate(models if register else []):
            await client.register(f"a{i}", model, n_ctx=2048)

        async def everyone() -> list[int]:
            replies = await asyncio.gather(
                *(client.decode(f"a{i}", PROMPT, max_tokens=tokens) for i in range(len(models)))
            )
            return [r.generated_tokens for r in replies]

        await everyone()
        for i in range(len(models)):
            await client.reset(f"a{i}")
        t0 = time.perf_counter()
        generated = sum(await everyone())
        rate = generated / (time.perf_counter() - t0)
        for i in range(len(models)):
            await client.reset(f"a{i}")
    return rate


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    directory = catalog.models_dir()
    twin = directory / f"{TWIN}.gguf"
    if not twin.is_file():
        shutil.copyfile(catalog.resolve_model(MODEL, directory), twin)
    models = [MODEL] * AGENTS + [TWIN] * AGENTS
    for run in sys.argv[2:]:
        devices, _, threads = run.partition("@")
        args = ("--keep-alive", "0", "--max-seqs", str(AGENTS), "--devices", devices)
        with DaemonProcess(*args, *(("--threads", threads) if threads else ())) as daemon:
            rate = asyncio.run(greedy(daemon.socket, models, 256, register=True))
            print(
                f"--devices {devices} --threads {threads or 'default'}: 256 tokens each, "
                f"{rate:,.0f} tok/s",
                flush=True,
            )
            if os.environ.get("NO_SPY"):
                continue
            name = out / f"spy-{devices.replace(',', '-')}.txt"
            record = ["py-spy", "record", "--pid", str(daemon.pid), "--idle", "--threads"]
            spy = subprocess.Popen(
                [*record, "--nonblocking", "--format", "raw", "-r", "200", "-d", "10", "-o", name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            rate = asyncio.run(greedy(daemon.socket, models, 1024, register=False))
            print(f"--devices {devices}: 1,024 tokens each, {rate:,.0f} tok/s (py-spy on)")
            spy.wait(60)


if __name__ == "__main__":
    main()
