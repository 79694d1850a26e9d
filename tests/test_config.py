"""The config file of `lmxd serve` and `lmxd config`, in process: keys, precedence, every
error a bad file can give, and the JSON log format's parsing. The daemon's own use of them is
in tests/test_ops.py."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from lmxd import logs
from lmxd.cli import main
from lmxd.cli.daemon import serve


def lmxd_config(tmp_path: Path, *args: str, file: str | None = None) -> Result:
    """`lmxd config` with a config home of its own (so that no user's file counts), and
    ``file`` as the config file given with --config."""
    if file is not None:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "lmxd.toml").write_text(file)
        args = ("--config", str(tmp_path / "lmxd.toml"), *args)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "home"), "LMXD_API_KEY": None}
    return CliRunner().invoke(main, ["config", *args], env=env)


def sources(output: str) -> dict[str, str]:
    """Each set key's source, from the comment `lmxd config` puts after it."""
    return {
        line.split(" = ")[0]: line.rsplit("  # ", 1)[1]
        for line in output.splitlines()
        if " = " in line and not line.startswith("#") and "  # " in line
    }


def test_every_option_of_serve_is_a_key_named_after_its_long_option() -> None:
    keys = []
    for param in serve.params:
        if isinstance(param, click.Option) and param.name not in ("help", "config"):
            assert param.name == param.opts[0].removeprefix("--").replace("-", "_")
            keys.append(param.name)
    # README's table of keys has every one, in `lmxd serve --help`'s order
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("| key | TOML type | default |")[1].split("\n\n")[0]
    assert re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE) == keys


def test_precedence_default_then_file_then_command_line(tmp_path: Path) -> None:
    file = 'park_budget = "2GiB"\nmax_queue = 9\nallow_dir = ["models", "/abs"]\n'
    got = lmxd_config(tmp_path, "--max-queue", "5", "--allow-dir", "/cli", file=file)
    assert got.exit_code == 0, got.output
    settings = tomllib.loads(got.output)
    assert settings["park_budget"] == "2GiB"  # the file's
    assert settings["max_queue"] == 5  # the command line's, over the file's
    assert settings["allow_dir"] == ["/cli"]  # a list on the command line replaces the file's
    assert settings["max_seqs"] == 16  # the default
    where = sources(got.output)
    assert where["park_budget"] == f"file {tmp_path / 'lmxd.toml'}"
    assert where["max_queue"] == where["allow_dir"] == "command line"
    assert where["max_seqs"] == "default"
    # relative paths in the file are the file's directory's
    alone = tomllib.loads(lmxd_config(tmp_path, file=file).output)
    assert alone["allow_dir"] == [str(tmp_path / "models"), "/abs"]


def test_the_default_file_is_read_unless_config_none(tmp_path: Path) -> None:
    default = tmp_path / "home" / "lmxd" / "lmxd.toml"
    default.parent.mkdir(parents=True)
    default.write_text('park_budget = "3GiB"\n')
    got = lmxd_config(tmp_path)
    assert tomllib.loads(got.output)["park_budget"] == "3GiB"
    assert f"# config file: {default} (the default location)" in got.output
    none = lmxd_config(tmp_path, "--config", "none")
    assert tomllib.loads(none.output)["park_budget"] == "8GiB"
    assert "# config file: none (--config none)" in none.output


def test_the_output_is_toml_with_agents_and_no_api_key(tmp_path: Path) -> None:
    file = """
api_key = "sekrit"
deterministic = true
vram_cap_percent = 80
devices = [0, 1]

[[agent]]
name = "coder"
model = "smollm2-135m"
n_ctx = 4096
system_prompt = "You write \\"Python\\"."
sampling = { temperature = 0.2, seed = 7 }
"""
    got = lmxd_config(tmp_path, "--no-deterministic", file=file)
    assert got.exit_code == 0, got.output
    assert "sekrit" not in got.output and "# api_key = (set, not shown)" in got.output
    settings = tomllib.loads(got.output)
    assert settings["deterministic"] is False  # --no-deterministic undoes the file's flag
    assert settings["vram_cap_percent"] == "80" and settings["devices"] == "0,1"
    assert settings["agent"] == [
        {
            "name": "coder",
            "model": "smollm2-135m",
            "n_ctx": 4096,
            "system_prompt": 'You write "Python".',
            "sampling": {"temperature": 0.2, "seed": 7},
        }
    ]
    # the output is a config file that gives the same settings (the key aside: not shown)
    again = lmxd_config(tmp_path / "again", file=got.output)
    assert again.exit_code == 0, again.output
    assert tomllib.loads(again.output) == settings


