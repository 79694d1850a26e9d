"""`lmxd demo` (``make demo``): three agents, two models, one budget the size of the article's card.

A coder and a reviewer on SmolLM2-135M-Instruct and a documentation writer on Gemma 3 270M run
concurrently through one daemon whose ledger behaves like an 8 GB card; each agent's output
streams in its own labelled lines. Then the same three agents hold two rounds of conversation
on a card squeezed to 560 MiB, with one sequence per model (``--max-seqs 1``): the coder and
the reviewer take turns on SmolLM2's, and the daemon parks and restores them as they do.
Beside it: what three separate llama.cpp processes at the article's n_ctx would reserve.
With ``--chart PATH``, the second part's timeline (memory over time, each agent's states, its
parks and restores) is drawn to PATH (lmxd.cli.timeline).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import click
from rich.table import Table

from lmxd import catalog
from lmxd.cli import console, main
from lmxd.cli.models import models, models_dir_option
from lmxd.cli.timeline import Timeline, draw
from lmxd.client import AsyncClient, DecodeResult
from lmxd.memory.estimator import estimate
from lmxd.modelfile import read_model_info
from lmxd.spawn import DaemonProcess
from lmxd.units import format_bytes, parse_bytes

ARTICLE_N_CTX = 172_032


@dataclass(frozen=True)
class Role:
    agent: str
    model: str
    colour: str
    system: str | None
    turns: tuple[str, str]  # round one, round two
    chat: bool = True
    repeat_penalty: float = 1.0  # these very small models loop on some prompts without one


ROLES = (
    Role(
        "coder",
        "smollm2-135m",
        "cyan",
        "You are a concise Python programmer.",
        (
            "Write a Python function is_palindrome(s) that ignores case and spaces.",
            "Now add a docstring to it.",
        ),
    ),
    Role(
        "reviewer",
        "smollm2-135m",
        "magenta",
        "You are a careful code reviewer.",
        (
            "Review this code and name its bug: def is_palindrome(s): return s == s.reverse()",
            "How would you fix it?",
        ),
        repeat_penalty=1.3,
    ),
    Role(
        "writer",
        "gemma3-270m",
        "yellow",
        None,
        (
            "## is_palindrome\n\n`is_palindrome(s)` returns True when",
            "\n\n### Example\n\n```python\n>>>",
        ),
        chat=False,
        repeat_penalty=1.2,
    ),
)


class LabelledLines:
    """Streams each agent's text as whole lines, prefixed with the agent's name."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.partial = ""

    def feed(self, text: str) -> None:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._print(line)

    def flush(self) -> None:
        if self.partial:
            self._print(self.partial)
        self.partial = ""

    def _print(self, line: str) -> None:
        label = f"[{self.role.colour}]{self.role.agent:>8} │[/]"
        console.print(label, line, markup=True, highlight=False, soft_wrap=True)


async def _turn(client: AsyncClient, role: Role, turn: int) -> DecodeResult:
    out = LabelledLines(role)
    text = role.turns[turn]
    if role.chat:
        stream = client.stream(
            role.agent, messages=[{"role": "user", "content": text}], max_tokens=96
        )
    else:
        out.feed(text.split("\n")[-1])  # the writer's prompt opens its own line
        stream = client.stream(role.agent, text, max_tokens=64)
    async for piece in stream:
        out.feed(piece)
    out.flush()
    return stream.result


async def _session(
    socket: Path, rounds: int, timeline: Timeline | None = None
) -> dict[str, list[DecodeResult]]:
    """The agents' rounds; ``timeline``, if given, reads the daemon meanwhile."""
    done = asyncio.Event()
    recording = asyncio.create_task(timeline.record(socket, done)) if timeline else None
    try:
        return await _rounds(socket, rounds)
    finally:
        done.set()
        if recording is not None:
            await recording


async def _rounds(socket: Path, rounds: int) -> dict[str, list[DecodeResult]]:
    results: dict[str, list[DecodeResult]] = {r.agent: [] for r in ROLES}
    async with await AsyncClient.connect(socket) as client:
        for role in ROLES:
            await client.register(
                role.agent,
                role.model,
                n_ctx=4096,
                system_prompt=role.system,
                sampling={"repeat_penalty": role.repeat_penalty},
            )
        for turn in range(rounds):
            console.rule(f"round {turn + 1}: three agents at once")
            replies = await asyncio.gather(*(_turn(client, r, turn) for r in ROLES))
            for role, reply in zip(ROLES, replies, strict=True):
                results[role.agent].append(reply)
        status = await client.status()
    _print_ledger(status)
    return results


