"""The `lmxd` command: real subprocesses, clear errors with exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def lmxd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmxd.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_models_lists_the_catalog() -> None:
    result = lmxd("models")
    assert result.returncode == 0, result.stderr
    for expected in ("smollm2-135m", "gemma3-270m", "gemma3", "Q4_1", "8192", "32768"):
        assert expected in result.stdout


def test_estimate_with_measure(tiny: Path) -> None:
    result = lmxd("estimate", str(tiny), "--n-ctx", "1024", "--measure")
    assert result.returncode == 0, result.stderr
    assert "predicted" in result.stdout and "measured" in result.stdout and "kv" in result.stdout


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["estimate", "/nonexistent/model.gguf", "--n-ctx", "512"], "BAD_MODEL_FILE"),
        (["estimate", "smollm2-135m", "--n-ctx", "0"], "BAD_N_CTX"),
        (["estimate", "smollm2-135m", "--n-ctx", "100000"], "BAD_N_CTX"),
        (["estimate", "gpt-5", "--n-ctx", "512"], "UNKNOWN_MODEL"),
        (["estimate", "/etc/hostname", "--n-ctx", "512"], "BAD_MODEL_FILE"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], code: str) -> None:
    result = lmxd(*args)
    assert result.returncode == 2
    assert f"[{code}]" in result.stderr
    assert "Traceback" not in result.stderr
