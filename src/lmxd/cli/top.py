"""`lmxd top`: what the daemon is doing, live, in the spirit of nvtop and `ollama ps`.

Every half second it asks the daemon for STATUS, LIST and MODELS over the socket and draws:
per device, a memory bar (weights, contexts, unaccounted, the backend's own, free) with the
ledger's cap marked and NVML's figure beside the ledger's; per model, its device (devices,
if split) and layers, agents, resident agents, tokens/s and the keep-alive left; per agent,
its state, tokens in KV, n_ctx, last activity, tokens/s, parks and restores; the queue, and
the latest refusals with their numbers. Rates are the difference between two frames. `q`
quits (Ctrl-C too); `--once` prints one frame (two readings half a second apart, for the
rates) and exits. The frame fits 80 columns; without a daemon it says so, and goes on asking.
"""

from __future__ import annotations

import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lmxd.cli import main
from lmxd.cli.agents import ago, socket_option, table
from lmxd.client import Client
from lmxd.errors import DaemonUnavailable
from lmxd.units import format_bytes

BAR = 40  # characters of a device's memory bar
# Parts of a device's ledger, by owner prefix, as the bar draws them: (label, colour, char).
_PARTS = (
    ("model:", "weights", "blue", "█"),
    ("context:", "contexts", "green", "█"),
    ("unaccounted", "unaccounted", "red", "█"),
    ("backend", "backend", "magenta", "█"),
)


@dataclass(frozen=True)
class Reading:
    """What the daemon said at one moment."""

    at: float  # time.monotonic()
    status: dict[str, Any]
    agents: list[dict[str, Any]]
    models: list[dict[str, Any]]


def read(socket_path: Path | None) -> Reading:
    with Client(socket_path) as client:
        return Reading(time.monotonic(), client.status(), client.list_agents(), client.models())


def _rate(now: Reading, before: Reading | None, kind: str, key: str, name: str) -> float | None:
    """Tokens/s of one agent or model between two readings (None: no earlier reading)."""
    if before is None or now.at <= before.at:
        return None
    old: dict[str, int] = {x[key]: x["generated_tokens"] for x in getattr(before, kind)}
    new: int = next(x["generated_tokens"] for x in getattr(now, kind) if x[key] == name)
    return max(0, new - old.get(name, new)) / (now.at - before.at)


def _tps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _device(entry: dict[str, Any]) -> RenderableType:
    """One device: its name, a bar of its ledger's parts against the cap, and the figures."""
    device, ledger = entry["device"], entry["ledger"]
    cap, reserved = ledger["cap"], ledger["reserved"]
    scale = max(cap, reserved) * 1.1  # the cap marked a tenth from the end
    bar, used = Text(), 0
    for prefix, _, colour, char in _PARTS:
        nbytes = sum(n for owner, n in ledger["by_owner"].items() if owner.startswith(prefix))
        cells = round(BAR * nbytes / scale)
        bar.append(char * cells, style=colour)
        used += cells
    mark = min(BAR - 1, round(BAR * cap / scale))
    rest = "".join("│" if used + i == mark else "░" for i in range(max(0, BAR - used)))
    bar.append(rest, style="dim")
    title = Text(f"device {entry['index']} ", style="bold")
    title.append(f"{device['name']} ({device['kind']})")
    # The device's own figure for the daemon: NVML's on a GPU, the process's RSS on a CPU.
    own = "NVML" if device["kind"] == "cuda" else "RSS"
    figures = Text(
        f"ledger {format_bytes(reserved)} of a {format_bytes(cap)} cap (│) · "
        f"{own} {format_bytes(device['process_used'])} · "
        f"free {format_bytes(max(0, cap - reserved))} · card {format_bytes(device['total'])}"
    )
    legend = Text("  ")
    for _, label, colour, char in _PARTS:
        legend.append(char, style=colour)
        legend.append(f" {label}  ")
    return Group(title, bar, figures, legend)


def _models(now: Reading, before: Reading | None) -> Table:
    shown = table(
        "models",
        {
            "model": "l",
            "dev": "r",
            "layers": "r",
            "agents": "r",
            "resident": "r",
            "tok/s": "r",
            "weights": "r",
            "unload": "r",
        },
        no_wrap=True,
    )
    for m in now.models:
        left = m["unload_in_s"]
        shown.add_row(
            m["model"],
            "+".join(str(d["device"]) for d in m["devices"]),  # split: "0+1", and
            "+".join(str(d["n_gpu_layers"]) for d in m["devices"]) + f"/{m['layers']}",  # "9+8/17"
            str(m["refcount"]),
            str(m["resident"]),
            _tps(_rate(now, before, "models", "model", m["model"])),
            format_bytes(m["weights_bytes"]),
            "-" if left is None else f"{left:.0f} s",
        )
    return shown


