"""Server-sent events, and noticing a client that went away.

A client that disconnects must stop its generation at the next token, streamed or not, and a
client that stops reading must not stall anyone: this response pulls the next event only once
the previous one is written, so an unread stream leaves its pieces in the DECODE's stream
buffer, where the scheduler notices it is full and pauses that agent alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("lmxd.fronts.http")
T = TypeVar("T")
_encoder = msgspec.json.Encoder()


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has disconnected (the request body must have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def watched(work: Awaitable[T], receive: Receive, on_gone: Callable[[], None]) -> T:
    """``work``'s result, unless the client disconnects first: then ``on_gone()`` runs and
    :class:`ClientGone` is raised. ``work`` runs in the calling task (a watcher task cancels
    it), so its result is used without a hop through another task."""
    async with _watching(receive) as gone:
        try:
            return await work
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
    on_gone()
    raise ClientGone


@contextlib.asynccontextmanager
async def _watching(receive: Receive) -> AsyncIterator[asyncio.Event]:
    """While inside, a client that disconnects cancels the current task and sets the event."""
    task = asyncio.current_task()
    assert task is not None
    gone = asyncio.Event()

    async def watch() -> None:
        await _disconnected(receive)
        gone.set()
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield gone
    finally:
        watcher.cancel()
        if gone.is_set():
            task.uncancel()


def event(data: Any) -> bytes:
    """One unnamed event (the chat and completions streams)."""
    return b"data: " + _encoder.encode(data) + b"\n\n"


def named_event(kind: str, data: Any) -> bytes:
    """One event with its ``event:`` line (the Responses API's stream)."""
    return f"event: {kind}\n".encode() + event(data)


class EventStream(Response):
    """``data:`` events from ``events`` (each a JSON value, a list of them to write at once,
    or bytes already framed), then
    ``data: [DONE]`` if ``done`` is set. Whatever ends it (the events, a disconnect, the daemon
    stopping), ``on_close`` runs: it cancels the generation behind the events."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[Any],
        on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
        done: bool = True,
    ) -> None:
        self.events = events
        self.on_close = on_close
        self.done = done
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async with _watching(receive) as gone:
                try:
                    await self._pump(send)
                except asyncio.CancelledError:
                    if not gone.is_set():
                        raise
        finally:
            self.on_close()

    async def _pump(self, send: Send) -> None:
        try:
            async for item in self.events:
                if isinstance(item, bytes):
                    body = item
                elif isinstance(item, list):  # events ready together go out in one write
                    body = b"".join(event(value) for value in item)
                else:
                    body = event(item)
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except Exception as exc:  # a bug: the client gets an error event, not a cut stream
            log.exception("internal error in a stream")
            error = {
                "message": f"internal error: {exc!r}",
                "type": "server_error",
                "code": "INTERNAL",
                "param": None,
            }
            await send(
                {"type": "http.response.body", "body": event({"error": error}), "more_body": True}
            )
        tail = b"data: [DONE]\n\n" if self.done else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
