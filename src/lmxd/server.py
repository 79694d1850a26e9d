"""The socket: connections, framing, peer credentials, and requests turned into service calls.

Each connection speaks JSON lines, or the article's text protocol when its first byte is not
``{``. A connection may have several requests in flight; each runs as its own task and
writes its reply when done, so a slow DECODE never holds up a STATUS. When a client goes away,
its requests' generations are cancelled at their next token. The server never touches
llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from lmxd import protocol
from lmxd.errors import LineTooLong, LmxdError, ProtocolError
from lmxd.scheduler import Job
from lmxd.scheduler.agents import JobResult
from lmxd.service import Service, result_fields
from lmxd.textproto import serve_text

log = logging.getLogger("lmxd.server")


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's uid, from the kernel (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line without its newline; None at end of stream; LineTooLong past the limit.

    An over-long line is read to its end and dropped, so the next frame starts clean.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial or None
    except asyncio.LimitOverrunError:
        while True:
            try:
                await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as more:
                await reader.readexactly(more.consumed)
            except asyncio.IncompleteReadError:
                break
        raise LineTooLong(f"a frame is at most {protocol.MAX_LINE_BYTES} bytes") from None
    return line[:-1]


class Connection:
    """One client: reads frames, runs each request as a task, writes replies in order given."""

    def __init__(self, service: Service, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.service = service
        self.reader = reader
        self.writer = writer
        self.uid = peer_uid(writer)
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: dict[protocol.RequestId, Job] = {}

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            with contextlib.suppress(ConnectionError):
                self.writer.write(data)
                await self.writer.drain()  # a client that does not read slows only itself

    async def serve(self) -> None:
        first = await self.reader.read(1)
        if first and first != b"{":
            await serve_text(self, first)
            return
        async for line in self.lines(first):
            if isinstance(line, LineTooLong):
                await self.send(protocol.error(None, line))
            elif line.strip():
                self._spawn(self._handle(line))

    async def lines(self, first: bytes) -> AsyncIterator[bytes | LineTooLong]:
        """The connection's lines (the first one starting with ``first``, the byte that told
        the protocol apart), or the error for one over the size limit, until the client goes."""
        pending = first
        while True:
            try:
                line = await read_line(self.reader)
            except LineTooLong as exc:
                pending = b""
                yield exc
                continue
            if line is None:
                return
            yield pending + line
            pending = b""

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """The client is gone: cancel its generations, then its request tasks."""
        for job in self._jobs.values():
            self.service.scheduler.cancel(job)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def _handle(self, line: bytes) -> None:
        rid: protocol.RequestId | None = None
        try:
            request = protocol.parse_request(line)
            rid = request.id
            await self._dispatch(request)
        except LmxdError as exc:
            if rid is None and isinstance(exc, ProtocolError):
                rid = exc.details.get("id")
            await self.send(protocol.error(rid, exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("internal error on request %r", rid)
            await self.send(protocol.error(rid, LmxdError(f"internal error: {exc!r}")))

    async def _dispatch(self, req: protocol.Request) -> None:
        svc = self.service
        simple: dict[type, Callable[[], Any]] = {
            protocol.Hello: svc.hello,
            protocol.Status: svc.status,
            protocol.List: svc.list_agents,
            protocol.Models: svc.models,
        }
        if type(req) in simple:
            await self.send(protocol.ok(req.id, **simple[type(req)]()))
        elif isinstance(req, protocol.Register):
            # Shielded: a client that leaves mid-REGISTER must not cut a model load in half.
            await self.send(protocol.ok(req.id, **await asyncio.shield(svc.register(req))))
        elif isinstance(req, protocol.Decode):
            await self._decode(req)
        elif isinstance(req, protocol.Reset):
            reply = await asyncio.shield(svc.scheduler.reset(req.agent))
            await self.send(protocol.ok(req.id, **reply))
        elif isinstance(req, protocol.Unregister):
            reply = await asyncio.shield(svc.scheduler.unregister(req.agent))
            await self.send(protocol.ok(req.id, **reply))
        elif isinstance(req, protocol.Cancel):
            job = self._jobs.get(req.target)
            if job is not None:
                svc.scheduler.cancel(job)
            await self.send(protocol.ok(req.id, cancelled=job is not None))
        elif isinstance(req, protocol.Shutdown):
            await self.send(protocol.ok(req.id, **svc.shutdown(self.uid)))

    async def _decode(self, req: protocol.Decode) -> None:
        if req.id in self._jobs:
            raise ProtocolError(f"request id {req.id!r} is already in flight", id=req.id)

        async def on_text(text: str) -> None:
            await self.send(protocol.event(req.id, "token", text=text))

        result = await self.run_job(req.id, self.service.decode(req), on_text)
        await self.send(protocol.ok(req.id, **result_fields(result)))

    async def run_job(
        self, rid: protocol.RequestId, job: Job,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> JobResult:  # fmt: skip
        """Wait for a job, streaming its text; if this task is cancelled, so is the job."""
        self._jobs[rid] = job
        try:
            if job.events is not None and on_text is not None:
                while text := await job.events.get():
                    await on_text(text)
            return await job.done
        except asyncio.CancelledError:
            self.service.scheduler.cancel(job)
            raise
        finally:
            del self._jobs[rid]


class Server:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()

    async def start(self, path: Path) -> None:
        # The limit bounds one frame; readuntil raises past it and read_line recovers.
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(path), limit=protocol.MAX_LINE_BYTES + 1
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self.service, reader, writer)
        self._connections.add(conn)
        try:
            await conn.serve()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(conn)
            await conn.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.close()
