"""The JSON-lines front: frames of docs/protocol.md in, Service calls, frames out.

A connection may have several requests in flight (at most :data:`MAX_IN_FLIGHT`; past it the
front reads no more of its lines until one ends); each runs as its own task and writes its
reply when done, so a slow DECODE never holds up a STATUS. When the client goes away, its
DECODEs are cancelled at their next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from lmxd import protocol
from lmxd.chat.messages import ChatMessage
from lmxd.errors import LineTooLong, LmxdError, ProtocolError
from lmxd.fronts.unix import Connection
from lmxd.service import ChatTurn, DecodeRequest, DecodeStream, Service, TextPrompt

log = logging.getLogger("lmxd.fronts.jsonl")

MAX_IN_FLIGHT = 256  # requests of one connection being served or waiting to send their reply


class JsonLines:
    """One connection speaking JSON lines."""

    def __init__(self, service: Service, conn: Connection) -> None:
        self.service = service
        self.conn = conn
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: dict[protocol.RequestId, DecodeStream] = {}

    async def serve(self, first: bytes) -> None:
        try:
            async for line in self.conn.lines(first):
                if isinstance(line, LineTooLong):
                    await self.conn.send(protocol.error(None, line))
                    continue
                self._spawn(self._handle(line))
                if len(self._tasks) >= MAX_IN_FLIGHT:
                    # Read no more until one ends: a client that sends and never reads
                    # holds at most this many replies in the daemon, not all it sent. A
                    # client found gone meanwhile ends the connection (and its generations).
                    gone = asyncio.ensure_future(self.conn.gone.wait())
                    try:
                        await asyncio.wait(
                            {*self._tasks, gone}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        gone.cancel()
                    if self.conn.gone.is_set():
                        return
        finally:
            # The client is gone (or the daemon is stopping): its DECODEs stop, then its tasks.
            for stream in self._streams.values():
                stream.cancel()
            for task in list(self._tasks):
                task.cancel()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, line: bytes) -> None:
        rid: protocol.RequestId | None = None
        try:
            request = protocol.parse_request(line)
            rid = request.id
            await self._dispatch(request)
        except LmxdError as exc:
            if rid is None and isinstance(exc, ProtocolError):
                rid = exc.details.get("id")
            await self.conn.send(protocol.error(rid, exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("internal error on request %r", rid)
            await self.conn.send(protocol.error(rid, LmxdError(f"internal error: {exc!r}")))

    async def _dispatch(self, req: protocol.Request) -> None:
        svc, send = self.service, self.conn.send
        match req:
            case protocol.Hello():
                await send(protocol.ok(req.id, **svc.hello()))
            case protocol.Status():
                await send(protocol.ok(req.id, **svc.status()))
            case protocol.List():
                await send(protocol.ok(req.id, agents=protocol.to_builtins(svc.list_agents())))
            case protocol.Models():
                await send(protocol.ok(req.id, models=protocol.to_builtins(svc.models())))
            case protocol.Register():
                sampling = protocol.to_builtins(req.sampling) if req.sampling else None
                # Shielded: a client that leaves mid-REGISTER must not cut a model load in half.
                got = await asyncio.shield(
                    svc.register(
                        req.agent, req.model, req.n_ctx, sampling, req.system_prompt, self.conn.uid
                    )
                )
                await send(protocol.ok(req.id, **protocol.to_builtins(got)))
            case protocol.Decode():
                await self._decode(req)
            case protocol.Reset():
                await asyncio.shield(svc.reset(req.agent, self.conn.uid))
                await send(protocol.ok(req.id, agent=req.agent))
            case protocol.Unregister():
                await asyncio.shield(svc.unregister(req.agent, self.conn.uid))
                await send(protocol.ok(req.id, agent=req.agent))
            case protocol.Cancel():
                stream = self._streams.get(req.target)
                if stream is not None:
                    stream.cancel()
                await send(protocol.ok(req.id, cancelled=stream is not None))
            case protocol.Shutdown():
                svc.shutdown(self.conn.uid)
                await send(protocol.ok(req.id, stopping=True))

    async def _decode(self, req: protocol.Decode) -> None:
        if req.id in self._streams:
            raise ProtocolError(f"request id {req.id!r} is already in flight", id=req.id)
        if req.messages is not None:
            prompt: ChatTurn | TextPrompt = ChatTurn(
                tuple(ChatMessage(m.role, m.content) for m in req.messages)
            )
        else:
            prompt = TextPrompt(req.prompt or "")
        sampling = protocol.to_builtins(req.sampling) if req.sampling else None
        request = DecodeRequest(
            agent=req.agent,
            prompt=prompt,
            max_tokens=req.max_tokens,
            sampling=sampling,
            stops=tuple(req.stop),
            stream=req.stream,
        )
        stream = self.service.decode(request, self.conn.uid)
        self._streams[req.id] = stream
        try:
            async for piece in stream.pieces():
                if piece.text:
                    await self.conn.send(protocol.event(req.id, "token", text=piece.text))
            result = await stream.result()
        finally:
            del self._streams[req.id]
        await self.conn.send(protocol.ok(req.id, **protocol.to_builtins(result)))


async def serve(service: Service, conn: Connection, first: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await JsonLines(service, conn).serve(first)
