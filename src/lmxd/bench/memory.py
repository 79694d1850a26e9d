"""`lmxd bench memory`: the estimator's prediction beside what llama.cpp allocated.

Each configuration is measured in a fresh child process, so that every load is a first load
(llama.cpp reports a model's buffers only when it loads it) and, on a GPU, the NVML delta of
that process is the configuration's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lmxd.engine.measure import measure_allocation
from lmxd.memory.device import probe_device
from lmxd.memory.estimator import Backend, estimate
from lmxd.modelfile import read_model_info
from lmxd.units import MiB


@dataclass(frozen=True)
class MemoryRow:
    model: str
    n_ctx: int
    n_seq: int
    backend: str
    predicted: dict[str, int]
    measured: dict[str, int]  # from llama.cpp's own buffer report, device side
    nvml_delta: int | None  # the process's device bytes while loaded minus before (GPU only)

    @property
    def ratio(self) -> float:
        """Predicted over llama.cpp's report, both without the backend overhead."""
        own = sum(self.predicted.values()) - self.predicted.get("overhead", 0)
        return own / max(1, sum(self.measured.values()))


def measure_one(path: Path, n_ctx: int, n_seq: int) -> MemoryRow:
    """Predict, then load and measure, in this process (call in a fresh one)."""
    from lmxd.engine.runtime import Engine

    backend = Backend.CUDA if Engine.get().gpu_offload else Backend.CPU
    est = estimate(read_model_info(path), n_ctx, n_seq, backend=backend, beyond_training=True)
    on_gpu = backend is Backend.CUDA
    before = probe_device().process_used if on_gpu else 0
    during: list[int] = []
    buffers = measure_allocation(
        path, n_ctx, n_seq, while_loaded=lambda: during.append(probe_device().process_used)
    )
    predicted = est.parts()
    # The backend overhead is in no llama.cpp report; the NVML delta includes it.
    measured = {**buffers.parts(device_only=on_gpu), "overhead": 0}
    return MemoryRow(
        path.stem,
        n_ctx,
        n_seq,
        backend.value,
        predicted,
        measured,
        during[0] - before if on_gpu else None,
    )


def run_table(configs: list[tuple[Path, int, int]], out: Path | None) -> list[MemoryRow]:
    rows = []
    for path, n_ctx, n_seq in configs:
        cmd = [sys.executable, "-m", "lmxd.bench.memory", str(path), str(n_ctx), str(n_seq)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"measuring {path.name} n_ctx={n_ctx} failed:\n{result.stderr}")
        data = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(MemoryRow(**data))
    if out is not None:
        out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


def markdown(rows: list[MemoryRow]) -> str:
    """Predicted beside llama.cpp's report (the backend overhead is in no report), and, on a
    GPU, predicted with the overhead beside the process's NVML delta."""

    def mib(n: int) -> str:
        return f"{n / MiB:,.1f}"

    gpu = any(r.nvml_delta is not None for r in rows)
    head = (
        "| model | n_ctx | seqs | weights MiB (pred / meas) | KV MiB | compute MiB | "
        "total MiB (pred / llama.cpp) | ratio |"
    )
    lines = [
        head + (" pred + overhead / NVML MiB | ratio |" if gpu else ""),
        "|---|---:|---:|---|---|---|---|---:|" + ("---|---:|" if gpu else ""),
    ]
    for r in rows:
        p, m = r.predicted, r.measured
        own = sum(p.values()) - p.get("overhead", 0)
        line = (
            f"| {r.model} | {r.n_ctx} | {r.n_seq} | {mib(p['weights'])} / {mib(m['weights'])} | "
            f"{mib(p['kv'])} / {mib(m['kv'])} | {mib(p['compute'])} / {mib(m['compute'])} | "
            f"{mib(own)} / {mib(sum(m.values()))} | {r.ratio:.4f} |"
        )
        if r.nvml_delta is not None:
            total = sum(p.values())
            line += f" {mib(total)} / {mib(r.nvml_delta)} | {total / r.nvml_delta:.4f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    row = measure_one(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(asdict(row)))
