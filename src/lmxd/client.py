"""Clients of the lmxd daemon: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

This module owns the client side of the JSON-lines protocol (docs/protocol.md): it frames
requests, matches reply frames to requests by id, and raises an error frame as the
:mod:`lmxd.errors` type of the same code. It knows nothing of agents beyond the ops' fields.

::

    with Client() as client:
        client.register("coder", "smollm2-135m")
        stream = client.stream("coder", "def fib(n):", max_tokens=64)
        for piece in stream:
            print(piece, end="")
        print(stream.result.stop_reason)

The async client multiplexes: any number of requests may be in flight on one connection, and
one reader task hands each frame to the request with its id. The blocking client does one
request at a time; a lock makes threads that share it take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

from lmxd import protocol
from lmxd.errors import DaemonUnavailable, LineTooLong, LmxdError, ProtocolError

log = logging.getLogger(__name__)

Frame = dict[str, Any]
StopReason = Literal["eos", "stop", "length", "context", "cancelled"]
Messages = list[dict[str, str]]  # [{"role": "user", "content": "..."}]
SamplingArgs = dict[str, Any]  # protocol.Sampling's fields: temperature, top_k, seed...


@dataclass(frozen=True)
class DecodeResult:
    """The final reply to a DECODE."""

    agent: str
    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: StopReason
    timings_ms: dict[str, float]  # queued, restore, prefill, decode, total
    restored: bool  # the agent's KV came back from host RAM for this request
    parked: list[str]  # agents parked to make room for this request
    tokens_per_s: float


def _encode(rid: int, op: str, fields: Frame) -> bytes:
    # None stands for "the daemon's default": such fields are left out, not sent as null.
    line = protocol.encode(
        {"id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
    )
    # Checked here because the daemon cannot read the id of a frame it refuses for its size,
    # so its error reply would reach no request and this one would wait forever.
    if len(line) - 1 > protocol.MAX_LINE_BYTES:
        raise LineTooLong(
            f"the {op} request is {len(line) - 1} bytes; a frame is at most "
            f"{protocol.MAX_LINE_BYTES} bytes",
            id=rid,
        )
    return line


def _decode_fields(
    agent: str, prompt: str | None, messages: Messages | None, max_tokens: int,
    sampling: SamplingArgs | None, stop: Sequence[str],
) -> Frame:  # fmt: skip
    return {"agent": agent, "prompt": prompt, "messages": messages, "max_tokens": max_tokens,
            "sampling": sampling, "stop": list(stop) or None}  # fmt: skip


def _parse(line: bytes) -> Frame:
    try:
        frame = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"the daemon sent a line that is not JSON: {exc}") from exc
    if not isinstance(frame, dict):
        raise ProtocolError("the daemon sent a line that is not a JSON object")
    return frame


def _result(frame: Frame) -> Frame:
    """The result fields of a final frame; an error frame is raised as its lmxd type."""
    if frame.get("ok"):
        return {k: v for k, v in frame.items() if k not in ("id", "ok")}
    error = frame.get("error") or {}
    code = str(error.get("code", LmxdError.code))
    details = dict(error.get("details") or {})
    cls = LmxdError.by_code().get(code)
    if cls is None:  # a code newer than this client: keep it where a caller can see it
        cls, details["code"] = LmxdError, code
    raise cls(str(error.get("message", "")), **details)


def _decode_result(fields: Frame) -> DecodeResult:
    try:
        return msgspec.convert(fields, DecodeResult)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed DECODE reply from the daemon: {exc}") from exc


def _socket_path(path: str | Path | None) -> Path:
    return Path(path) if path is not None else protocol.default_socket_path()


def _unreachable(path: Path, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        message = f"no daemon is listening at {path}; start one with `lmxd serve`"
    else:
        message = f"cannot connect to the daemon at {path}: {exc.strerror or exc}"
    return DaemonUnavailable(message, path=str(path))


def _lost(path: Path, why: str) -> DaemonUnavailable:
    return DaemonUnavailable(f"connection to the daemon at {path} lost: {why}", path=str(path))


def _too_long() -> str:
    return f"the daemon sent a line over {protocol.MAX_LINE_BYTES} bytes"


class _Streamed:
    _result: DecodeResult | None = None

    @property
    def result(self) -> DecodeResult:
        """The final reply, once the pieces have been iterated to the end."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result


