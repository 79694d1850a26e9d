"""The operator's view, on real daemons: a config file's settings and agents, and the log as
JSON lines with each refusal's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon_harness import Daemon

GIB = 1 << 30
AGENTS = """
[[agent]]
name = "coder"
model = "smollm2-135m"
n_ctx = {n_ctx}
system_prompt = "You write Python."
sampling = {{ temperature = 0.2, seed = 7 }}

[[agent]]
name = "ghost"
model = "gpt-5"
"""


def test_the_file_sets_what_the_command_line_does_not(tmp_path: Path) -> None:
    config = tmp_path / "lmxd.toml"
    config.write_text('park_budget = "3GiB"\nmax_queue = 7\n')
    d = Daemon("--config", str(config))
    try:
        limits = d.wire().ok("HELLO")["limits"]
        assert limits["park_budget"] == 3 * GIB and limits["max_queue"] == 7
    finally:
        assert d.stop() == 0, d.log()
    d = Daemon("--config", str(config), "--park-budget", "2GiB")
    try:
        limits = d.wire().ok("HELLO")["limits"]
        assert limits["park_budget"] == 2 * GIB and limits["max_queue"] == 7
    finally:
        assert d.stop() == 0, d.log()


def _agents(d: Daemon) -> dict[str, dict[str, Any]]:
    return {a["agent"]: a for a in d.wire().ok("LIST")["agents"]}


def test_declared_agents_are_registered_and_come_back_after_a_restart(tmp_path: Path) -> None:
    config, state = tmp_path / "lmxd.toml", tmp_path / "state"
    config.write_text(AGENTS.format(n_ctx=1024))
    args = ("--config", str(config), "--park-dir", str(state))
    d = Daemon(*args)
    try:
        coder = _agents(d)["coder"]
        assert (coder["model"], coder["n_ctx"], coder["owner"]) == (
            "smollm2-135m",
            1024,
            os.getuid(),
        )
        w = d.wire()
        status = w.ok("STATUS")["config"]
        assert status["file"] == str(config)
        assert (status["declared"], status["registered"], status["kept"]) == (2, 1, 0)
        assert [(f["agent"], f["code"]) for f in status["failed"]] == [("ghost", "UNKNOWN_MODEL")]
        cmd = [sys.executable, "-m", "lmxd.cli", "status", "--socket", str(d.socket)]
        shown = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        shown = " ".join(shown.split())  # rich wraps long lines
        assert "2 agents declared, 1 registered at the start, 0 there already, 1 not" in shown
        assert "ghost: [UNKNOWN_MODEL] unknown model 'gpt-5'" in shown
        turn = [{"role": "user", "content": "Write a function that adds two numbers."}]
        w.ok("DECODE", agent="coder", messages=turn, max_tokens=8)
        tokens = _agents(d)["coder"]["tokens"]
        time.sleep(0.5)  # the registry's write, milliseconds after the reply
    finally:
        assert d.stop() == 0, d.log()
    assert "declared agents file=" in d.log() and "failed=1" in d.log()

    # A restart: the registry brings coder back with its conversation; the declaration,
    # changed meanwhile, does not replace it (a warning says what differs).
    config.write_text(AGENTS.format(n_ctx=2048))
    d = Daemon(*args)
    try:
        coder = _agents(d)["coder"]
        assert coder["n_ctx"] == 1024 and coder["tokens"] == tokens
        assert coder["state"] == "spilled"  # its KV from the clean stop's state file
        w = d.wire()
        status = w.ok("STATUS")["config"]
        assert (status["registered"], status["kept"], len(status["failed"])) == (0, 1, 1)
        more = [{"role": "user", "content": "And one that multiplies them."}]
        reply = w.ok("DECODE", agent="coder", messages=more, max_tokens=4)
        assert reply["restored"] and reply["cached_tokens"] > 0
        w.ok("UNREGISTER", agent="coder")
        time.sleep(0.5)
    finally:
        assert d.stop() == 0, d.log()
    assert (
        "declared agent=coder kept as registered, not as declared (n_ctx 1024, declared 2048)"
        in d.log()
    )

    # Unregistered, it is registered again as declared now, with no conversation.
    d = Daemon(*args)
    try:
        coder = _agents(d)["coder"]
        assert coder["n_ctx"] == 2048 and coder["tokens"] == 0
    finally:
        assert d.stop() == 0, d.log()


def _json_lines(d: Daemon) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in d.log().splitlines()]  # every line is JSON
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    return lines


def test_json_logs_carry_each_event_and_each_refusal_with_its_numbers() -> None:
    # A 160 MiB card: SmolLM2 with 1024 tokens fits (129 MiB), with 8192 it does not.
    d = Daemon("--log-format", "json", "--vram-limit", "160MiB", "--max-queue", "1")
    try:
        w = d.wire()
        w.ok("REGISTER", agent="a", model="smollm2-135m", n_ctx=1024)
        refused = w.call("REGISTER", agent="b", model="smollm2-135m", n_ctx=8192)
        assert refused["error"]["code"] == "VRAM_LEDGER_DENY"
        # a full queue: the second DECODE of an agent allowed one
        first = w.send("DECODE", agent="a", prompt="Once upon a time", max_tokens=16)
        busy = w.call("DECODE", agent="a", prompt="Again", max_tokens=1)
        assert busy["error"]["code"] == "BUSY"
        while w.recv()["id"] != first:
            pass
    finally:
        assert d.stop() == 0, d.log()
    lines = _json_lines(d)
    register = [x for x in lines if x["message"].startswith("register ")]
    assert [(x["agent"], x["n_ctx"], x["level"]) for x in register] == [("a", 1024, "info")]
    deny = [x for x in lines if x.get("code") == "VRAM_LEDGER_DENY"]
    assert len(deny) == 1  # once, though the front answered it too
    assert deny[0]["level"] == "warning" and deny[0]["op"] == "REGISTER"
    assert deny[0]["agent"] == "b" and deny[0]["cap_bytes"] == 160 * (1 << 20) * 9 // 10
    assert deny[0]["requested_bytes"] > deny[0]["cap_bytes"] - deny[0]["reserved_bytes"]
    assert deny[0]["parts.kv"] > 0
    busy_lines = [x for x in lines if x.get("code") == "BUSY"]
    assert len(busy_lines) == 1 and busy_lines[0]["level"] == "warning"
    assert busy_lines[0]["op"] == "DECODE" and busy_lines[0]["max_queue"] == 1
    assert lines[0]["time"].endswith("+00:00")


def test_log_level_warning_keeps_the_refusals_only() -> None:
    d = Daemon("--log-level", "warning", "--vram-limit", "100MiB")
    try:
        refused = d.wire().call("REGISTER", agent="a", model="smollm2-135m", n_ctx=1024)
        assert refused["error"]["code"] == "VRAM_LEDGER_DENY"
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert " WARNING refused op=REGISTER agent=a model=smollm2-135m code=VRAM_LEDGER_DENY" in log
    assert "cap_bytes=94371840 reserved_bytes=0 requested_bytes=" in log
    assert " INFO " not in log


def test_a_json_log_stays_json_when_the_start_fails(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lmxd.cli", "serve", "--config", "none", "--log-format", "json"]
    cmd += ["--socket", str(tmp_path / "d.sock"), "--park-dir", "off", "--http", "0.0.0.0:0"]
    env = {k: v for k, v in os.environ.items() if k != "LMXD_API_KEY"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2
    (line,) = [json.loads(text) for text in done.stderr.splitlines()]
    assert line["level"] == "error" and line["code"] == "INVALID_INPUT"
    assert line["message"].startswith("not started code=INVALID_INPUT host=0.0.0.0: refusing")
