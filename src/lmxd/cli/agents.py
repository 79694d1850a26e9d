"""Verbs that talk to a running daemon: register, decode, chat, reset, unregister, status,
list, shutdown; and the table of loaded models that `lmxd models` shows beside its catalog."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lmxd.cli import console, err_console, main
from lmxd.client import Client, DecodeResult, DecodeStream, SamplingArgs
from lmxd.errors import DaemonUnavailable
from lmxd.protocol import SOCKET_ENV
from lmxd.units import format_bytes

socket_option = click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=SOCKET_ENV,
    default=None,
    help=f"The daemon's socket (default: ${SOCKET_ENV}, else $XDG_RUNTIME_DIR/lmxd.sock, "
    "else /tmp/lmxd-$UID.sock).",
)
max_tokens_option = click.option("--max-tokens", type=int, default=256, show_default=True)
_SAMPLING = (
    ("temperature", float),
    ("top_k", int),
    ("top_p", float),
    ("min_p", float),
    ("repeat_penalty", float),
    ("seed", int),
)


def sampling_options(f: Callable[..., None]) -> Callable[..., None]:
    """One option per field of protocol.Sampling, passed on as ``**sampling``; the daemon
    checks the values."""
    for name, kind in reversed(_SAMPLING):
        f = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None)(f)
    return f


def _sampling(options: dict[str, Any]) -> SamplingArgs | None:
    """The sampling options given, or None to keep the agent's defaults."""
    return {k: v for k, v in options.items() if v is not None} or None


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


@main.command()
@click.argument("agent")
@click.argument("model")
@click.option("--n-ctx", type=int, default=4096, show_default=True, help="Tokens of context.")
@click.option("--system", "system_prompt", default=None, help="A system prompt for chats.")
@sampling_options
@socket_option
def register(
    agent: str,
    model: str,
    n_ctx: int,
    system_prompt: str | None,
    socket_path: Path | None,
    **sampling: Any,
) -> None:
    """Register AGENT on MODEL (a catalog name or a .gguf path) with the daemon."""
    with Client(socket_path) as client:
        got = client.register(
            agent, model, n_ctx=n_ctx, sampling=_sampling(sampling), system_prompt=system_prompt
        )
    console.print(
        f"registered {got.get('agent', agent)} on {got.get('model', model)}, "
        f"n_ctx {got.get('n_ctx', n_ctx)}"
    )


def _summary(result: DecodeResult) -> str:
    t = result.timings_ms
    phases = ", ".join(
        f"{k} {t[k]:.1f}" for k in ("queued", "restore", "prefill", "decode") if k in t
    )
    parts = [
        f"{result.generated_tokens} tokens ({result.prompt_tokens} prompt)",
        f"stop: {result.stop_reason}",
        f"{result.tokens_per_s:.1f} tok/s",
        f"{t.get('total', 0):.1f} ms ({phases})",
    ]
    if result.restored:
        parts.append("restored from host RAM")
    if result.parked:
        parts.append(f"parked: {', '.join(result.parked)}")
    return " · ".join(parts)


def _show(stream: DecodeStream) -> None:
    """Write the pieces to stdout as they come; the summary goes to stderr, so a pipe gets
    only the generated text."""
    for piece in stream:
        click.echo(piece, nl=False)  # flushes: each piece shows at once
    if not stream.result.text.endswith("\n"):
        click.echo()
    err_console.print(_summary(stream.result), style="dim", markup=False)


@main.command()
@click.argument("agent")
@click.argument("prompt")
@max_tokens_option
@click.option("--stop", multiple=True, help="Stop at this text (repeatable).")
@click.option("--no-stream", is_flag=True, help="Print the text once it is all generated.")
@sampling_options
@socket_option
def decode(
    agent: str,
    prompt: str,
    max_tokens: int,
    stop: tuple[str, ...],
    no_stream: bool,
    socket_path: Path | None,
    **sampling: Any,
) -> None:
    """Continue AGENT's conversation with the raw PROMPT, streaming the reply."""
    options = _sampling(sampling)
    with Client(socket_path) as client:
        if not no_stream:
            _show(client.stream(agent, prompt, max_tokens=max_tokens, sampling=options, stop=stop))
            return
        result = client.decode(agent, prompt, max_tokens=max_tokens, sampling=options, stop=stop)
    click.echo(result.text)
    err_console.print(_summary(result), style="dim", markup=False)


@main.command()
@click.argument("agent")
@max_tokens_option
@sampling_options
@socket_option
def chat(agent: str, max_tokens: int, socket_path: Path | None, **sampling: Any) -> None:
    """Chat with AGENT: each line read is a user message; EOF or /exit ends."""
    interactive, options = sys.stdin.isatty(), _sampling(sampling)
    with Client(socket_path) as client:
        while True:
            if interactive:
                err_console.print("[bold]you>[/] ", end="")
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return
            if not line.strip():
                continue
            messages = [{"role": "user", "content": line.rstrip("\n")}]
            _show(client.stream(agent, messages=messages, max_tokens=max_tokens, sampling=options))


@main.command()
@click.argument("agent")
@socket_option
def reset(agent: str, socket_path: Path | None) -> None:
    """Forget AGENT's conversation; it stays registered."""
    with Client(socket_path) as client:
        client.reset(agent)
    console.print(f"reset {agent}")