def _print_ledger(status: dict[str, object]) -> None:
    ledger = status["ledger"]
    assert isinstance(ledger, dict)
    table = Table(
        title=f"ledger: {format_bytes(ledger['reserved'])} reserved of a "
        f"{format_bytes(ledger['cap'])} cap"
    )
    table.add_column("owner")
    table.add_column("bytes", justify="right")
    for owner, size in ledger["by_owner"].items():
        table.add_row(owner, format_bytes(size))
    console.print(table)
    console.print(
        f"host RAM holding parked KV: {format_bytes(int(str(status['parked_host_bytes'])))}"
    )


def _print_results(results: dict[str, list[DecodeResult]]) -> None:
    table = Table(title="per agent")
    for col in (
        "agent",
        "round",
        "tokens",
        "tokens/s",
        "restored",
        "parked to make room",
        "park ms",
        "restore ms",
    ):
        table.add_column(col)
    for agent, replies in results.items():
        for i, r in enumerate(replies, 1):
            table.add_row(
                agent,
                str(i),
                str(r.generated_tokens),
                f"{r.tokens_per_s:.1f}",
                "yes" if r.restored else "no",
                ", ".join(r.parked) or "-",
                f"{r.timings_ms['park']:.1f}",
                f"{r.timings_ms['restore']:.1f}",
            )
    console.print(table)


def _naive(directory: Path, budget: int) -> None:
    """What one llama.cpp process per agent at the article's n_ctx would reserve."""
    table = Table(title=f"three separate llama.cpp processes at n_ctx {ARTICLE_N_CTX:,}")
    for col in ("process", "weights", "KV cache", "total"):
        table.add_column(col, justify="right" if col != "process" else "left")
    total = 0
    for role in ROLES:
        info = read_model_info(catalog.resolve_model(role.model, directory))
        est = estimate(info, ARTICLE_N_CTX, beyond_training=True, swa_full=True)
        total += est.weights + est.kv
        table.add_row(
            f"{role.agent} ({role.model})",
            format_bytes(est.weights),
            format_bytes(est.kv),
            format_bytes(est.weights + est.kv),
        )
    console.print(table)
    verdict = "does not fit" if total > budget else "fits"
    console.print(
        f"together {format_bytes(total)} against the {format_bytes(budget)} card: {verdict} "
        "(and each reserves it up front, before a single token). lmxd above held them all."
    )


@main.command()
@models_dir_option
@click.option("--vram-limit", default="8GiB", show_default=True, help="The card to behave as.")
@click.option(
    "--squeeze",
    default="560MiB",
    show_default=True,
    help="The smaller card of the second part, where agents of a model take turns.",
)
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Draw the second part's timeline (memory, agents' states, parks, restores) as a PNG.",
)
@click.pass_context
def demo(
    ctx: click.Context, models_dir: Path | None, vram_limit: str, squeeze: str, chart: Path | None
) -> None:
    """Three agents on two models share one budget; then a smaller one, with parking."""
    ctx.invoke(models, models_dir=models_dir)
    directory = catalog.models_dir(models_dir)
    args = ("--models-dir", str(directory), "--keep-alive", "0")
    console.rule(f"part 1: the article's {vram_limit} card")
    with DaemonProcess("--vram-limit", vram_limit, *args) as daemon:
        first = asyncio.run(_session(daemon.socket, rounds=1))
    _print_results(first)
    _naive(directory, parse_bytes(vram_limit))
    console.rule(f"part 2: a {squeeze} card, one sequence per model: agents take turns")
    timeline = Timeline() if chart is not None else None
    with DaemonProcess("--vram-limit", squeeze, "--max-seqs", "1", *args) as daemon:
        second = asyncio.run(_session(daemon.socket, rounds=2, timeline=timeline))
    _print_results(second)
    if chart is not None and timeline is not None:
        draw(timeline, chart, f"lmxd demo, part 2: a {squeeze} card")
        console.print(f"timeline drawn: {chart}")
