"""The ``lmxd`` command line: one click group, verbs grouped by subject in sibling modules."""

from __future__ import annotations

import logging
import sys

import click
from rich.console import Console
from rich.markup import escape

from lmxd.errors import LmxdError

# Piped output keeps whole table cells instead of wrapping them at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


class LmxdGroup(click.Group):
    """Turns lmxd errors into one clear line and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LmxdError as exc:
            # Escaped: a message may hold brackets of its own ("[[agent]] #2").
            message = escape(f"[{exc.code}] {exc.message}")
            err_console.print(f"[bold red]error[/] {message}", markup=True)
            sys.exit(2)


@click.group(cls=LmxdGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for llama.cpp's own).")
def main(verbose: int) -> None:
    """lmxd: one daemon owns the GPU; several LLM agents share it under a VRAM ledger."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _register() -> None:
    from lmxd.cli import agents, daemon, demo, models, service, top  # noqa: F401  (add verbs)


_register()