class AsyncClient:
    """One connection to the daemon; any number of requests in flight on it.

    Open with ``await AsyncClient.connect(path)`` (default: :func:`protocol.default_socket_path`)
    and close with :meth:`close` or ``async with``. Cancelling a task that awaits a request
    tells the daemon to cancel it too.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: Path
    ) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        # Unbounded on purpose: the one reader task must never wait for a slow consumer, or
        # every other request on the connection would stall behind it. A request's frames are
        # bounded by its max_tokens anyway.
        self._pending: dict[int, asyncio.Queue[Frame | LmxdError]] = {}
        self._lost: str | None = None
        self._reading = asyncio.create_task(self._read_frames(), name=f"lmxd-client {path}")

    @classmethod
    async def connect(cls, path: str | Path | None = None) -> AsyncClient:
        where = _socket_path(path)
        try:
            reader, writer = await asyncio.open_unix_connection(
                where, limit=protocol.MAX_LINE_BYTES
            )
        except OSError as exc:
            raise _unreachable(where, exc) from exc
        return cls(reader, writer, where)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; requests still waiting raise :class:`DaemonUnavailable`."""
        self._lost = self._lost or "the client was closed"
        self._reading.cancel()
        await asyncio.wait([self._reading])
        self._writer.close()
        with contextlib.suppress(OSError):  # the daemon went first; nothing is left to flush
            await self._writer.wait_closed()

    async def _read_frames(self) -> None:
        why = "the daemon closed the connection"
        try:
            while True:
                self._dispatch(_parse(await self._reader.readuntil(b"\n")))
        except asyncio.IncompleteReadError:
            pass
        except asyncio.LimitOverrunError:
            why = _too_long()
        except (OSError, ProtocolError) as exc:
            why = str(exc)
        finally:
            self._lost = self._lost or why
            for queue in self._pending.values():
                queue.put_nowait(_lost(self.path, self._lost))
            self._pending.clear()

    def _dispatch(self, frame: Frame) -> None:
        rid = frame.get("id")
        if not isinstance(rid, int) or rid not in self._pending:
            # The tail of an abandoned request, or the reply to the CANCEL sent for it.
            log.debug("dropping a frame for no waiting request: %.200r", frame)
            return
        # After the final frame nothing more comes for this id.
        queue = self._pending[rid] if "event" in frame else self._pending.pop(rid)
        queue.put_nowait(frame)

    async def _exchange(self, rid: int, op: str, fields: Frame) -> AsyncGenerator[Frame]:
        """Send one request, then yield its frames: any events, then the final frame."""
        line = _encode(rid, op, fields)
        if self._lost is not None:
            raise _lost(self.path, self._lost)
        queue: asyncio.Queue[Frame | LmxdError] = asyncio.Queue()
        self._pending[rid] = queue
        try:
            try:
                self._writer.write(line)
                await self._writer.drain()
            except OSError as exc:
                raise _lost(self.path, str(exc)) from exc
            while True:
                item = await queue.get()
                if isinstance(item, LmxdError):
                    raise item
                yield item
                if "event" not in item:
                    return
        finally:
            if self._pending.pop(rid, None) is not None and not self._writer.is_closing():
                # Left before its final frame (task cancelled, stream closed early): ask the
                # daemon to stop without waiting; the late frames are dropped on arrival.
                self._writer.write(_encode(next(self._ids), "CANCEL", {"target": rid}))

    async def _request(self, op: str, **fields: Any) -> Frame:
        frames = [frame async for frame in self._exchange(next(self._ids), op, fields)]
        return _result(frames[-1])

    async def hello(self) -> Frame:
        """Protocol version, daemon version, limits and device."""
        return await self._request("HELLO")

    async def register(
        self, agent: str, model: str, *, n_ctx: int = 4096, sampling: SamplingArgs | None = None,
        system_prompt: str | None = None,
    ) -> Frame:  # fmt: skip
        """Register ``agent`` on ``model`` (a catalog name or a .gguf path)."""
        return await self._request(
            "REGISTER", agent=agent, model=model, n_ctx=n_ctx, sampling=sampling,
            system_prompt=system_prompt,
        )  # fmt: skip

    async def decode(
        self, agent: str, prompt: str | None = None, *, messages: Messages | None = None,
        max_tokens: int = 256, sampling: SamplingArgs | None = None, stop: Sequence[str] = (),
    ) -> DecodeResult:  # fmt: skip
        """Continue ``agent``'s conversation with a raw ``prompt`` or chat ``messages``."""
        fields = _decode_fields(agent, prompt, messages, max_tokens, sampling, stop)
        return _decode_result(await self._request("DECODE", **fields))

    def stream(
        self, agent: str, prompt: str | None = None, *, messages: Messages | None = None,
        max_tokens: int = 256, sampling: SamplingArgs | None = None, stop: Sequence[str] = (),
    ) -> AsyncDecodeStream:  # fmt: skip
        """Like :meth:`decode`, as text pieces while they are generated."""
        fields = _decode_fields(agent, prompt, messages, max_tokens, sampling, stop)
        return AsyncDecodeStream(self, fields)

    async def reset(self, agent: str) -> None:
        """Forget ``agent``'s conversation; it stays registered."""
        await self._request("RESET", agent=agent)

    async def unregister(self, agent: str) -> None:
        await self._request("UNREGISTER", agent=agent)

    async def status(self) -> Frame:
        """Device, VRAM ledger, parked bytes and queue."""
        return await self._request("STATUS")

    async def list_agents(self) -> list[Frame]:
        agents: list[Frame] = (await self._request("LIST"))["agents"]
        return agents

    async def models(self) -> list[Frame]:
        """The models the daemon has loaded."""
        models: list[Frame] = (await self._request("MODELS"))["models"]
        return models

    async def cancel(self, request_id: int) -> bool:
        """Cancel a request of this connection (a stream's :attr:`~AsyncDecodeStream.id`)."""
        return bool((await self._request("CANCEL", target=request_id))["cancelled"])

    async def shutdown(self) -> None:
        """Ask the daemon to stop (only the daemon's own user may)."""
        await self._request("SHUTDOWN")


