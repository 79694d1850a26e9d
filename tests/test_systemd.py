"""`lmxd service install | uninstall`: the systemd user unit, written into a config home of
the test's own, and checked by systemd-analyze where the machine has it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lmxd.cli import main
from lmxd.cli.service import _quote

COMMANDS = [
    "systemctl --user daemon-reload",
    "systemctl --user enable --now lmxd",
    "systemctl --user status lmxd",
    "journalctl --user -u lmxd -f",
]


def lmxd(home: Path, *args: str) -> Result:
    env = {"XDG_CONFIG_HOME": str(home), "LMXD_MODELS_DIR": "/models/100% mine"}
    return CliRunner().invoke(main, list(args), env=env)


def test_install_writes_the_unit_and_prints_the_commands(tmp_path: Path) -> None:
    config = tmp_path / "lmxd.toml"
    config.write_text('park_budget = "4GiB"\n')
    dry = lmxd(tmp_path, "service", "install", "--config", str(config), "--dry-run")
    assert dry.exit_code == 0, dry.output
    unit = tmp_path / "systemd" / "user" / "lmxd.service"
    assert not unit.exists() and f"# {unit} (not written: --dry-run)" in dry.output
    got = lmxd(tmp_path, "service", "install", "--config", str(config))
    assert got.exit_code == 0, got.output
    text = unit.read_text()
    assert text in dry.output  # the dry run showed exactly what is written
    exec_start = f"ExecStart={Path(sys.executable).absolute()} -m lmxd.cli serve --config {config}"
    assert exec_start in text.splitlines()
    for line in ("Restart=on-failure", "RestartPreventExitStatus=2", "WantedBy=default.target"):
        assert line in text.splitlines()
    assert 'Environment="LMXD_MODELS_DIR=/models/100%% mine"' in text.splitlines()
    assert all(command in got.output for command in COMMANDS)
    assert "[Socket]" not in text


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the unit file was NOT verified")
    got = lmxd(tmp_path, "service", "install")
    assert got.exit_code == 0, got.output
    runtime = tmp_path / "run"  # the user manager's runtime directory, which verify needs
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        [analyze, "--user", "verify", str(tmp_path / "systemd" / "user" / "lmxd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "XDG_RUNTIME_DIR": str(runtime),
            "XDG_CONFIG_HOME": str(tmp_path),
            "PATH": "/usr/bin:/bin",
        },
    )
    # verify's warnings (an unknown key, a bad value) leave its status 0: none is allowed
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done


def test_install_checks_the_file_and_uninstall_removes_the_unit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("max_queue = 0\n")
    refused = lmxd(tmp_path, "service", "install", "--config", str(bad))
    assert refused.exit_code == 2 and "max_queue: 0 is not in the range" in refused.output
    unit = tmp_path / "systemd" / "user" / "lmxd.service"
    assert not unit.exists()
    assert lmxd(tmp_path, "service", "install").exit_code == 0
    link = tmp_path / "systemd" / "user" / "default.target.wants" / "lmxd.service"
    link.parent.mkdir()
    link.symlink_to(unit)  # as `systemctl --user enable` leaves it
    gone = lmxd(tmp_path, "service", "uninstall")
    assert gone.exit_code == 0 and f"removed {unit}" in gone.output
    assert not unit.exists() and not link.is_symlink()
    assert "systemctl --user daemon-reload" in gone.output
    assert "nothing to remove" in lmxd(tmp_path, "service", "uninstall").output


@pytest.mark.parametrize(
    ("word", "dollars", "written"),
    [
        ("/usr/bin/python3", True, "/usr/bin/python3"),
        ("/home/me/my venv/bin/python", True, '"/home/me/my venv/bin/python"'),
        ("/a/100%/$HOME", True, "/a/100%%/$$HOME"),
        ('K=say "hi"\\', False, '"K=say \\"hi\\"\\\\"'),
        ("K=$x", False, "K=$x"),
    ],
)
def test_unit_words_are_quoted_for_systemd(word: str, dollars: bool, written: str) -> None:
    assert _quote(word, dollars) == written
