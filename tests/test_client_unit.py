"""lmxd.client against a fake daemon that answers with canned frames: framing and dispatch.

The fake runs an asyncio Unix-socket server on its own thread, so the blocking client can be
tested against it too. What a real daemon answers is tested by the integration tests.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lmxd import AsyncClient, Client, DecodeResult
from lmxd.errors import DaemonUnavailable, LmxdError, UnknownAgent
from lmxd.protocol import MAX_LINE_BYTES

Frame = dict[str, Any]


class Peer:
    """The daemon's end of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> Frame:
        line = await self.reader.readline()
        assert line, "the client closed the connection"
        frame: Frame = json.loads(line)
        return frame

    async def send(self, **frame: Any) -> None:
        self.writer.write(json.dumps(frame).encode() + b"\n")
        await self.writer.drain()

    async def ok(self, request: Frame, **result: Any) -> None:
        await self.send(id=request["id"], ok=True, **result)

    async def until_closed(self) -> None:
        assert await self.reader.read() == b"", "the client sent more than expected"


Script = Callable[[Peer], Awaitable[None]]


@contextmanager
def fake_daemon(script: Script) -> Iterator[Path]:
    """A socket path whose daemon runs ``script`` on each connection; its failures fail the test."""
    # tmp_path can pass the ~107-byte limit of AF_UNIX paths; a directory right in /tmp cannot.
    directory = Path(tempfile.mkdtemp(dir="/tmp"))
    path = directory / "lmxd.sock"
    loop = asyncio.new_event_loop()
    finished = threading.Event()
    failures: list[BaseException] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(Peer(reader, writer))
        except BaseException as exc:  # raised again in the test's thread below
            failures.append(exc)
        finally:
            writer.close()
            finished.set()

    server = loop.run_until_complete(asyncio.start_unix_server(handle, path))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path
        assert finished.wait(2), "the fake daemon's script did not finish"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(2)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
        shutil.rmtree(directory)
    if failures:
        raise failures[0]


def decode_reply(agent: str, text: str, **fields: Any) -> Frame:
    timings = {"queued": 0.1, "restore": 0, "prefill": 1.5, "decode": 2, "total": 3.6}
    return {
        "agent": agent,
        "text": text,
        "prompt_tokens": 3,
        "cached_tokens": 0,
        "generated_tokens": 2,
        "stop_reason": "length",
        "timings_ms": timings,
        "restored": False,
        "parked": [],
        "tokens_per_s": 1000.0,
        **fields,
    }


def status_via(kind: str, path: Path) -> Frame:
    """One STATUS request through the blocking or the async client."""
    if kind == "sync":
        with Client(path) as client:
            return client.status()

    async def main() -> Frame:
        async with await AsyncClient.connect(path) as client:
            return await client.status()

    return asyncio.run(main())


both_clients = pytest.mark.parametrize("kind", ["sync", "async"])


def test_interleaved_replies_reach_their_callers() -> None:
    async def script(peer: Peer) -> None:
        first, second = await peer.recv(), await peer.recv()
        await peer.ok(second, **decode_reply(second["agent"], "second"))
        await peer.ok(first, **decode_reply(first["agent"], "first"))
        await peer.until_closed()

    async def main(path: Path) -> None:
        async with await AsyncClient.connect(path) as client:
            a, b = await asyncio.gather(client.decode("a", "hi"), client.decode("b", "yo"))
        assert (a.agent, a.text, b.agent, b.text) == ("a", "first", "b", "second")

    with fake_daemon(script) as path:
        asyncio.run(main(path))


def test_stream_yields_pieces_then_the_result_between_other_replies() -> None:
    async def script(peer: Peer) -> None:
        first, second = await peer.recv(), await peer.recv()
        decode, status = (first, second) if first["op"] == "DECODE" else (second, first)
        assert decode == {
            "id": decode["id"],
            "op": "DECODE",
            "agent": "a",
            "prompt": "hi",
            "max_tokens": 8,
            "sampling": {"seed": 7},
            "stop": ["\n"],
            "stream": True,
        }
        await peer.send(id=decode["id"], event="token", text="Hel", token=1)
        await peer.ok(status, queue={"depth": 1, "max": 64})
        await peer.send(id=decode["id"], event="token", text="lo", token=2)
        await peer.ok(decode, **decode_reply("a", "Hello"), future_field=1)
        await peer.until_closed()

    async def main(path: Path) -> None:
        async with await AsyncClient.connect(path) as client:
            stream = client.stream("a", "hi", max_tokens=8, sampling={"seed": 7}, stop=["\n"])
            with pytest.raises(RuntimeError, match="not finished"):
                stream.result  # noqa: B018

            async def pieces() -> list[str]:
                return [piece async for piece in stream]

            got, status = await asyncio.gather(pieces(), client.status())
        assert got == ["Hel", "lo"]
        assert status == {"queue": {"depth": 1, "max": 64}}
        assert stream.result == DecodeResult(**decode_reply("a", "Hello"))
        assert stream.result.timings_ms["decode"] == 2.0

    with fake_daemon(script) as path:
        asyncio.run(main(path))


