"""`lmxd serve`: start the daemon in the foreground; `lmxd config`: what it would start with."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lmxd import logs
from lmxd.cli import main
from lmxd.cli.checks import OFF, group_id
from lmxd.cli.options import serve_options
from lmxd.cli.settings import Settings, resolve, show
from lmxd.errors import LmxdError
from lmxd.fronts.http import HttpConfig, parse_address
from lmxd.units import parse_bytes

if TYPE_CHECKING:  # the daemon's modules load llama.cpp: only `lmxd serve` needs them
    from lmxd.daemon import DaemonConfig


@main.command()
@serve_options
@click.pass_context
def serve(ctx: click.Context, /, **_: object) -> None:
    """Run the daemon: one process owns the device; agents connect over a Unix socket and the
    OpenAI-compatible HTTP API."""
    from lmxd.daemon import serve as run_daemon

    settings = resolve(ctx)
    logs.configure(_level(ctx, settings["log_level"]), settings["log_format"])
    try:
        run_daemon(daemon_config(settings))
    except LmxdError as exc:  # at the start: a live daemon on the socket, an exposed API...
        if settings["log_format"] != "json":
            raise  # lmxd.cli.LmxdGroup: one line, exit status 2
        # A log of JSON lines stays one, to its last line.
        facts = logs.pairs({"code": exc.code, **exc.details})
        logging.getLogger("lmxd.daemon").error("not started %s: %s", facts, exc.message)
        sys.exit(2)


@main.command(name="config")
@serve_options
@click.pass_context
def config_command(ctx: click.Context, /, **_: object) -> None:
    """Print the configuration `lmxd serve` would start with, given the same options: each
    key's value and where it comes from (default, the config file, the command line or the
    environment), as TOML."""
    click.echo(show(resolve(ctx)), nl=False)


def _level(ctx: click.Context, name: str) -> int:
    """--log-level, or lower where `lmxd -v` (INFO) or `-vv` (DEBUG) asks for more."""
    level = logs.LEVELS[name]
    verbose = ctx.find_root().params.get("verbose", 0)
    return min(level, logging.INFO if verbose == 1 else logging.DEBUG) if verbose else level


def daemon_config(settings: Settings) -> DaemonConfig:
    """The daemon's configuration from checked settings (lmxd.cli.checks)."""
    from lmxd.daemon import DaemonConfig

    s = settings
    directory = Path(s["models_dir"])
    return DaemonConfig(
        socket=Path(s["socket"]),
        socket_mode=int(s["socket_mode"], 8),
        socket_group=None if s["socket_group"] is None else group_id(s["socket_group"]),
        models_dir=directory,
        allowed_dirs=(directory, *map(Path, s["allow_dir"])),
        devices=None if s["devices"] is None else tuple(map(int, s["devices"].split(","))),
        vram_cap_percent=s["vram_cap_percent"],
        vram_limit=s["vram_limit"],
        partial=s["partial"],
        host_limit=None if s["host_limit"] is None else parse_bytes(s["host_limit"]),
        op_offload=s["op_offload"],
        park_budget=parse_bytes(s["park_budget"]),
        keep_alive_s=s["keep_alive"],
        max_queue=s["max_queue"],
        default_n_ctx=s["n_ctx"],
        park_after_decode=s["park_after_decode"],
        deterministic=s["deterministic"],
        n_threads=s["threads"],
        max_seqs=s["max_seqs"],
        http=None if s["http"] == OFF else HttpConfig(*parse_address(s["http"]), s["api_key"]),
        auto_agents=s["auto_agents"],
        auto_agent_ttl_s=s["auto_agent_ttl"],
        stream_timeout_s=s["stream_timeout"],
        park_dir=None if s["park_dir"] == OFF else Path(s["park_dir"]),
        agents=s.agents,
        config_file=s.file,
    )