@main.command()
@click.argument("agent")
@socket_option
def unregister(agent: str, socket_path: Path | None) -> None:
    """Unregister AGENT, freeing everything it holds."""
    with Client(socket_path) as client:
        client.unregister(agent)
    console.print(f"unregistered {agent}")


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw STATUS reply.")
@socket_option
def status(as_json: bool, socket_path: Path | None) -> None:
    """Each device and its VRAM ledger (who holds what), parked state and the queue."""
    with Client(socket_path) as client:
        got = client.status()
    if as_json:
        _echo_json(got)
        return
    queue = got.get("queue", {})
    for entry in got.get("devices", []):
        device, ledger = entry.get("device", {}), entry.get("ledger", {})
        cap, reserved = ledger.get("cap"), ledger.get("reserved")
        free = cap - reserved if cap is not None and reserved is not None else None
        owners = sorted(ledger.get("by_owner", {}).items())
        table = Table(
            title=f"device {entry.get('index', '?')}: {device.get('name', '?')} "
            f"({device.get('kind', '?')})"
        )
        table.add_column("")
        table.add_column("bytes", justify="right")
        for name, n in [
            ("device total", device.get("total")),
            ("device free", device.get("free")),
            ("used by the daemon", device.get("process_used")),
            ("ledger cap", cap),
            ("ledger reserved", reserved),
            *((f"  {owner}", n) for owner, n in owners),
            ("ledger free", free),
        ]:
            table.add_row(name, _bytes(n))
        console.print(table)
    host = got.get("host")
    if host:
        held = ", ".join(f"{o} {_bytes(n)}" for o, n in sorted(host.get("by_owner", {}).items()))
        console.print(
            f"host RAM ledger: {_bytes(host.get('reserved'))} of a {_bytes(host.get('cap'))} "
            f"cap{': ' + held if held else ''}",
            markup=False,
        )
    console.print(
        f"parked in host RAM: {_bytes(got.get('parked_host_bytes'))} of a "
        f"{_bytes(got.get('park_budget'))} budget · on disk: "
        f"{_bytes((got.get('disk') or {}).get('bytes'))}"
    )
    console.print(
        f"agents: {got.get('agents', '?')} · queue: {queue.get('depth', '?')} of "
        f"{queue.get('max', '?')} · up {got.get('uptime_s', '?')} s"
    )
    config = got.get("config") or {}
    if config.get("declared"):
        console.print(
            f"config file {config.get('file')}: {config['declared']} agents declared, "
            f"{config.get('registered')} registered at the start, {config.get('kept')} there "
            f"already, {len(config.get('failed', []))} not registered",
            markup=False,
        )
    for failed in config.get("failed", []):
        console.print(
            f"  {failed.get('agent')}: [{failed.get('code')}] {failed.get('message')}",
            markup=False,
        )


def ago(when: float | None) -> str:
    """How long ago a Unix time was, in the unit that reads best."""
    if when is None:
        return "never"
    seconds = max(0.0, time.time() - when)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def layers_shown(model: dict[str, Any]) -> str:
    """A loaded model's layers on the GPU as MODELS gives them: "17 of 17", and where it is
    split over devices, each device's ("17 of 17: 9 on 0, 8 on 1")."""
    shown = f"{model.get('n_gpu_layers', '?')} of {model.get('layers', '?')}"
    devices = model.get("devices") or []
    if len(devices) > 1:
        shown += ": " + ", ".join(f"{d['n_gpu_layers']} on {d['device']}" for d in devices)
    return shown


def table(title: str, columns: dict[str, str], no_wrap: bool = False) -> Table:
    """A table whose columns are right-aligned where ``columns`` says "r"; ``no_wrap``: each
    row on one line (a cell too wide is cut short)."""
    made = Table(title=title)
    for name, align in columns.items():
        made.add_column(name, justify="right" if align == "r" else "left", no_wrap=no_wrap)
    return made


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the raw list of agents.")
@socket_option
def list_agents(as_json: bool, socket_path: Path | None) -> None:
    """The registered agents: model, device, state, context and tokens held."""
    with Client(socket_path) as client:
        agents = client.list_agents()
    if as_json:
        _echo_json(agents)
        return
    title = f"{len(agents)} agent{'' if len(agents) == 1 else 's'}"
    shown = table(
        title,
        {
            "agent": "l",
            "model": "l",
            "device": "r",
            "state": "l",
            "n_ctx": "r",
            "tokens": "r",
            "in KV": "r",
            "last used": "r",
        },
    )
    for a in agents:
        name = f"{a.get('agent')}{' (auto)' if a.get('auto') else ''}"  # made by the HTTP API
        shown.add_row(
            name,
            *(str(a.get(k)) for k in ("model", "device", "state", "n_ctx", "tokens", "kv_tokens")),
            ago(a.get("last_used")),
        )
    console.print(shown)


@main.command()
@socket_option
def shutdown(socket_path: Path | None) -> None:
    """Ask the daemon to stop."""
    with Client(socket_path) as client:
        client.shutdown()
        console.print(f"the daemon at {client.path} is stopping")


def loaded_models_table(socket_path: Path | None = None) -> Table | None:
    """The daemon's loaded models (MODELS), or None when no daemon answers at the socket."""
    try:
        with Client(socket_path) as client:
            models = client.models()
    except DaemonUnavailable:
        return None
    shown = table(
        f"models loaded by the daemon at {client.path}",
        {
            "model": "l",
            "agents": "r",
            "layers on GPU": "r",
            "weights": "r",
            "context": "r",
            "KV cells used": "r",
            "path": "l",
        },
    )
    for m in models:
        cells = f"{m.get('used_cells', '?')} of {m.get('pool_cells', '?')}"
        shown.add_row(
            str(m.get("model")),
            str(m.get("refcount")),
            layers_shown(m),
            _bytes(m.get("weights_bytes")),
            _bytes(m.get("context_bytes")),
            cells,
            str(m.get("path")),
        )
    return shown
