"""Benchmark output: each figure printed beside its goal, JSON for the record, PNG charts."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmxd import __version__


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    goal: str = ""  # e.g. ">= 40 GB/s"
    met: bool | None = None  # None: no goal

    def line(self) -> str:
        verdict = "" if self.met is None else ("MET" if self.met else "MISSED")
        goal = f"   goal {self.goal}: {verdict}" if self.goal else ""
        return f"{self.name:<58} {self.value:>12,.2f} {self.unit:<8}{goal}"


@dataclass
class Report:
    """One benchmark run: its figures, raw rows, and where it ran."""

    bench: str
    figures: list[Figure] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(
        self, name: str, value: float, unit: str, goal: str = "", met: bool | None = None
    ) -> Figure:
        fig = Figure(name, value, unit, goal, met)
        self.figures.append(fig)
        print(fig.line(), flush=True)
        return fig

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        import llama_cpp

        from lmxd.memory.device import probe_device

        device = probe_device()
        self.meta.update(
            date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            machine=platform.node(),
            device=f"{device.name} ({device.kind}, {device.total} bytes)",
            lmxd=__version__,
            llama_cpp_python=llama_cpp.__version__,
            gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        )
        path = out_dir / f"{self.bench}.json"
        body = {
            "bench": self.bench,
            "meta": self.meta,
            "figures": [f.__dict__ for f in self.figures],
            "rows": self.rows,
        }
        path.write_text(json.dumps(body, indent=1))
        return path


def bar_chart(
    path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str
) -> None:
    """Grouped bars: one group per label, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * len(series)), 4.0))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + i * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(
        [x + width * (len(series) - 1) / 2 for x in range(len(labels))],
        labels,
        rotation=20,
        ha="right",
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
