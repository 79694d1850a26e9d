"""The demo's timeline (lmxd.cli.timeline): readings become states, park and restore marks,
and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmxd.cli.timeline import Timeline, draw


def _status(reserved: int) -> dict[str, Any]:
    return {
        "device": {"name": "host memory", "kind": "cpu", "process_used": 2 * reserved},
        "ledger": {"cap": 1000, "reserved": reserved},
    }


def _agent(name: str, state: str, parks: int, restores: int) -> dict[str, Any]:
    return {"agent": name, "state": state, "parks": parks, "restores": restores}


def test_readings_become_states_and_marks_and_a_chart(tmp_path: Path) -> None:
    t = Timeline()
    t._add(0.0, _status(100), [_agent("a", "decoding", 0, 0)])
    t._add(0.1, _status(300), [_agent("a", "parked", 1, 0), _agent("b", "decoding", 0, 0)])
    t._add(0.2, _status(300), [_agent("a", "decoding", 1, 1), _agent("b", "parked", 1, 0)])
    t._add(0.3, _status(200), [_agent("b", "resident", 1, 0)])  # a unregistered
    assert t.states == {
        "a": ["decoding", "parked", "decoding", "empty"],
        "b": ["empty", "decoding", "parked", "resident"],
    }
    assert t.parks == {"a": [0.1], "b": [0.2]} and t.restores == {"a": [0.2]}
    assert t.reserved == [100, 300, 300, 200] and t.measured == [200, 600, 600, 400]
    assert t.cap == 1000 and t.device == "host memory (cpu)"
    path = tmp_path / "chart" / "timeline.png"
    draw(t, path, "a test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
