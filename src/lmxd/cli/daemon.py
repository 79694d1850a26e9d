"""`lmxd serve`: start the daemon in the foreground."""

from __future__ import annotations

import grp
import logging
from pathlib import Path

import click
import platformdirs

from lmxd import catalog, protocol
from lmxd.cli import main
from lmxd.fronts.http import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, HttpConfig, parse_address
from lmxd.units import parse_bytes


@main.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Unix socket (default: $XDG_RUNTIME_DIR/lmxd.sock, else /tmp/lmxd-$UID.sock).",
)
@click.option(
    "--socket-mode",
    default="0600",
    show_default=True,
    help="The socket's permissions, in octal: 0660 with --socket-group shares it with a "
    "group, 0666 with every local user. Each user's agents stay their own.",
)
@click.option(
    "--socket-group",
    default=None,
    help="The socket's group (a name or a gid), for a --socket-mode such as 0660.",
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Catalog models directory (default: ${catalog.MODELS_DIR_ENV} or user cache).",
)
@click.option(
    "--allow-dir",
    "allow_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another directory agents may load .gguf files from (repeatable).",
)
@click.option(
    "--devices",
    default=None,
    help="The GPUs to use, e.g. 0,1 (NVML's indices); default: every one.",
)
@click.option(
    "--vram-cap-percent",
    default=None,
    help="Each device's ledger admits work up to this share of it (default 90), for all "
    "(80) or per device (0=80,1=90).",
)
@click.option(
    "--vram-limit",
    default=None,
    help="Behave as a card of this size, e.g. 8GiB (on CPU: host memory), for all or per "
    "device (0=8GiB,1=16GiB).",
)
@click.option(
    "--park-budget",
    default="8GiB",
    show_default=True,
    help="Host RAM for parked agents' KV state; past it, the least recently used parked states "
    "go to disk under --park-dir.",
)
@click.option(
    "--keep-alive",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds a model stays loaded after its last agent goes (0 = unload at once).",
)
@click.option(
    "--max-queue",
    type=int,
    default=64,
    show_default=True,
    help="DECODE jobs one agent may have waiting or running; past it its requests get BUSY.",
)
@click.option(
    "--n-ctx",
    "default_n_ctx",
    type=int,
    default=4096,
    show_default=True,
    help="n_ctx of agents registered without one: the text protocol's REGISTER, and the "
    "agents the HTTP API creates.",
)
@click.option(
    "--park-after-decode",
    is_flag=True,
    help="Testing: park every agent as soon as its DECODE ends (a park the --park-budget "
    "cannot hold is skipped, with a warning in the log).",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Decode one agent per step, so that an agent's output is the same whatever else "
    "runs (agents of a model no longer share steps: see docs/benchmarks.md for the cost).",
)
@click.option(
    "--threads",
    type=int,
    default=0,
    help="CPU threads for llama.cpp (0 = up to all cores, fewer while other processes "
    "hold some: measured as it runs).",
)
@click.option(
    "--http",
    "http_address",
    default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
    show_default=True,
    help="Where the OpenAI-compatible HTTP API listens: HOST:PORT, [IPv6]:PORT, :PORT, or off.",
)
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    default=None,
    help=f"Require `Authorization: Bearer KEY` on HTTP (default: ${API_KEY_ENV}). Needed to "
    "listen anywhere but loopback.",
)
@click.option(
    "--auto-agents",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Agents the HTTP API may create per model: auto-agents for requests that name a "
    "model, and agents an X-Lmxd-Agent header names.",
)
@click.option(
    "--auto-agent-ttl",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds an auto-agent may stay idle before it is unregistered.",
)
@click.option(
    "--stream-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a streamed reply may wait, its buffer full, for a client that reads nothing "
    "before it is cancelled; a socket client whose replies wait unread this long is "
    "disconnected.",
)
@click.option(
    "--park-dir",
    default=None,
    help="Where agents are kept for a restart (each agent's model, settings and conversation), "
    "and parked KV past --park-budget and at a clean stop (default: the user's state "
    "directory, lmxd/ in it); `off` keeps none.",
)
@click.option(
    "--max-seqs",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Agents of one model resident at once (sequences per context); others park.",
)
def serve(
    socket_path: Path | None,
    socket_mode: str,
    socket_group: str | None,
    models_dir: Path | None,
    allow_dirs: tuple[Path, ...],
    devices: str | None,
    vram_cap_percent: str | None,
    vram_limit: str | None,
    park_budget: str,
    keep_alive: float,
    max_queue: int,
    default_n_ctx: int,
    park_after_decode: bool,
    deterministic: bool,
    threads: int,
    http_address: str,
    api_key: str | None,
    auto_agents: int,
    auto_agent_ttl: float,
    stream_timeout: float,
    park_dir: str | None,
    max_seqs: int,
) -> None:
    """Run the daemon: one process owns the device; agents connect over a Unix socket and the
    OpenAI-compatible HTTP API."""
    from lmxd.daemon import DaemonConfig
    from lmxd.daemon import serve as run_daemon

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    directory = catalog.models_dir(models_dir)
    config = DaemonConfig(
        socket=socket_path or protocol.default_socket_path(),
        socket_mode=_socket_mode(socket_mode),
        socket_group=None if socket_group is None else _group_id(socket_group),
        models_dir=directory,
        allowed_dirs=(directory, *allow_dirs),
        devices=None if devices is None else _device_list(devices),
        vram_cap_percent=vram_cap_percent,
        vram_limit=vram_limit,
        park_budget=parse_bytes(park_budget),
        keep_alive_s=keep_alive,
        max_queue=max_queue,
        default_n_ctx=default_n_ctx,
        park_after_decode=park_after_decode,
        deterministic=deterministic,
        n_threads=threads,
        max_seqs=max_seqs,
        http=None if http_address == "off" else HttpConfig(*parse_address(http_address), api_key),
        auto_agents=auto_agents,
        auto_agent_ttl_s=auto_agent_ttl,
        stream_timeout_s=stream_timeout,
        park_dir=_park_dir(park_dir),
    )
    run_daemon(config)


def _device_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of GPU indices such as 0,1") from None


def _socket_mode(text: str) -> int:
    """An octal mode that lets the daemon's own user read and write, and no one execute."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an octal mode such as 0660") from None
    if mode & ~0o666 or mode & 0o600 != 0o600:
        raise click.BadParameter(
            f"{text!r}: a socket mode gives its owner read and write (0600) and no one "
            "execute, e.g. 0600, 0660 or 0666"
        )
    return mode


def _group_id(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise click.BadParameter(f"no group named {text!r}") from None


def _park_dir(value: str | None) -> Path | None:
    if value == "off":
        return None
    return Path(value) if value else Path(platformdirs.user_state_dir("lmxd"))