@both_clients
def test_an_error_frame_raises_its_type_with_details(kind: str) -> None:
    async def script(peer: Peer) -> None:
        request = await peer.recv()
        error = {"code": "UNKNOWN_AGENT", "message": "no agent 'x'", "details": {"agent": "x"}}
        await peer.send(id=request["id"], ok=False, error=error)
        request = await peer.recv()
        error = {"code": "NEWER_THAN_CLIENT", "message": "hm", "details": {}}
        await peer.send(id=request["id"], ok=False, error=error)
        await peer.until_closed()

    async def via_async(path: Path) -> list[LmxdError]:
        async with await AsyncClient.connect(path) as client:
            return [await catch(client.reset("x")), await catch(client.status())]

    async def catch(call: Awaitable[Any]) -> LmxdError:
        with pytest.raises(LmxdError) as info:
            await call
        return info.value

    with fake_daemon(script) as path:
        if kind == "sync":
            with Client(path) as client:
                with pytest.raises(LmxdError) as first:
                    client.reset("x")
                with pytest.raises(LmxdError) as second:
                    client.status()
            errors = [first.value, second.value]
        else:
            errors = asyncio.run(via_async(path))
    assert type(errors[0]) is UnknownAgent
    assert (errors[0].message, errors[0].details) == ("no agent 'x'", {"agent": "x"})
    assert type(errors[1]) is LmxdError and errors[1].details == {"code": "NEWER_THAN_CLIENT"}


@both_clients
def test_a_connection_closed_mid_request_raises_a_clear_error(kind: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.recv()  # and hang up without a reply

    with fake_daemon(script) as path, pytest.raises(DaemonUnavailable) as info:
        status_via(kind, path)
    assert f"connection to the daemon at {path} lost" in info.value.message
    assert "closed the connection" in info.value.message


def test_every_pending_request_fails_when_the_connection_drops() -> None:
    async def script(peer: Peer) -> None:
        await peer.recv()
        await peer.recv()

    async def main(path: Path) -> None:
        async with await AsyncClient.connect(path) as client:
            got = await asyncio.gather(client.status(), client.hello(), return_exceptions=True)
            assert all(isinstance(g, DaemonUnavailable) for g in got), got
            with pytest.raises(DaemonUnavailable, match="closed the connection"):
                await client.list_agents()  # fails at once: the connection is known to be gone

    with fake_daemon(script) as path:
        asyncio.run(main(path))


@both_clients
def test_no_daemon_listening(kind: str) -> None:
    path = Path(tempfile.gettempdir()) / "lmxd-test-nobody-here.sock"
    with pytest.raises(DaemonUnavailable) as info:
        status_via(kind, path)
    message = info.value.message
    assert f"no daemon is listening at {path}" in message and "lmxd serve" in message


@both_clients
def test_lines_up_to_the_frame_limit_are_read(kind: str) -> None:
    async def script(peer: Peer) -> None:
        request = await peer.recv()
        frame = {"id": request["id"], "ok": True, "pad": ""}
        frame["pad"] = "x" * (MAX_LINE_BYTES - len(json.dumps(frame)))
        await peer.send(**frame)
        await peer.until_closed()

    with fake_daemon(script) as path:
        assert len(status_via(kind, path)["pad"]) > MAX_LINE_BYTES - 100


@both_clients
def test_a_line_over_the_limit_drops_the_connection(kind: str) -> None:
    async def script(peer: Peer) -> None:
        request = await peer.recv()
        await peer.ok(request, pad="x" * MAX_LINE_BYTES)
        await peer.until_closed()

    with fake_daemon(script) as path, pytest.raises(DaemonUnavailable, match="line over"):
        status_via(kind, path)


def test_cancelling_a_waiting_task_cancels_the_request() -> None:
    received = threading.Event()

    async def script(peer: Peer) -> None:
        decode = await peer.recv()
        received.set()
        cancel = await peer.recv()
        assert (cancel["op"], cancel["target"]) == ("CANCEL", decode["id"])
        await peer.ok(decode, **decode_reply("a", "", stop_reason="cancelled"))
        await peer.ok(cancel, cancelled=True)
        await peer.ok(await peer.recv(), models=[])  # the connection still serves
        await peer.until_closed()

    async def main(path: Path) -> None:
        async with await AsyncClient.connect(path) as client:
            task = asyncio.create_task(client.decode("a", "hi"))
            assert await asyncio.to_thread(received.wait, 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await client.models() == []

    with fake_daemon(script) as path:
        asyncio.run(main(path))


def test_sync_stream_then_an_abandoned_stream_is_cancelled_and_drained() -> None:
    async def script(peer: Peer) -> None:
        first = await peer.recv()
        assert first["stream"] is True and first["messages"] == [{"role": "user", "content": "hi"}]
        assert "prompt" not in first and "sampling" not in first and "stop" not in first
        for piece in ("a", "b"):
            await peer.send(id=first["id"], event="token", text=piece, token=0)
        await peer.ok(first, **decode_reply("a", "ab"))

        second = await peer.recv()
        await peer.send(id=second["id"], event="token", text="x", token=0)
        cancel = await peer.recv()
        assert (cancel["op"], cancel["target"]) == ("CANCEL", second["id"])
        await peer.send(id=second["id"], event="token", text="y", token=0)  # already under way
        await peer.ok(second, **decode_reply("a", "xy", stop_reason="cancelled"))
        await peer.ok(cancel, cancelled=True)
        await peer.ok(await peer.recv(), queue={"depth": 0})
        await peer.until_closed()

    with fake_daemon(script) as path, Client(path) as client:
        stream = client.stream("a", messages=[{"role": "user", "content": "hi"}])
        assert list(stream) == ["a", "b"]
        assert (stream.result.text, stream.result.tokens_per_s) == ("ab", 1000.0)
        abandoned = client.stream("a", "more")
        for _ in abandoned:
            break
        assert client.status() == {"queue": {"depth": 0}}  # not the abandoned stream's frames
