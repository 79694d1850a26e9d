"""Parked state on disk, with a real daemon and real models (lmxd.kvdisk).

Agents take turns on one sequence (``--max-seqs 1``) under a park budget that holds two of
their states: the others go to disk, and every turn's greedy text is the one a daemon with
room to spare gives. Then the daemon is killed (``kill -9``), with spilled agents, or in the
middle of writing a state file, and every agent goes on greedy-identically after the
restart: from its file, or by prefilling its conversation. A disk that refuses writes (a
read-only directory, a full one) is reported, and loses nothing held in RAM.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import Daemon, Wire

AGENTS = ("a", "b", "c", "d")
PROMPTS = (" Once upon a time", " Then", " After that,", " In the end")
BUDGET = str(3 << 20)  # room for two parked states of about 1.3 MB


def _turn(w: Wire, agent: str, prompt: str) -> dict[str, Any]:
    return w.ok("DECODE", agent=agent, prompt=prompt, max_tokens=8)


def _rotation(d: Daemon, model: str, rounds: range) -> dict[tuple[str, int], str]:
    """Each agent's turn, round after round: the text of each."""
    w = d.wire()
    try:
        if rounds.start == 0:
            for agent in AGENTS:
                w.ok("REGISTER", agent=agent, model=model, n_ctx=512)
        return {(a, r): _turn(w, a, PROMPTS[r])["text"] for r in rounds for a in AGENTS}
    finally:
        w.close()


def _reference(model: str) -> dict[tuple[str, int], str]:
    d = Daemon("--max-seqs", "1")
    try:
        return _rotation(d, model, range(len(PROMPTS)))
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_spilled_agents_go_on_exactly_and_survive_a_kill(tmp_path: Path, model: str) -> None:
    expected = _reference(model)
    state = tmp_path / "state"
    args = ("--max-seqs", "1", "--park-budget", BUDGET, "--park-dir", str(state))
    first = Daemon(*args)
    try:
        got = _rotation(first, model, range(3))
        assert got == {k: v for k, v in expected.items() if k[1] < 3}
        time.sleep(0.5)  # idle: parked agents spill until their states take 3/4 of the budget
        w = first.wire()
        status = w.ok("STATUS")
        transfers, disk = status["transfers"], status["disk"]
        assert transfers["spills"] > 0 and transfers["disk_reads"] > 0, transfers
        states = {a["agent"]: a["state"] for a in w.ok("LIST")["agents"]}
        spilled = {a for a, s in states.items() if s == "spilled"}
        assert spilled and disk["files"] == len(spilled), (states, disk)
        assert {p.stem for p in (state / "states").glob("*.state")} == spilled
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    second = Daemon(*args)
    try:
        w = second.wire()
        after = {a["agent"]: a for a in w.ok("LIST")["agents"]}
        assert {a for a, v in after.items() if v["state"] == "spilled"} == spilled
        assert all(after[a]["kv_tokens"] > 0 for a in spilled)
        assert w.ok("STATUS")["registry"]["states_restored"] == len(spilled)
        for agent in AGENTS:
            reply = _turn(w, agent, PROMPTS[3])
            assert reply["text"] == expected[(agent, 3)], agent
            assert reply["restored"] == (agent in spilled) == (reply["cached_tokens"] > 0)
    finally:
        assert second.stop() == 0, second.log()


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_a_kill_in_the_middle_of_a_state_write_loses_nothing(tmp_path: Path, model: str) -> None:
    """States of 11-25 MB take a while to write: the daemon is killed as soon as a
    temporary file appears. After the restart no half-written file is used or left, and
    every agent's next turn is the one it would have had."""
    story = " ".join(["The old lighthouse keeper climbed the stairs every night."] * 110)
    prompts = (story, " Then")

    def first_turns(d: Daemon) -> dict[str, str]:
        """Each agent registered, and its first turn: the text of each."""
        w = d.wire()
        try:
            out = {}
            for agent in AGENTS[:3]:
                w.ok("REGISTER", agent=agent, model=model, n_ctx=2048)
                out[agent] = _turn(w, agent, prompts[0])["text"]
            return out
        finally:
            w.close()

    reference = Daemon("--max-seqs", "1")
    try:
        first = first_turns(reference)
        w = reference.wire()
        second = {a: _turn(w, a, prompts[1])["text"] for a in AGENTS[:3]}
    finally:
        assert reference.stop() == 0, reference.log()

    state = tmp_path / "state"
    # Room for one parked state (about 25 MB of SmolLM2's, 11 MB of Gemma's): the next park
    # spills it.
    budget = {"smollm2-135m": 48 << 20, "gemma3-270m": 24 << 20}[model]
    args = ("--max-seqs", "1", "--park-budget", str(budget), "--park-dir", str(state))
    killed = Daemon(*args)
    client = threading.Thread(target=lambda: _quietly(lambda: first_turns(killed)), daemon=True)
    client.start()
    try:
        assert _wait_for(lambda: any((state / "states").glob(".*.tmp")), 120), killed.log()
    finally:
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(30)
    client.join(30)
    restarted = Daemon(*args)
    try:
        assert not list((state / "states").glob(".*.tmp"))
        w = restarted.wire()
        for agent in w.ok("LIST")["agents"]:
            name = agent["agent"]
            if agent["tokens"] == 0:  # its first turn had not ended: it starts again
                reply = _turn(w, name, prompts[0])
                assert reply["text"] == first[name], name
            else:
                reply = _turn(w, name, prompts[1])
                assert reply["text"] == second[name], name
                assert reply["restored"] == (agent["state"] == "spilled")
    finally:
        assert restarted.stop() == 0, restarted.log()