BAD_FILES = [
    ('park_buget = "8GiB"\n', "unknown key 'park_buget' (did you mean 'park_budget'?)"),
    ('max_queue = "64"\n', 'max_queue: expected an integer, got a string ("64")'),
    ("deterministic = 1\n", "deterministic: expected true or false, got an integer (1)"),
    ("keep_alive = true\n", "keep_alive: expected an integer or a number, got true or false"),
    ('allow_dir = "/x"\n', 'allow_dir: expected a list of strings, got a string ("/x")'),
    (
        'park_budget = "eight"\n',
        "park_budget: cannot read 'eight' as a size: expected a number and a unit such as "
        "8GiB, 512MiB or 2GB",
    ),
    ('vram_limit = "0=8GiB,1=lots"\n', "vram_limit: cannot read 'lots' as a size"),
    ("vram_cap_percent = 120\n", "vram_cap_percent: '120': expected a percentage in (0, 100]"),
    ("max_seqs = 300\n", "max_seqs: 300 is not in the range 1<=x<=256."),
    ('socket_mode = "0777"\n', "socket_mode: '0777': a socket mode gives its owner read and"),
    ('http = "nowhere"\n', "http: --http takes HOST:PORT, [IPv6]:PORT, :PORT or off"),
    ('log_level = "loud"\n', "log_level: 'loud' is not one of 'debug', 'info', 'warning'"),
    (
        "park_budget = 8GiB\n",
        "lmxd.toml is not valid TOML: Expected newline or end of document after a statement "
        "(at line 1, column 16)",
    ),
    ("[[agent]]\nname = 'coder'\n", "[[agent]] #1 (coder): object missing required field `model`"),
    (
        "[[agent]]\nname = 'a'\nmodel = 'm'\ncontext = 1\n",
        "[[agent]] #1 (a): object contains unknown field `context`; the fields are name, "
        "model, n_ctx, system_prompt, sampling",
    ),
    ("[[agent]]\nname = 'a'\nmodel = 'm'\nn_ctx = '4k'\n", "(a): n_ctx: expected `int`, got `str`"),
    (
        "[[agent]]\nname = 'a'\nmodel = 'm'\nsampling = { temp = 1 }\n",
        "(a): sampling: object contains unknown field `temp`; the fields are temperature,",
    ),
    (
        "[[agent]]\nname = 'a'\nmodel = 'm'\nsampling = { temperature = -1 }\n",
        "(a): sampling.temperature: expected `float` >= 0.0",
    ),
    ("[[agent]]\nname = 'a b'\nmodel = 'm'\n", "(a b): name: expected `str` matching regex"),
    (
        "[[agent]]\nname = 'a'\nmodel = 'm'\n[[agent]]\nname = 'a'\nmodel = 'n'\n",
        "[[agent]] #2 (a): agent 'a' is declared twice",
    ),
    ('agent = "coder"\n', "agent: expected [[agent]] tables, each with a name and a model"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    got = lmxd_config(tmp_path, file=text)
    assert got.exit_code == 2
    assert got.exception is None or isinstance(got.exception, SystemExit)
    said = " ".join(got.output.split())  # rich wraps long lines
    assert said.startswith(f"error [BAD_CONFIG] {tmp_path / 'lmxd.toml'}")
    assert message in said, said


def test_a_missing_file_and_serve_itself(tmp_path: Path) -> None:
    missing = lmxd_config(tmp_path, "--config", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 2
    assert f"cannot read config file {tmp_path / 'nope.toml'}: No such file" in missing.output
    # serve refuses it the same way, before anything is loaded: no traceback, status 2
    (tmp_path / "bad.toml").write_text("max_seqs = 0\n")
    cmd = [sys.executable, "-m", "lmxd.cli", "serve", "--config", str(tmp_path / "bad.toml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "[BAD_CONFIG]" in done.stderr and "max_seqs: 0 is not in the range" in done.stderr


def test_json_log_lines_carry_their_pairs_as_fields() -> None:
    record = logging.LogRecord(
        "lmxd.service", logging.WARNING, __file__, 1, "refused %s: %s", None, None
    )
    line = logs.pairs(
        {
            "op": "REGISTER",
            "agent": "a.b-1",
            "code": "VRAM_LEDGER_DENY",
            "cap_bytes": 113246208,
            "parts": {"weights": 96576768, "kv": 0},
            "ratio": 0.5,
            "mode": "0600",
            "path": "/a dir/m.gguf",
            "ok": False,
            "devices": [{"device": 0}],
        }
    )
    record.args = (line, "VRAM ledger denies: needs 129.43 MiB")
    got = json.loads(logs.JsonFormatter().format(record))
    assert got["level"] == "warning" and got["logger"] == "lmxd.service"
    assert got["time"].endswith("+00:00") and "T" in got["time"]
    assert got["message"].startswith("refused op=REGISTER agent=a.b-1")
    fields = {k: got[k] for k in got if k not in ("time", "level", "logger", "message")}
    assert fields == {
        "op": "REGISTER",
        "agent": "a.b-1",
        "code": "VRAM_LEDGER_DENY",
        "cap_bytes": 113246208,
        "parts.weights": 96576768,
        "parts.kv": 0,
        "ratio": 0.5,
        "mode": "0600",  # text: a leading zero is no number
        "path": "/a dir/m.gguf",  # quoted, for its space
        "ok": False,
    }
    assert logs.fields("time=1 level=x park agent=coder") == {"agent": "coder"}
