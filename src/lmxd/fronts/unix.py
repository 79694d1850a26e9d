"""The Unix socket: accepting connections, framing lines, peer credentials.

A connection's first byte picks its protocol (``{``: JSON lines, anything else: the text
protocol); this module hands the connection to that front and only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from lmxd import protocol
from lmxd.errors import LineTooLong

log = logging.getLogger("lmxd.fronts.unix")

LISTEN_BACKLOG = 1024  # connects the kernel queues before the daemon accepts them


def peer_uid(writer: asyncio.StreamWriter) -> int:
    """The connecting process's uid, from the kernel (SO_PEERCRED); -1, which owns nothing,
    if the kernel does not say."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return -1
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
    """One client of the socket: its lines in, its replies out, and who it is.

    A client that does not read slows only itself: a reply waits for the connection's
    socket to drain, and the front stops reading requests from it meanwhile (a bounded
    number stays in flight). One that reads nothing for ``unread_timeout_s`` while a reply
    waits is disconnected, which cancels its generations.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, unread_timeout_s: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.uid = peer_uid(writer)
        self.unread_timeout_s = unread_timeout_s
        self.closed = False
        self.gone = asyncio.Event()  # set once a send found the client gone, or dropped it
        self._write_lock = asyncio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            if self.closed:
                return
            try:
                self.writer.write(data)
                await asyncio.wait_for(self.writer.drain(), self.unread_timeout_s)
            except ConnectionError:
                self.closed = True
                self.gone.set()
            except TimeoutError:
                log.info(
                    "client uid=%s read nothing for %.0f s: disconnected",
                    self.uid,
                    self.unread_timeout_s,
                )
                self.close()

    def close(self) -> None:
        """Drop the connection now, whatever it has not sent (its reader sees the end)."""
        self.closed = True
        self.gone.set()
        self.writer.transport.abort()

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


Front = Callable[[Connection, bytes], Awaitable[None]]  # serves a connection to its end


class UnixServer:
    """Listens on the socket; ``pick`` names the front for a connection's first byte."""

    def __init__(self, pick: Callable[[bytes], Front], unread_timeout_s: float) -> None:
        self._pick = pick
        self._unread_timeout_s = unread_timeout_s
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, path: Path) -> None:
        # The limit bounds one frame; readuntil raises past it and read_line recovers. The
        # backlog takes a burst of connects (asyncio's default of 100 refused 99 of 200).
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(path), limit=protocol.MAX_LINE_BYTES + 1, backlog=LISTEN_BACKLOG
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(reader, writer, self._unread_timeout_s)
        try:
            first = await reader.read(1)
            if first:
                await self._pick(first)(conn, first)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        """Stop listening and end every connection (its front cancels what it started)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
