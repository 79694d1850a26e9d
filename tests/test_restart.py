"""Agents survive a restart: kept on disk (lmxd.registry), registered again, conversation kept.

A real daemon, stopped cleanly or killed, and a second one on the same --park-dir: every agent
is listed again with its owner, model, n_ctx and conversation, and its next DECODE prefills
the whole conversation (its KV did not survive). Files that cannot be read are set aside, a
model file that changed keeps the agent but not its conversation, and a directory that cannot
be written is reported while the daemon serves on.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from daemon_harness import Daemon

from lmxd import catalog


def _converse(d: Daemon) -> dict[str, dict[str, object]]:
    w = d.wire()
    w.ok("REGISTER", agent="chat", model="smollm2-135m", n_ctx=1024, system_prompt="Be brief.")
    w.ok("REGISTER", agent="raw", model="gemma3-270m", n_ctx=512, sampling={"seed": 7})
    for turn in ("What is the capital of France?", "And of Italy?"):
        w.ok("DECODE", agent="chat", messages=[{"role": "user", "content": turn}], max_tokens=12)
        w.ok("DECODE", agent="raw", prompt=f" {turn}", max_tokens=8)
    listed = {a["agent"]: a for a in w.ok("LIST")["agents"]}
    w.close()
    time.sleep(0.5)  # the registry's last writes (milliseconds after each reply)
    return listed


@pytest.mark.parametrize("stop", ["sigterm", "kill -9"])
def test_agents_come_back_after_a_restart(tmp_path: Path, stop: str) -> None:
    state = tmp_path / "state"
    first = Daemon("--park-dir", str(state))
    try:
        before = _converse(first)
    finally:
        if stop == "kill -9":
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(30)
        else:
            assert first.stop() == 0, first.log()
    second = Daemon("--park-dir", str(state))
    try:
        w = second.wire()
        after = {a["agent"]: a for a in w.ok("LIST")["agents"]}
        assert set(after) == {"chat", "raw"}
        for name, agent in after.items():
            was = before[name]
            for key in ("model", "n_ctx", "tokens", "owner"):
                assert agent[key] == was[key], (name, key, agent, was)
            assert agent["state"] == "empty" and agent["kv_tokens"] == 0  # KV did not survive
        registry = w.ok("STATUS")["registry"]
        assert registry["restored"] == 2 and registry["dir"] == str(state / "agents")
        # the conversation goes on: all of it is prefilled again, then the new turn
        spain = [{"role": "user", "content": "And Spain?"}]
        reply = w.ok("DECODE", agent="chat", messages=spain, max_tokens=8)
        assert reply["cached_tokens"] == 0 and reply["prompt_tokens"] > before["chat"]["tokens"]
        raw = w.ok("DECODE", agent="raw", prompt=" And Spain?", max_tokens=4)
        assert raw["prompt_tokens"] > before["raw"]["tokens"] and raw["generated_tokens"] > 0
        # an unregistered agent stays gone after the next restart
        w.ok("UNREGISTER", agent="raw")
        time.sleep(0.5)
    finally:
        assert second.stop() == 0, second.log()
    third = Daemon("--park-dir", str(state))
    try:
        assert [a["agent"] for a in third.wire().ok("LIST")["agents"]] == ["chat"]
    finally:
        assert third.stop() == 0, third.log()


def test_unreadable_files_are_set_aside_and_a_changed_model_starts_anew(tmp_path: Path) -> None:
    state, models = tmp_path / "state", tmp_path / "models"
    models.mkdir()
    copy = models / "copy.gguf"
    shutil.copy(catalog.models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf", copy)
    args = ("--park-dir", str(state), "--allow-dir", str(models))
    first = Daemon(*args)
    try:
        w = first.wire()
        w.ok("REGISTER", agent="kept", model=str(copy), n_ctx=256)
        w.ok("DECODE", agent="kept", prompt="Hello there", max_tokens=4)
        w.ok("REGISTER", agent="same", model="smollm2-135m", n_ctx=256)
        w.ok("DECODE", agent="same", prompt="Hello there", max_tokens=4)
        time.sleep(0.5)
    finally:
        assert first.stop() == 0, first.log()
    (state / "agents" / "junk.json").write_bytes(b"{not json")
    (state / "agents" / "other.json").write_text('{"format": 99}')
    later = time.time() + 5
    os.utime(copy, (later, later))  # the file changed: its tokens no longer mean the same
    second = Daemon(*args)
    try:
        w = second.wire()
        agents = {a["agent"]: a for a in w.ok("LIST")["agents"]}
        assert set(agents) == {"kept", "same"}
        assert agents["kept"]["tokens"] == 0 and agents["same"]["tokens"] > 0
        registry = w.ok("STATUS")["registry"]
        assert registry["restored"] == 2 and registry["unreadable"] == 2
        left = sorted(p.name for p in (state / "agents").iterdir())
        assert left == ["junk.json.bad", "kept.json", "other.json.bad", "same.json"]
    finally:
        assert second.stop() == 0, second.log()


def test_a_park_dir_that_cannot_be_written_is_reported_and_the_daemon_serves() -> None:
    d = Daemon("--park-dir", "/proc/lmxd-cannot-be-here")
    try:
        w = d.wire()
        w.ok("REGISTER", agent="a", model="smollm2-135m", n_ctx=256)
        assert w.ok("DECODE", agent="a", prompt="Hi", max_tokens=2)["generated_tokens"] > 0
        time.sleep(0.3)
        registry = w.ok("STATUS")["registry"]
        assert registry["errors"] >= 1 and "/proc/lmxd-cannot-be-here" in registry["last_error"]
    finally:
        assert d.stop() == 0, d.log()
