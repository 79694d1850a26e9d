"""`lmxd bench busy`: the CPU path on a machine another process keeps busy.

The daemon (threads left to it, so tuned as it runs) serves 1 and 4 SmolLM2-135M agents, each
decoding TOKENS tokens at once, first on an idle machine, then while a process of this
benchmark's own spins on one core. Goal: with the core busy, the daemon keeps >= 60% of its
idle-machine rate. For reference, ``llama_decode`` alone with a fixed thread count (all cores,
then one) under the same load shows what a fixed count costs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmxd import catalog
from lmxd.bench.report import Report
from lmxd.bench.throughput import CPU_AGENTS, CPU_MODEL, TOKENS, _daemon, reference
from lmxd.spawn import DaemonProcess

GOAL = 0.60


@contextmanager
def _busy_core() -> Iterator[None]:
    """Another process spinning on one core for as long as the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _aggregate(socket: Path, n: int) -> float:
    rows = asyncio.run(_daemon(socket, [CPU_MODEL] * n, None))
    tokens: int = sum(r["tokens"] for r in rows)
    wall: float = rows[0]["wall_s"]
    return tokens / wall


def run(models_dir: Path, out: Path) -> Report:
    report = Report("busy")
    cores = os.cpu_count() or 1
    path = catalog.resolve_model(CPU_MODEL, models_dir)
    args = ("--models-dir", str(models_dir), "--keep-alive", "0", "--max-seqs", "4")
    with DaemonProcess(*args) as daemon:
        idle = {n: _aggregate(daemon.socket, n) for n in CPU_AGENTS}
        with _busy_core():
            busy = {n: _aggregate(daemon.socket, n) for n in CPU_AGENTS}
    with _busy_core():
        alone = {t: reference(path, 1, t, TOKENS // 4) for t in sorted({cores, 1}, reverse=True)}
    for n in CPU_AGENTS:
        report.add(f"daemon, {n} agents, idle machine", idle[n], "tok/s")
        report.add(
            f"daemon, {n} agents, one core busy: share of idle",
            100 * busy[n] / idle[n],
            "%",
            f">= {GOAL:.0%} ({busy[n]:,.1f} of {idle[n]:,.1f} tok/s)",
            busy[n] >= GOAL * idle[n],
        )
    for threads, rate in alone.items():
        report.add(f"llama_decode alone, {threads} threads, one core busy", rate, "tok/s")
    report.meta.update({"model": CPU_MODEL, "cores": cores})
    report.rows.append({"idle": idle, "busy": busy, "alone_busy": alone})
    labels = [str(n) for n in CPU_AGENTS]
    series = {"idle": [idle[n] for n in CPU_AGENTS], "one core busy": [busy[n] for n in CPU_AGENTS]}
    report.chart(f"Daemon decode, {CPU_MODEL}, by agents (tok/s)", labels, series, "tok/s")
    report.save(out)
    return report
