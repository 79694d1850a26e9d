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
    charts: list[dict[str, Any]] = field(default_factory=list)

    def chart(
        self, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str
    ) -> None:
        """A grouped bar chart, drawn later by `lmxd bench charts` (see :func:`render`)."""
        self.charts.append({"title": title, "labels": labels, "series": series, "ylabel": ylabel})

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
            "charts": self.charts,
            "figures": [f.__dict__ for f in self.figures],
            "rows": self.rows,
        }
        path.write_text(json.dumps(body, indent=1))
        return path


def render(json_path: Path) -> list[Path]:
    """Draw a saved report's charts as PNGs beside it.

    Charts are drawn in a process of their own, after the run: on the H200 machine, drawing
    with matplotlib in a process that had CUDA llama.cpp loaded crashed it (2026-11-29).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    body = json.loads(json_path.read_text())
    if not isinstance(body, dict):
        return []  # not a report (memory.json is a table of rows)
    paths = []
    for i, spec in enumerate(body.get("charts", [])):
        labels, series = spec["labels"], spec["series"]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * len(series)), 4.0))
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            ax.bar([x + k * width for x in range(len(labels))], values, width, label=name)
        ax.set_xticks(
            [x + width * (len(series) - 1) / 2 for x in range(len(labels))],
            labels,
            rotation=20,
            ha="right",
        )
        ax.set_ylabel(spec["ylabel"])
        ax.set_title(spec["title"])
        ax.legend()
        fig.tight_layout()
        path = json_path.with_name(f"{json_path.stem}{'' if i == 0 else i + 1}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
