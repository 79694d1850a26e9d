"""A timeline of one run of the daemon, for `lmxd demo --chart`: memory over time and each
agent's states as bars, with its parks and restores marked.

:class:`Timeline` asks the daemon for STATUS and LIST every 50 ms on a connection of its own
while the run goes on; :func:`draw` turns the readings into one PNG: above, the device's
ledger (reserved bytes) and the device's own figure for the daemon (NVML on a GPU, RSS on a
CPU) against the cap; below, one row per agent, coloured by its state at each reading
(decoding, resident, parked in host RAM, spilled to disk...), with a mark at each park and
each restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmxd.client import AsyncClient

PERIOD_S = 0.05
# Each state's colour; the brief ones (parking, spilling, restoring) are drawn grey.
COLOURS = {
    "queued": "plum",
    "decoding": "tab:green",
    "resident": "tab:blue",
    "parked": "tab:orange",
    "spilled": "tab:red",
    "empty": "lightgrey",
}


@dataclass
class Timeline:
    """Readings of the daemon: times (seconds from the start), memory, agents' states."""

    start: float = field(default_factory=time.monotonic)
    times: list[float] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)
    measured: list[int] = field(default_factory=list)
    cap: int = 0
    device: str = ""
    states: dict[str, list[str]] = field(default_factory=dict)  # agent -> state per reading
    parks: dict[str, list[float]] = field(default_factory=dict)  # agent -> times of its parks
    restores: dict[str, list[float]] = field(default_factory=dict)
    _counts: dict[str, tuple[int, int]] = field(default_factory=dict)

    async def record(self, socket: Path, until: asyncio.Event) -> None:
        """Read the daemon every PERIOD_S until ``until`` is set."""
        async with await AsyncClient.connect(socket) as client:
            while not until.is_set():
                status = await client.status()
                agents = await client.list_agents()
                self._add(time.monotonic() - self.start, status, agents)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), PERIOD_S)

    def _add(self, at: float, status: dict[str, Any], agents: list[dict[str, Any]]) -> None:
        device, ledger = status["device"], status["ledger"]
        self.cap, self.device = ledger["cap"], f"{device['name']} ({device['kind']})"
        self.times.append(at)
        self.reserved.append(ledger["reserved"])
        self.measured.append(device["process_used"])
        for agent in agents:
            name = agent["agent"]
            row = self.states.setdefault(name, ["empty"] * (len(self.times) - 1))
            row.append(agent["state"])
            parks, restores = self._counts.get(name, (0, 0))
            if agent["parks"] > parks:
                self.parks.setdefault(name, []).append(at)
            if agent["restores"] > restores:
                self.restores.setdefault(name, []).append(at)
            self._counts[name] = (agent["parks"], agent["restores"])
        for row in self.states.values():  # an agent gone since: empty
            row.extend(["empty"] * (len(self.times) - len(row)))


def draw(timeline: Timeline, path: Path, title: str) -> None:
    """The timeline as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    agents = sorted(timeline.states)
    fig, (memory, rows) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(10, 3 + 0.5 * len(agents)),
        gridspec_kw={"height_ratios": [2, max(1, len(agents)) * 0.5]},
    )
    mib = 2**20
    own = "NVML" if "cuda" in timeline.device else "RSS"
    memory.plot(timeline.times, [b / mib for b in timeline.reserved], label="ledger reserved")
    memory.plot(timeline.times, [b / mib for b in timeline.measured], label=f"{own}, the daemon")
    memory.axhline(timeline.cap / mib, color="black", linestyle="--", label="ledger cap")
    memory.set_ylabel("MiB")
    memory.set_title(f"{title}: {timeline.device}")
    memory.legend(loc="upper left", fontsize="small")
    ends = [*timeline.times[1:], timeline.times[-1] + PERIOD_S] if timeline.times else []
    for y, name in enumerate(agents):
        for begin, end, state in zip(timeline.times, ends, timeline.states[name], strict=True):
            rows.barh(y, end - begin, left=begin, color=COLOURS.get(state, "grey"), height=0.6)
        for at in timeline.parks.get(name, []):
            rows.plot(at, y, marker="v", color="black", markersize=7)
        for at in timeline.restores.get(name, []):
            rows.plot(at, y, marker="^", color="black", markersize=7)
    rows.set_yticks(range(len(agents)), agents)
    rows.set_xlabel("seconds")
    legend: list[Artist] = [Patch(color=c, label=s) for s, c in COLOURS.items()]
    legend += [
        Line2D([], [], marker="v", color="black", linestyle="", label="park"),
        Line2D([], [], marker="^", color="black", linestyle="", label="restore"),
    ]
    rows.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