@contextlib.contextmanager
def _refusing(how: str, states: Path, daemon: Daemon) -> Iterator[None]:
    """The daemon's state directory refuses writes: ``read-only`` (immutable, as root is not
    stopped by permissions) or ``full`` (no file may grow past 64 KiB: the write fails as
    on a full disk, EFBIG instead of ENOSPC)."""
    if how == "read-only":
        states.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chattr", "+i", str(states)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(states)], check=True)
    else:
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (64 << 10, hard))
        try:
            yield
        finally:
            resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_a_disk_that_refuses_writes_is_reported_and_loses_nothing(tmp_path: Path, how: str) -> None:
    expected = _reference("smollm2-135m")
    state = tmp_path / "state"
    # Room for two parked states after one turn each (1 MiB buffers, the smallest).
    d = Daemon("--max-seqs", "1", "--park-budget", str(2 << 20), "--park-dir", str(state))
    try:
        w = d.wire()
        with _refusing(how, state / "states", d):
            for agent in AGENTS:
                w.ok("REGISTER", agent=agent, model="smollm2-135m", n_ctx=512)
            for agent in AGENTS[:3]:  # two parked, in RAM: the budget is spent
                assert _turn(w, agent, PROMPTS[0])["text"] == expected[(agent, 0)]
            refused = w.call("DECODE", agent="d", prompt=PROMPTS[0], max_tokens=8)
            assert refused["error"]["code"] == "PARK_BUDGET_EXCEEDED", refused
            disk = w.ok("STATUS")["disk"]
            assert disk["errors"] >= 1 and str(state / "states") in disk["last_error"], disk
            assert disk["files"] == 0
            states = {a["agent"]: a["state"] for a in w.ok("LIST")["agents"]}
            assert states == {"a": "parked", "b": "parked", "c": "resident", "d": "empty"}
            # nothing was lost: c goes on where it was
            assert _turn(w, "c", PROMPTS[1])["text"] == expected[("c", 1)]
        # the disk takes writes again: d's turn spills a parked agent, and all go on
        assert _turn(w, "d", PROMPTS[0])["text"] == expected[("d", 0)]
        for agent in ("a", "b", "d"):
            assert _turn(w, agent, PROMPTS[1])["text"] == expected[(agent, 1)], agent
        assert w.ok("STATUS")["transfers"]["spills"] > 0
    finally:
        assert d.stop() == 0, d.log()


def _quietly(call: Any) -> None:
    with contextlib.suppress(ConnectionError, OSError, AssertionError):
        call()


def _wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False