def _agents(now: Reading, before: Reading | None) -> Table:
    shown = table(
        "agents",
        {
            "agent": "l",
            "state": "l",
            "in KV": "r",
            "n_ctx": "r",
            "last active": "r",
            "tok/s": "r",
            "parks": "r",
            "restores": "r",
        },
        no_wrap=True,
    )
    for a in sorted(now.agents, key=lambda a: a["agent"]):
        shown.add_row(
            a["agent"],
            a["state"],
            str(a["kv_tokens"]),
            str(a["n_ctx"]),
            ago(a["last_used"]),
            _tps(_rate(now, before, "agents", "agent", a["agent"])),
            str(a["parks"]),
            str(a["restores"]),
        )
    return shown


def _numbers(details: dict[str, Any]) -> str:
    """A refusal's numbers, in bytes where they are bytes."""
    parts = []
    for key, value in details.items():
        if isinstance(value, int) and key.endswith("_bytes"):
            parts.append(f"{key.removesuffix('_bytes')} {format_bytes(value)}")
        elif isinstance(value, int | float | str) and key != "reason":
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def frame(now: Reading, before: Reading | None, where: Path | str) -> RenderableType:
    """Everything `lmxd top` shows, for one reading (and the one before, for rates)."""
    status = now.status
    queue = status["queue"]
    head = Text(f"lmxd on {where} · up {status['uptime_s']:.0f} s · ", style="bold")
    head.append(
        f"{status['agents']} agents · queue {queue['depth']} (running {queue['running']}) · "
        f"parked {format_bytes(status['parked_host_bytes'])} RAM"
        + (f", {format_bytes(status['disk']['bytes'])} disk" if status["disk"] else "")
    )
    parts: list[RenderableType] = [head]
    parts += [_device(entry) for entry in status["devices"]]
    parts += [_models(now, before), _agents(now, before)]
    refusals = Text("latest refusals: ", style="bold")
    if not status["refusals"]:
        refusals.append("none")
    for r in reversed(status["refusals"][-5:]):
        refusals.append(
            f"\n  {ago(r['time'])} {r['op']} {r['agent']} {r['code']}: {_numbers(r['details'])}"
        )
    parts.append(refusals)
    parts.append(Text("q quits", style="dim"))
    return Group(*parts)


def _unreachable(exc: DaemonUnavailable, again: bool) -> Text:
    text = f"no lmxd daemon answers: {exc.message}"
    return Text(text + (" Asking again every half second; q quits." if again else ""), "bold red")


@contextmanager
def _keys() -> Iterator[bool]:
    """Single key presses from the terminal, without Enter (False when stdin is none)."""
    if not sys.stdin.isatty():
        yield False
        return
    saved = termios.tcgetattr(sys.stdin)
    tty.setcbreak(sys.stdin)
    try:
        yield True
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def _quit_within(seconds: float, keys: bool) -> bool:
    """Wait ``seconds``; True if `q` was pressed meanwhile."""
    if not keys:
        time.sleep(seconds)
        return False
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    return bool(ready) and sys.stdin.read(1).lower() == "q"


@main.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@socket_option
def top(once: bool, socket_path: Path | None) -> None:
    """A live view of the daemon: devices, models, agents, queue, refusals (q quits)."""
    console = Console(highlight=False)
    where = socket_path or "the default socket"
    if once:
        try:
            first = read(socket_path)
            time.sleep(0.5)
            console.print(frame(read(socket_path), first, where))
        except DaemonUnavailable as exc:
            Console(stderr=True).print(_unreachable(exc, again=False))
            sys.exit(1)
        return
    before: Reading | None = None
    with _keys() as keys, Live(console=console, auto_refresh=False) as live:
        while True:
            try:
                now = read(socket_path)
                live.update(frame(now, before, where))
                before = now
            except DaemonUnavailable as exc:
                live.update(_unreachable(exc, again=True))
                before = None
            live.refresh()
            try:
                if _quit_within(0.5, keys):
                    return
            except KeyboardInterrupt:
                return
