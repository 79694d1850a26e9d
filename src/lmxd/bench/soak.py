"""`lmxd bench soak`: 32 clients doing everything at random for ten minutes, then the books.

One daemon (CPU: SmolLM2-135M and Gemma 3 270M; four sequences per model, so agents park) and
32 clients, each on a connection of its own, each repeating a random operation until the time
is up: REGISTER an agent of its own, DECODE, stream a DECODE to its end, stream one and CANCEL
it, stream one and drop the whole connection mid-stream (then connect again), RESET,
UNREGISTER. Every error is counted by code; an expected one (BUSY, UNKNOWN_AGENT after an
UNREGISTER raced a DECODE...) is fine, INTERNAL is not. Models unload as soon as their last
agent goes (``--keep-alive 0``), so loads and unloads come and go too. At the end every agent
is unregistered and the books are compared with the start: the daemon never restarted (one
process, still answering), the ledger holds nothing, and its resident memory (RSS) against
the start's, taken after one agent of each model came, decoded and went.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.errors import LmxdError
from lmxd.memory.device import resident_bytes
from lmxd.spawn import DaemonProcess

MODELS = ("smollm2-135m", "gemma3-270m")
CLIENTS = 32
N_CTX = 512
PROMPTS = ("Tell me about the sea.", " And then", "def add(a, b):", " 1, 2, 3,", "Hello")
OPS = ("register", "decode", "stream", "cancel", "disconnect", "reset", "unregister")
WEIGHTS = (2, 4, 3, 2, 1, 1, 1)


class Books:
    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.tokens = 0


async def _client(socket: Path, n: int, until: float, books: Books) -> None:
    rng = random.Random(n)
    client = await AsyncClient.connect(socket)
    mine: list[str] = []
    made = 0
    try:
        while time.monotonic() < until:
            op = rng.choices(OPS, WEIGHTS)[0]
            if op != "register" and not mine:
                op = "register"
            agent = rng.choice(mine) if mine else ""
            prompt = rng.choice(PROMPTS)
            books.ops[op] += 1
            try:
                if op == "register":
                    made += 1
                    name = f"c{n}-{made}"
                    await client.register(name, rng.choice(MODELS), n_ctx=N_CTX)
                    mine.append(name)
                elif op == "decode":
                    reply = await client.decode(agent, prompt, max_tokens=rng.randint(1, 24))
                    books.tokens += reply.generated_tokens
                elif op == "stream":
                    async for _ in client.stream(agent, prompt, max_tokens=rng.randint(1, 24)):
                        books.tokens += 1
                elif op in ("cancel", "disconnect"):
                    stream = client.stream(agent, prompt, max_tokens=200)
                    async for _ in stream:
                        break  # one piece, then: cancel it, or go away mid-stream
                    if op == "cancel":
                        await client.cancel(stream.id)
                        await stream.aclose()
                    else:
                        await client.close()
                        client = await AsyncClient.connect(socket)
                elif op == "reset":
                    await client.reset(agent)
                else:
                    await client.unregister(agent)
                    mine.remove(agent)
            except LmxdError as exc:
                books.errors[exc.code] += 1
                if exc.code == "UNKNOWN_AGENT" and agent in mine:
                    mine.remove(agent)
        for agent in mine:
            try:
                await client.unregister(agent)
            except LmxdError as exc:
                books.errors[exc.code] += 1
    finally:
        await client.close()


async def _soak(socket: Path, seconds: float) -> Books:
    books = Books()
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(socket, n, until, books) for n in range(CLIENTS)))
    return books


async def _warm(socket: Path) -> None:
    """One agent of each model comes, decodes and goes: the start's memory has seen it all."""
    async with await AsyncClient.connect(socket) as client:
        for model in MODELS:
            await client.register("warm", model, n_ctx=N_CTX)
            await client.decode("warm", PROMPTS[0], max_tokens=8)
            await client.unregister("warm")


def run(models_dir: Path, out: Path, minutes: float = 10.0) -> Report:
    report = Report("soak")
    args = ("--models-dir", str(models_dir), "--max-seqs", "4", "--max-queue", "8")
    with DaemonProcess(*args, "--keep-alive", "0") as daemon:
        asyncio.run(_warm(daemon.socket))
        start_rss = resident_bytes(daemon.pid)
        t0 = time.monotonic()
        books = asyncio.run(_soak(daemon.socket, minutes * 60))
        elapsed = time.monotonic() - t0

        async def after() -> tuple[int, int]:
            async with await AsyncClient.connect(daemon.socket) as client:
                status = await client.status()
                agents = await client.list_agents()
            return len(agents), int(status["ledger"]["reserved"])

        left, reserved = asyncio.run(after())
        end_rss = resident_bytes(daemon.pid)
        alive = daemon.proc.poll() is None
        log = daemon.log()
    report.add(f"run time ({minutes:g} min of operations, then the books)", elapsed / 60, "min")
    report.add("operations", sum(books.ops.values()), "ops")
    for op in OPS:
        report.add(f"operations: {op}", books.ops[op], "ops")
    report.add("tokens generated", books.tokens, "tokens")
    for code, count in sorted(books.errors.items()):
        report.add(f"errors: {code}", count, "replies")
    internal = books.errors["INTERNAL"] + log.count("internal error")
    report.add("INTERNAL errors (replies and log)", internal, "", "0", internal == 0)
    report.add("daemon restarts", 0 if alive else 1, "", "0 (the same process answers)", alive)
    report.add("agents left once every client unregistered its own", left, "", "0", left == 0)
    report.add("ledger: bytes reserved at the end", reserved, "bytes", "0", reserved == 0)
    report.add("daemon RSS at the start (after a warm-up)", start_rss / (1 << 20), "MiB")
    report.add("daemon RSS at the end", end_rss / (1 << 20), "MiB")
    report.add("daemon RSS, end - start", (end_rss - start_rss) / (1 << 20), "MiB")
    report.rows.append({"ops": dict(books.ops), "errors": dict(books.errors)})
    report.save(out)
    return report
