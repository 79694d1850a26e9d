"""The options of `lmxd serve`, shared with `lmxd config`: each is also a key of the config
file, named as its parameter is (its long name, dashes turned to underscores)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from lmxd import catalog, logs
from lmxd.cli import checks
from lmxd.config import NO_FILE
from lmxd.fronts.http import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT

F = TypeVar("F", bound=Callable[..., object])

CONFIG = click.option(
    "--config",
    "config",
    default=None,
    metavar="PATH",
    help="The config file: TOML, one key per option below (dashes turned to underscores), "
    "and [[agent]] tables (default: lmxd.toml in the user's config directory, if there is "
    f"one; `{NO_FILE}` reads none). The command line wins over the file.",
)

OPTIONS = [
    click.option(
        "--socket",
        "socket",
        type=click.Path(path_type=Path),
        default=None,
        help="Unix socket (default: $XDG_RUNTIME_DIR/lmxd.sock, else /tmp/lmxd-$UID.sock).",
    ),
    click.option(
        "--socket-mode",
        "socket_mode",
        type=checks.OctalMode(),
        default="0600",
        show_default=True,
        help="The socket's permissions, in octal: 0660 with --socket-group shares it with a "
        "group, 0666 with every local user. Each user's agents stay their own.",
    ),
    click.option(
        "--socket-group",
        "socket_group",
        type=checks.Group(),
        default=None,
        help="The socket's group (a name or a gid), for a --socket-mode such as 0660.",
    ),
    click.option(
        "--models-dir",
        "models_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Catalog models directory (default: ${catalog.MODELS_DIR_ENV} or user cache).",
    ),
    click.option(
        "--allow-dir",
        "allow_dir",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Another directory agents may load .gguf files from (repeatable; in the config "
        "file, a list).",
    ),
    click.option(
        "--devices",
        "devices",
        type=checks.DeviceList(),
        default=None,
        help="The GPUs to use, e.g. 0,1 (NVML's indices); default: every one.",
    ),
    click.option(
        "--vram-cap-percent",
        "vram_cap_percent",
        type=checks.PER_DEVICE_PERCENT,
        default=None,
        help="Each device's ledger admits work up to this share of it (default 90), for all "
        "(80) or per device (0=80,1=90).",
    ),
    click.option(
        "--vram-limit",
        "vram_limit",
        type=checks.PER_DEVICE_SIZE,
        default=None,
        help="Behave as a card of this size, e.g. 8GiB (on CPU: host memory), for all or per "
        "device (0=8GiB,1=16GiB).",
    ),
    click.option(
        "--partial/--no-partial",
        "partial",
        default=True,
        show_default=True,
        help="A model too large for every device, whole or split over them, runs with as "
        "many layers on one as fit, the rest in host RAM (--no-partial: refused instead).",
    ),
    click.option(
        "--host-limit",
        "host_limit",
        type=checks.SIZE,
        default=None,
        help="On a GPU: host RAM for what models keep there (layers not on a device, logits); "
        "the ledger admits up to 90% of this or of the memory available at the start, the "
        "smaller.",
    ),
    click.option(
        "--op-offload/--no-op-offload",
        "op_offload",
        default=True,
        show_default=True,
        help="Layers in host RAM: run their matrix products over batches of 32 tokens and more "
        "(prompts) on the GPU, copying their weights over as they go.",
    ),
    click.option(
        "--park-budget",
        "park_budget",
        type=checks.SIZE,
        default="8GiB",
        show_default=True,
        help="Host RAM for parked agents' KV state; past it, the least recently used parked "
        "states go to disk under --park-dir.",
    ),
    click.option(
        "--keep-alive",
        "keep_alive",
        type=click.FloatRange(min=0),
        default=300.0,
        show_default=True,
        help="Seconds a model stays loaded after its last agent goes (0 = unload at once).",
    ),
    click.option(
        "--max-queue",
        "max_queue",
        type=click.IntRange(min=1),
        default=64,
        show_default=True,
        help="DECODE jobs one agent may have waiting or running; past it its requests get BUSY.",
    ),
    click.option(
        "--n-ctx",
        "n_ctx",
        type=click.IntRange(min=1),
        default=4096,
        show_default=True,
        help="n_ctx of agents registered without one: the text protocol's REGISTER, the "
        "agents the HTTP API creates, and [[agent]] tables without one.",
    ),
    click.option(
        "--park-after-decode/--no-park-after-decode",
        "park_after_decode",
        default=False,
        help="Testing: park every agent as soon as its DECODE ends (a park the --park-budget "
        "cannot hold is skipped, with a warning in the log).",
    ),
    click.option(
        "--deterministic/--no-deterministic",
        "deterministic",
        default=False,
        help="Decode one agent per step, so that an agent's output is the same whatever else "
        "runs (agents of a model no longer share steps: see docs/benchmarks.md for the cost).",
    ),
    click.option(
        "--threads",
        "threads",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="CPU threads for llama.cpp (0 = up to all cores, fewer while other processes "
        "hold some: measured as it runs).",
    ),
    click.option(
        "--http",
        "http",
        type=checks.Address(),
        default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
        show_default=True,
        help="Where the OpenAI-compatible HTTP API listens: HOST:PORT, [IPv6]:PORT, :PORT, "
        f"or {checks.OFF}.",
    ),
    click.option(
        "--api-key",
        "api_key",
        envvar=API_KEY_ENV,
        default=None,
        help=f"Require `Authorization: Bearer KEY` on HTTP (default: ${API_KEY_ENV}). Needed "
        "to listen anywhere but loopback.",
    ),
    click.option(
        "--auto-agents",
        "auto_agents",
        type=click.IntRange(1, 256),
        default=8,
        show_default=True,
        help="Agents the HTTP API may create per model: auto-agents for requests that name a "
        "model, and agents an X-Lmxd-Agent header names.",
    ),
    click.option(
        "--auto-agent-ttl",
        "auto_agent_ttl",
        type=click.FloatRange(min=1),
        default=600.0,
        show_default=True,
        help="Seconds an auto-agent may stay idle before it is unregistered.",
    ),
    click.option(
        "--stream-timeout",
        "stream_timeout",
        type=click.FloatRange(min=0.1),
        default=30.0,
        show_default=True,
        help="Seconds a streamed reply may wait, its buffer full, for a client that reads "
        "nothing before it is cancelled; a socket client whose replies wait unread this long "
        "is disconnected.",
    ),
    click.option(
        "--park-dir",
        "park_dir",
        type=checks.ParkDir(),
        default=None,
        help="Where agents are kept for a restart (each agent's model, settings and "
        "conversation), and parked KV past --park-budget and at a clean stop (default: the "
        f"user's state directory, lmxd/ in it); `{checks.OFF}` keeps none.",
    ),
    click.option(
        "--max-seqs",
        "max_seqs",
        type=click.IntRange(1, 256),
        default=16,
        show_default=True,
        help="Agents of one model resident at once (sequences per context); others park.",
    ),
    click.option(
        "--log-format",
        "log_format",
        type=click.Choice(logs.FORMATS),
        default="text",
        show_default=True,
        help="The log on stderr: text, or json (one object per line: time, level, logger, "
        "message, and the event's key=value pairs as fields).",
    ),
    click.option(
        "--log-level",
        "log_level",
        type=click.Choice(list(logs.LEVELS)),
        default="info",
        show_default=True,
        help="The least severe log lines written (-v/-vv before the verb lower it too).",
    ),
]


def serve_options(command: F) -> F:
    """``--config`` and every option of `lmxd serve`."""
    for option in reversed([CONFIG, *OPTIONS]):
        command = option(command)
    return command