class AsyncDecodeStream(_Streamed):
    """The text pieces of a streamed DECODE, then its :attr:`result`.

    The request goes out on the first iteration; :attr:`id` names it for
    :meth:`AsyncClient.cancel`. :meth:`aclose` stops early and cancels it.
    """

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        self.id = next(client._ids)
        self._frames = client._exchange(self.id, "DECODE", {**fields, "stream": True})

    def __aiter__(self) -> AsyncDecodeStream:
        return self

    async def __anext__(self) -> str:
        async for frame in self._frames:
            if "event" in frame:
                return str(frame["text"])
            self._result = _decode_result(_result(frame))
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._frames.aclose()


class Client:
    """One blocking connection to the daemon, opened on construction; one request at a time.

    Threads sharing a Client take turns, a stream holding the turn until it ends. A thread
    that starts a request while its own stream is unfinished cancels that stream first.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = _socket_path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(str(self.path))
        except OSError as exc:
            self._sock.close()
            raise _unreachable(self.path, exc) from exc
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        # Re-entrant so that the thread holding an unfinished stream's turn can start a new
        # request, which closes that stream first.
        self._lock = threading.RLock()
        self._streaming: DecodeStream | None = None
        self._lost: str | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._disconnect("the client was closed")

    def _disconnect(self, why: str) -> DaemonUnavailable:
        self._lost = self._lost or why
        self._file.close()
        self._sock.close()
        return _lost(self.path, self._lost)

    def _write(self, line: bytes) -> None:
        if self._lost is not None:
            raise _lost(self.path, self._lost)
        try:
            self._sock.sendall(line)
        except OSError as exc:
            raise self._disconnect(str(exc)) from exc

    def _read(self) -> Frame:
        try:
            line = self._file.readline(protocol.MAX_LINE_BYTES + 1)  # + its newline
        except OSError as exc:
            raise self._disconnect(str(exc)) from exc
        if not line.endswith(b"\n"):
            too_long = len(line) > protocol.MAX_LINE_BYTES
            raise self._disconnect(_too_long() if too_long else "the daemon closed the connection")
        return _parse(line)

    def _frames(
        self, op: str, fields: Frame, owner: DecodeStream | None = None
    ) -> Generator[Frame]:
        """Send one request and yield its frames; the turn is held until the final frame."""
        with self._lock:
            if self._streaming is not None:
                # This thread left a stream unfinished: drain it, or its frames would be read
                # as this request's.
                self._streaming.close()
            self._streaming = owner
            rid = next(self._ids)
            line = _encode(rid, op, fields)
            try:
                self._write(line)
                while True:
                    frame = self._read()
                    if frame.get("id") != rid:  # requests take turns: any other id is a bug
                        raise ProtocolError(f"request {rid} got a frame of another: {frame!r:.300}")
                    if "event" not in frame:
                        break
                    yield frame
            except GeneratorExit:  # closed between frames: the framing is intact
                if self._lost is None:  # else the daemon has dropped the request already
                    self._cancel(rid)
                raise
            except BaseException:
                # Cut short inside a read or write (Ctrl-C, a malformed frame): where the next
                # frame starts is unknown, so this connection cannot be used again.
                self._disconnect("a reply was cut short or malformed")
                raise
            finally:
                self._streaming = None
        yield frame  # after the turn is given back, so an error raised from it holds nothing

    def _cancel(self, rid: int) -> None:
        """Cancel an abandoned request and read off its frames up to its final one."""
        cancel_id = next(self._ids)
        self._write(_encode(cancel_id, "CANCEL", {"target": rid}))
        waiting = {rid, cancel_id}
        while waiting:
            frame = self._read()
            if "event" not in frame:
                waiting.discard(frame.get("id"))

    def _request(self, op: str, **fields: Any) -> Frame:
        return _result(list(self._frames(op, fields))[-1])

    def hello(self) -> Frame:
        return self._request("HELLO")

    def register(
        self, agent: str, model: str, *, n_ctx: int = 4096, sampling: SamplingArgs | None = None,
        system_prompt: str | None = None,
    ) -> Frame:  # fmt: skip
        return self._request(
            "REGISTER", agent=agent, model=model, n_ctx=n_ctx, sampling=sampling,
            system_prompt=system_prompt,
        )  # fmt: skip

    def decode(
        self, agent: str, prompt: str | None = None, *, messages: Messages | None = None,
        max_tokens: int = 256, sampling: SamplingArgs | None = None, stop: Sequence[str] = (),
    ) -> DecodeResult:  # fmt: skip
        fields = _decode_fields(agent, prompt, messages, max_tokens, sampling, stop)
        return _decode_result(self._request("DECODE", **fields))

    def stream(
        self, agent: str, prompt: str | None = None, *, messages: Messages | None = None,
        max_tokens: int = 256, sampling: SamplingArgs | None = None, stop: Sequence[str] = (),
    ) -> DecodeStream:  # fmt: skip
        fields = _decode_fields(agent, prompt, messages, max_tokens, sampling, stop)
        return DecodeStream(self, fields)

    def reset(self, agent: str) -> None:
        self._request("RESET", agent=agent)

    def unregister(self, agent: str) -> None:
        self._request("UNREGISTER", agent=agent)

    def status(self) -> Frame:
        return self._request("STATUS")

    def list_agents(self) -> list[Frame]:
        agents: list[Frame] = self._request("LIST")["agents"]
        return agents

    def models(self) -> list[Frame]:
        models: list[Frame] = self._request("MODELS")["models"]
        return models

    def cancel(self, request_id: int) -> bool:
        """Cancel a request of this connection. Blocking requests take turns, so a stream is
        stopped with :meth:`DecodeStream.close` instead; this is here for parity."""
        return bool(self._request("CANCEL", target=request_id)["cancelled"])

    def shutdown(self) -> None:
        self._request("SHUTDOWN")


class DecodeStream(_Streamed):
    """The text pieces of a streamed DECODE, then its :attr:`result`.

    The request goes out on the first iteration. :meth:`close` stops early: the daemon is
    asked to cancel, and the request's remaining frames are read and dropped.
    """

    def __init__(self, client: Client, fields: Frame) -> None:
        self._frames = client._frames("DECODE", {**fields, "stream": True}, owner=self)

    def __iter__(self) -> DecodeStream:
        return self

    def __next__(self) -> str:
        for frame in self._frames:
            if "event" in frame:
                return str(frame["text"])
            self._result = _decode_result(_result(frame))
        raise StopIteration

    def close(self) -> None:
        self._frames.close()
