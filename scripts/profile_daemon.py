"""Where the daemon's decode time goes between the stepper and the replies.

    python scripts/profile_daemon.py OUT_DIR [MODEL] [AGENTS ...]   (synth-llama3.2-1b 8 64)

For each agent count: ``llama_decode`` alone (the throughput benchmark's reference), then the
throughput benchmark's greedy run through a daemon, twice, each reply's timings (queued,
prefill, decode, total) summarised; with ``py-spy`` on the PATH, the second run is sampled
(every thread, idle ones too, without pausing the daemon) into OUT_DIR/daemon-N.txt as
collapsed stacks, one line per distinct stack with its sample count.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from lmxd import catalog
from lmxd.bench.throughput import N_CTX, PROMPT, TOKENS, reference
from lmxd.client import AsyncClient
from lmxd.spawn import DaemonProcess


async def greedy_run(socket: Path, model: str, n: int) -> tuple[float, list[dict[str, float]]]:
    async with await AsyncClient.connect(socket) as client:
        for i in range(n):
            await client.register(f"a{i}", model, n_ctx=N_CTX)
        await asyncio.gather(
            *(client.decode(f"a{i}", PROMPT, max_tokens=TOKENS) for i in range(n))
        )  # warm-up: the context in the timed run's shape
        for i in range(n):
            await client.reset(f"a{i}")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        replies = await asyncio.gather(
            *(client.decode(f"a{i}", PROMPT, max_tokens=TOKENS) for i in range(n))
        )
        wall = loop.time() - t0
        for i in range(n):
            await client.unregister(f"a{i}")
    tokens = sum(r.generated_tokens for r in replies)
    return tokens / wall, [r.timings_ms for r in replies]


def summary(timings: list[dict[str, float]]) -> str:
    keys = ("queued", "prefill", "decode", "total")
    parts = []
    for k in (k for k in keys if k in timings[0]):
        values = [t[k] for t in timings]
        parts.append(f"{k} mean {statistics.mean(values):.1f} max {max(values):.1f}")
    return "  ".join(parts)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    model = sys.argv[2] if len(sys.argv) > 2 else "synth-llama3.2-1b"
    counts = [int(n) for n in sys.argv[3:]] or [8, 64]
    models_dir = catalog.models_dir()
    path = catalog.resolve_model(model, models_dir)
    alone = {n: reference(path, n) for n in counts}
    spy = shutil.which("py-spy")
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", str(max(counts)))
    with DaemonProcess(*args) as daemon:
        for n in counts:
            for attempt in range(2):
                record = None
                if spy is not None and attempt == 1:
                    record = subprocess.Popen(
                        [spy, "record", "--pid", str(daemon.proc.pid), "--nonblocking",
                         "--threads", "--idle", "--rate", "250", "--format", "raw",
                         "--output", str(out / f"daemon-{n}.txt")],
                        stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                rate, timings = asyncio.run(greedy_run(daemon.socket, model, n))
                if record is not None:
                    record.send_signal(signal.SIGINT)
                    record.wait(30)
                print(
                    f"{model}, {n} agents, run {attempt + 1}: {rate:,.0f} tok/s "
                    f"({100 * rate / alone[n]:.1f}% of llama_decode alone, {alone[n]:,.0f}); "
                    f"ms: {summary(timings)}",
                    flush=True,
                )
        shutil.copy(daemon.log_path, out / "daemon.log")


if __name__ == "__main__":
    main()
