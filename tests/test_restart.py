"""Agents survive a restart: kept on disk (lmxd.registry), registered again, conversation kept.

A real daemon, stopped cleanly or killed, and a second one on the same --park-dir: every agent
is listed again with its owner, model, n_ctx and conversation. After a clean stop its KV comes
back from its state file and it goes on exactly where it was; after a kill its next DECODE
prefills the whole conversation. Files that cannot be read are set aside, a state file that
does not verify falls back to prefilling, a model file that changed keeps the agent but not
its conversation, and a directory that cannot be written is reported while the daemon serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_harness import Daemon

from lmxd import catalog
from lmxd.errors import DaemonFailed


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
            if stop == "sigterm":  # a clean stop wrote its KV: it is back with its file
                assert agent["state"] == "spilled" and agent["kv_tokens"] > 0
            else:  # killed: its KV did not survive
                assert agent["state"] == "empty" and agent["kv_tokens"] == 0
        registry = w.ok("STATUS")["registry"]
        assert registry["restored"] == 2 and registry["dir"] == str(state / "agents")
        assert registry["states_restored"] == (2 if stop == "sigterm" else 0)
        # the conversation goes on: restored from its state, or all of it prefilled again
        spain = [{"role": "user", "content": "And Spain?"}]
        reply = w.ok("DECODE", agent="chat", messages=spain, max_tokens=8)
        raw = w.ok("DECODE", agent="raw", prompt=" And Spain?", max_tokens=4)
        for got, was in ((reply, before["chat"]), (raw, before["raw"])):
            assert got["restored"] == (stop == "sigterm") and got["generated_tokens"] > 0
            assert got["cached_tokens"] + got["prompt_tokens"] > was["tokens"]
            assert (got["cached_tokens"] > 0) == (stop == "sigterm")
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


TURNS = (" The first thing to know is", " Then,", " And finally")


def _two_turns(d: Daemon, model: str) -> None:
    w = d.wire()
    w.ok("REGISTER", agent="a", model=model, n_ctx=512)
    for turn in TURNS[:2]:
        w.ok("DECODE", agent="a", prompt=turn, max_tokens=12)
    w.close()


def _stopped_after_two_turns(state: Path, model: str) -> None:
    """A daemon on ``state`` whose agent ``a`` had two turns, then stopped cleanly."""
    d = Daemon("--park-dir", str(state))
    try:
        _two_turns(d, model)
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_after_a_clean_stop_an_agent_goes_on_exactly_where_it_was(
    tmp_path: Path, model: str
) -> None:
    """A clean stop writes each idle agent's KV to its state file; after the restart the agent
    is parked with it, and its next DECODE restores it and gives the greedy text it would
    have given without the restart."""
    straight = Daemon()
    try:
        _two_turns(straight, model)
        expected = straight.wire().ok("DECODE", agent="a", prompt=TURNS[2], max_tokens=12)
    finally:
        assert straight.stop() == 0, straight.log()
    state = tmp_path / "state"
    _stopped_after_two_turns(state, model)
    assert (state / "states" / "a.state").is_file()
    second = Daemon("--park-dir", str(state))
    try:
        w = second.wire()
        [agent] = w.ok("LIST")["agents"]
        assert agent["state"] == "spilled" and agent["kv_tokens"] > 0
        got = w.ok("DECODE", agent="a", prompt=TURNS[2], max_tokens=12)
        assert got["text"] == expected["text"]
        assert got["restored"] and got["cached_tokens"] > 0
        assert w.ok("STATUS")["registry"]["states_restored"] == 1
        assert not (state / "states" / "a.state").exists()  # read once
    finally:
        assert second.stop() == 0, second.log()


def _rewrite_header(path: Path, **fields: object) -> None:
    header, data = path.read_bytes().split(b"\n", 1)
    path.write_bytes(json.dumps({**json.loads(header), **fields}).encode() + b"\n" + data)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one byte of the state, not of its header
    path.write_bytes(bytes(data))


# Each way a state file can be wrong, and the reason the daemon gives for not using it.
BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupted": (_flip_a_byte, "checksum does not match"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "truncated"),
    "another model": (
        lambda p: _rewrite_header(p, model_size=123),
        "for another agent or model file",
    ),
    "another llama.cpp": (
        lambda p: _rewrite_header(p, llama_cpp="0.0.1"),
        "written by llama-cpp-python 0.0.1",
    ),
    "another conversation": (
        lambda p: _rewrite_header(p, tokens_crc32=12345),
        "holds another conversation",
    ),
    "not a header": (lambda p: p.write_bytes(b"\x00" * 5000), "header cannot be read"),
}


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_a_state_file_that_does_not_verify_falls_back_to_prefilling(
    tmp_path: Path, bad: str
) -> None:
    """Never a wrong continuation: the conversation is prefilled instead, and the greedy
    text is the one the agent would have given without the restart."""
    straight = Daemon()
    try:
        _two_turns(straight, "smollm2-135m")
        expected = straight.wire().ok("DECODE", agent="a", prompt=TURNS[2], max_tokens=12)
    finally:
        assert straight.stop() == 0, straight.log()
    state = tmp_path / "state"
    _stopped_after_two_turns(state, "smollm2-135m")
    spoil, why = BAD_FILES[bad]
    spoil(state / "states" / "a.state")
    second = Daemon("--park-dir", str(state))
    try:
        w = second.wire()
        [agent] = w.ok("LIST")["agents"]
        assert agent["tokens"] > 0
        got = w.ok("DECODE", agent="a", prompt=TURNS[2], max_tokens=12)
        assert got["cached_tokens"] == 0 and not got["restored"]
        assert got["text"] == expected["text"]
        disk = w.ok("STATUS")["disk"]
        assert disk["rejected"] == 1 and why in disk["last_error"], disk
        assert why in second.log()
        assert not (state / "states" / "a.state").exists()
    finally:
        assert second.stop() == 0, second.log()


def test_a_second_daemon_on_the_same_park_dir_is_refused(tmp_path: Path) -> None:
    """It would register the first one's agents and remove their files."""
    state = tmp_path / "state"
    first = Daemon("--park-dir", str(state))
    try:
        with pytest.raises(DaemonFailed) as refused:
            Daemon("--park-dir", str(state))
        assert "another daemon keeps its agents in" in str(refused.value)
        assert first.wire().ok("HELLO")["protocol"] == 1  # the first one serves on
    finally:
        assert first.stop() == 0, first.log()
