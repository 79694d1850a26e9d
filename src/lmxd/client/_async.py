"""AsyncClient: one asyncio connection, any number of requests in flight on it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from lmxd import protocol
from lmxd.client._wire import (
    Frame,
    Messages,
    SamplingArgs,
    _decode_fields,
    _decode_result,
    _encode,
    _lost,
    _parse,
    _result,
    _socket_path,
    _Streamed,
    _too_long,
    _unreachable,
)
from lmxd.errors import LmxdError, ProtocolError
from lmxd.results import DecodeResult

log = logging.getLogger(__name__)


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
        self,
        agent: str,
        model: str,
        *,
        n_ctx: int = 4096,
        sampling: SamplingArgs | None = None,
        system_prompt: str | None = None,
    ) -> Frame:
        """Register ``agent`` on ``model`` (a catalog name or a .gguf path)."""
        return await self._request(
            "REGISTER",
            agent=agent,
            model=model,
            n_ctx=n_ctx,
            sampling=sampling,
            system_prompt=system_prompt,
        )

    async def decode(
        self,
        agent: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_tokens: int = 256,
        sampling: SamplingArgs | None = None,
        stop: Sequence[str] = (),
    ) -> DecodeResult:
        """Continue ``agent``'s conversation with a raw ``prompt`` or chat ``messages``."""
        fields = _decode_fields(agent, prompt, messages, max_tokens, sampling, stop)
        return _decode_result(await self._request("DECODE", **fields))

    def stream(
        self,
        agent: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_tokens: int = 256,
        sampling: SamplingArgs | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncDecodeStream:
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
