"""`lmxd bench http`: the HTTP front against the JSON-lines socket, streaming, on one daemon.

The same agents' conversations are streamed both ways, 1 and 8 at a time (SmolLM2-135M,
greedy, 64 tokens each, every agent RESET before each round so each round prefills the same
prompt). Rounds alternate the two fronts so drift in the machine's speed falls on both.
Figures: time to first token (request sent to the first text received; p50 over all streams)
and the streaming rate of all streams together (tokens after each stream's first / time from
the round's first text to its last). Both clients are thin:
lmxd's AsyncClient on the socket (one connection), and here a raw asyncio HTTP/1.1 reader of
the SSE stream on kept-alive connections (as the `openai` client keeps them), so that what is
measured is the daemon.

Goals (issue #7): HTTP tokens/s >= 95% of the socket's; HTTP time to first token within
2 ms of the socket's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from lmxd.bench.report import Report
from lmxd.client import AsyncClient
from lmxd.spawn import DaemonProcess

MODEL = "smollm2-135m"
MAX_TOKENS = 64
ROUNDS = {1: 30, 8: 6}  # per concurrency; a time to first token is ~150 ms of prefill on CPU,
# and its noise is a few ms: many rounds, alternating fronts, to see a 2 ms difference
SYSTEM = "You are a helpful assistant."


def _question(i: int) -> str:
    return f"Write a long story about a lighthouse keeper named Keeper{i}."


Timed = tuple[float, float, float, int]  # sent, first text, last text (perf_counter), tokens


async def _socket_stream(client: AsyncClient, agent: str, i: int) -> Timed:
    t0 = time.perf_counter()
    first = last = 0.0
    stream = client.stream(
        agent, messages=[{"role": "user", "content": _question(i)}], max_tokens=MAX_TOKENS
    )
    async for piece in stream:
        if piece:
            last = time.perf_counter()
            first = first or last
    return t0, first, last, stream.result.generated_tokens


class HttpConnection:
    """One kept-alive HTTP/1.1 connection, as the `openai` client keeps them: requests one at a
    time, each reply's chunked SSE body read to its end."""

    def __init__(self, url: str) -> None:
        self.parts = urlsplit(url)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, agent: str, i: int) -> Timed:
        body = msgspec.json.encode(
            {
                "model": agent,
                "messages": [{"role": "user", "content": _question(i)}],
                "max_tokens": MAX_TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        t0 = time.perf_counter()
        if self.reader is None or self.reader.at_eof():  # uvicorn closes idle ones after 5 s
            self.close()
            self.reader, self.writer = await asyncio.open_connection(
                self.parts.hostname, self.parts.port
            )
        assert self.writer is not None
        self.writer.write(head + body)
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass  # the status line and headers
        first = last = 0.0
        tokens, pending = 0, b""
        while size := int((await self.reader.readline()).strip() or b"0", 16):
            pending += (await self.reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk: dict[str, Any] = msgspec.json.decode(event[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        await self.reader.readline()  # the CRLF after the last chunk
        return t0, first, last, tokens

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _round(
    client: AsyncClient, http: list[HttpConnection], front: str, agents: list[str]
) -> dict[str, Any]:
    """One stream per agent at once; their times to first text, and the aggregate rate of
    text after the first piece (tokens / from the first stream's first text to the last's)."""
    for agent in agents:
        await client.reset(agent)
    if front == "socket":
        runs = [_socket_stream(client, a, i) for i, a in enumerate(agents)]
    else:
        runs = [conn.stream(a, i) for i, (a, conn) in enumerate(zip(agents, http, strict=True))]
    timed = await asyncio.gather(*runs)
    span = max(t[2] for t in timed) - min(t[1] for t in timed)
    return {
        "ttft_s": [t[1] - t[0] for t in timed],
        "tokens": sum(t[3] for t in timed),
        "streaming_tokens": sum(t[3] - 1 for t in timed),
        "streaming_s": span,
    }


async def _measure(socket: Path, url: str) -> list[dict[str, Any]]:
    rows = []
    async with await AsyncClient.connect(socket) as client:
        for n, rounds in ROUNDS.items():
            agents = [f"bench{n}-{i}" for i in range(n)]
            for agent in agents:
                await client.register(agent, MODEL, n_ctx=1024, system_prompt=SYSTEM)
            http = [HttpConnection(url) for _ in agents]
            await _round(client, http, "socket", agents)  # warm-up: contexts, connections
            await _round(client, http, "http", agents)
            for r in range(rounds):
                for front in ("socket", "http") if r % 2 == 0 else ("http", "socket"):
                    got = await _round(client, http, front, agents)
                    rows.append({"streams": n, "front": front, "round": r, **got})
            for agent, conn in zip(agents, http, strict=True):
                await client.unregister(agent)
                conn.close()
    return rows


def run(models_dir: Path, out: Path) -> Report:
    report = Report("http")
    args = ("--models-dir", str(models_dir), "--keep-alive", "300")
    with DaemonProcess(*args, http="127.0.0.1:0") as daemon:

        async def main() -> list[dict[str, Any]]:
            async with await AsyncClient.connect(daemon.socket) as client:
                url = str((await client.hello())["http"])
            return await _measure(daemon.socket, url)

        rows = asyncio.run(main())
    report.rows = rows
    labels: list[str] = []
    ttft_series: dict[str, list[float]] = {"socket": [], "http": []}
    rate_series: dict[str, list[float]] = {"socket": [], "http": []}
    for n in ROUNDS:
        figures = {}
        for front in ("socket", "http"):
            mine = [r for r in rows if r["streams"] == n and r["front"] == front]
            ttft = statistics.median(t for r in mine for t in r["ttft_s"]) * 1000
            rate = sum(r["streaming_tokens"] for r in mine) / sum(r["streaming_s"] for r in mine)
            figures[front] = (ttft, rate)
            report.add(f"{n} stream(s), {front}: time to first token p50", ttft, "ms")
            report.add(f"{n} stream(s), {front}: streaming rate, all streams", rate, "tok/s")
            ttft_series[front].append(ttft)
            rate_series[front].append(rate)
        labels.append(f"{n} stream{'s' if n > 1 else ''}")
        (s_ttft, s_rate), (h_ttft, h_rate) = figures["socket"], figures["http"]
        report.add(
            f"{n} stream(s): HTTP tokens/s / socket tokens/s",
            h_rate / s_rate * 100,
            "%",
            goal=">= 95%",
            met=h_rate >= 0.95 * s_rate,
        )
        report.add(
            f"{n} stream(s): HTTP TTFT - socket TTFT",
            h_ttft - s_ttft,
            "ms",
            goal="<= 2 ms",
            met=h_ttft - s_ttft <= 2.0,
        )
    report.chart("Time to first token, p50", labels, ttft_series, "ms")
    report.chart("Streaming rate, all streams together", labels, rate_series, "tokens/s")
    report.save(out)
    return report
