"""The Unix socket: accepting connections, framing lines, peer credentials.

A connection's first byte picks its protocol (``{``: JSON lines, anything else: the text
protocol); this module hands the connection to that front and only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from lmxd import protocol
from lmxd.errors import LineTooLong


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
    """One client of the socket: its lines in, its replies out, and who it is."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.uid = peer_uid(writer)
        self._write_lock = asyncio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            with contextlib.suppress(ConnectionError):
                self.writer.write(data)
                await self.writer.drain()  # a client that does not read slows only itself

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

    def __init__(self, pick: Callable[[bytes], Front]) -> None:
        self._pick = pick
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, path: Path) -> None:
        # The limit bounds one frame; readuntil raises past it and read_line recovers.
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(path), limit=protocol.MAX_LINE_BYTES + 1
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(reader, writer)
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
