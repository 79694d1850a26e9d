"""`lmxd service install | uninstall`: the daemon as a systemd user service.

The unit runs `lmxd serve` with the Python that ran `lmxd service install` (``python -m
lmxd.cli``, so that it finds this installation) and the ``--config`` it was given, made
absolute; every other option belongs in the config file. systemd restarts the daemon when it
fails, but not when it exits with status 2 (a bad config file, another daemon on its socket or
its --park-dir): the same start would fail again. There is no .socket unit: the daemon creates
its socket itself and cannot be handed one by systemd.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import platformdirs

from lmxd import catalog, protocol
from lmxd.cli import main
from lmxd.cli.daemon import serve
from lmxd.cli.settings import resolve
from lmxd.config import NO_FILE
from lmxd.fronts.http import API_KEY_ENV

UNIT = "lmxd.service"
# The environment the daemon reads, written into the unit when it is set here. Not
# $LMXD_API_KEY: a secret belongs in a file only its owner reads (api_key in the config file).
CARRIED = (catalog.MODELS_DIR_ENV, protocol.SOCKET_ENV, "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
COMMANDS = (
    "systemctl --user daemon-reload",
    "systemctl --user enable --now lmxd",
    "systemctl --user status lmxd",
    "journalctl --user -u lmxd -f",
)


def unit_dir() -> Path:
    """Where systemd looks for a user's own units: $XDG_CONFIG_HOME/systemd/user."""
    return Path(platformdirs.user_config_dir()) / "systemd" / "user"


def unit_text(config: str | None) -> str:
    """The unit: ``config`` is --config as given (None: not given, the default file)."""
    command = [str(Path(sys.executable).absolute()), "-m", "lmxd.cli", "serve"]
    if config is not None:
        command += ["--config", config if config == NO_FILE else str(Path(config).absolute())]
    # Log lines reach the journal as they are written, not when a buffer fills.
    env = {"PYTHONUNBUFFERED": "1"} | {k: os.environ[k] for k in CARRIED if os.environ.get(k)}
    return "\n".join(
        [
            "# Written by `lmxd service install`; `lmxd service uninstall` removes it.",
            "[Unit]",
            "Description=lmxd: one daemon owns the GPU; LLM agents share it",
            "",
            "[Service]",
            "Type=simple",
            "ExecStart=" + " ".join(_quote(arg, dollars=True) for arg in command),
            *(f"Environment={_quote(f'{k}={v}', dollars=False)}" for k, v in env.items()),
            "Restart=on-failure",
            "RestartSec=2",
            "RestartPreventExitStatus=2",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _quote(arg: str, dollars: bool) -> str:
    """One word of a unit file (systemd.syntax): % doubled (a specifier otherwise), and in
    ExecStart $ too (a variable otherwise); quoted where it holds a space, quote or
    backslash."""
    text = arg.replace("%", "%%")
    if dollars:
        text = text.replace("$", "$$")
    if text and not any(c in text for c in " \t\n\"'\\;"):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


@main.group(name="service")
def service_group() -> None:
    """Run the daemon as a systemd user service."""


@service_group.command()
@click.option(
    "--config",
    default=None,
    metavar="PATH",
    help=f"The config file the service starts with (default: the default one, if any; "
    f"`{NO_FILE}` for none). It is checked now.",
)
@click.option("--dry-run", is_flag=True, help="Print the unit; write nothing.")
def install(config: str | None, dry_run: bool) -> None:
    """Write ~/.config/systemd/user/lmxd.service, which runs `lmxd serve` with this Python,
    and print the systemctl commands that start it."""
    # The file is checked as `lmxd serve` would check it: a bad one fails here, not at boot.
    with serve.make_context("serve", [] if config is None else ["--config", config]) as ctx:
        resolve(ctx)
    text = unit_text(config)
    path = unit_dir() / UNIT
    if dry_run:
        click.echo(f"# {path} (not written: --dry-run)\n{text}", nl=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        click.echo(f"wrote {path}")
    if os.environ.get(API_KEY_ENV):
        click.echo(f"note: ${API_KEY_ENV} is not written to the unit: set api_key in the file")
    click.echo("then:\n" + "".join(f"  {c}\n" for c in COMMANDS), nl=False)
    click.echo("to keep it running while you are logged out: loginctl enable-linger")


@service_group.command()
def uninstall() -> None:
    """Remove the unit (and its enabling link), and print the commands that stop it."""
    path = unit_dir() / UNIT
    link = unit_dir() / "default.target.wants" / UNIT  # what `systemctl enable` made
    if link.is_symlink():
        link.unlink()
    if not path.exists():
        click.echo(f"no {path}: nothing to remove")
        return
    path.unlink()
    click.echo(
        f"removed {path}\nthen:\n  systemctl --user stop lmxd\n  systemctl --user daemon-reload"
    )
