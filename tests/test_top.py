"""`lmxd top --once` against a real daemon: what it prints is what the daemon holds.

The frame is parsed back: each agent's row (state, tokens in KV, n_ctx, parks, tokens/s while
it decodes), each model's row, the device's ledger figures and the latest refusal with its
numbers; every line fits 80 columns; without a daemon it says so and exits 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from daemon_harness import Daemon

from lmxd.units import format_bytes


def _top(socket: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmxd.cli", "top", "--once", "--socket", str(socket)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=60,
    )


def _rows(out: str, title: str) -> dict[str, list[str]]:
    """The body rows of the table titled ``title``, by their first cell (rich draws cells
    between │ and ends a table with └)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = {}
    for line in lines[start + 4 :]:  # the title, the top rule, the header, the header rule
        if not line.startswith("│"):
            break
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        rows[cells[0]] = cells
    return rows


def test_top_shows_the_daemons_agents_models_memory_and_refusals() -> None:
    d = Daemon("--max-seqs", "1", "--vram-limit", "400MiB", "--vram-cap-percent", "100")
    try:
        w = d.wire()
        w.ok("REGISTER", agent="coder", model="smollm2-135m", n_ctx=512)
        w.ok("REGISTER", agent="reviewer", model="smollm2-135m", n_ctx=512)
        w.ok("DECODE", agent="reviewer", prompt=" Once upon a time", max_tokens=8)
        refused = w.call("REGISTER", agent="writer", model="gemma3-270m", n_ctx=32768)
        assert refused["error"]["code"] == "VRAM_LEDGER_DENY", refused
        # coder decodes a long reply while top looks: it is decoding, at some tokens/s
        busy = d.wire()
        rid = busy.send("DECODE", agent="coder", prompt=" 1, 2, 3,", max_tokens=400)
        replies: list[dict[str, object]] = []
        reader = threading.Thread(target=lambda: replies.append(busy.recv()))
        reader.start()
        out = _top(d.socket)
        reader.join(60)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert not wide, wide
        listed = {a["agent"]: a for a in w.ok("LIST")["agents"]}
        agents = _rows(text, "agents")
        assert set(agents) == {"coder", "reviewer"}, text
        coder, reviewer = agents["coder"], agents["reviewer"]
        assert coder[1] == "decoding" and int(coder[5].replace(",", "")) > 0, coder
        assert reviewer[1] == listed["reviewer"]["state"] == "parked"
        assert reviewer[2:4] == [str(listed["reviewer"]["kv_tokens"]), "512"]
        assert reviewer[6:8] == ["1", "0"]  # parked once (for coder), never restored
        [model] = _rows(text, "models").values()
        assert model[:5] == ["smollm2-135m", "0", "31/31", "2", "1"]  # all 31 layers on its device
        status = w.ok("STATUS")
        cap = format_bytes(status["ledger"]["cap"])
        assert f"of a {cap} cap" in text
        refusal = re.search(r"REGISTER writer VRAM_LEDGER_DENY: (.*?)\nq quits", text, re.S)
        assert refusal is not None, text
        numbers = " ".join(refusal.group(1).split())  # the line may wrap
        requested = format_bytes(refused["error"]["details"]["requested_bytes"])
        assert f"cap {cap}" in numbers and f"requested {requested}" in numbers, numbers
        assert replies and replies[0]["id"] == rid and replies[0]["ok"], replies
    finally:
        assert d.stop() == 0, d.log()


def test_top_without_a_daemon_says_so() -> None:
    out = _top("/tmp/lmxd-no-daemon-here.sock")
    assert out.returncode == 1
    assert "no lmxd daemon answers" in out.stderr
    assert "/tmp/lmxd-no-daemon-here.sock" in out.stderr


def test_a_model_split_over_devices_shows_each_devices_layers() -> None:
    """A model split by layer (which needs two GPUs) as MODELS gives it: top's row names both
    devices and the layers on each; `lmxd models`' column says which device holds how many."""
    from rich.console import Console

    from lmxd.cli.agents import layers_shown
    from lmxd.cli.top import Reading, _models

    model = {
        "model": "llama",
        "device": 0,
        "devices": [{"device": 0, "n_gpu_layers": 9}, {"device": 1, "n_gpu_layers": 8}],
        "n_gpu_layers": 17,
        "layers": 17,
        "refcount": 2,
        "resident": 1,
        "generated_tokens": 0,
        "weights_bytes": 1 << 30,
        "unload_in_s": None,
    }
    console = Console(width=80, record=True)
    console.print(_models(Reading(0.0, {}, [], [model]), None))
    row = _rows(console.export_text(), "models")["llama"]
    assert row[1:3] == ["0+1", "9+8/17"]
    assert layers_shown(model) == "17 of 17: 9 on 0, 8 on 1"
    assert layers_shown({**model, "devices": model["devices"][:1]}) == "17 of 17"
