"""A real daemon in a subprocess on a real Unix socket, and a raw JSON-lines wire to it."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from lmxd.spawn import DaemonProcess


class Daemon(DaemonProcess):
    """A real daemon for a test: models unloaded at once (--keep-alive 0) unless told; with
    ``http``, its HTTP front on a free loopback port (:attr:`http_url`), or on the HOST:PORT
    ``http`` names."""

    def __init__(self, *args: str, socket: Path | None = None, http: bool | str = False) -> None:
        super().__init__(
            "--keep-alive",
            "0",
            *args,
            socket_path=socket,
            timeout=60,
            http=http if isinstance(http, str) else "127.0.0.1:0" if http else "off",
        )

    def wire(self) -> Wire:
        return Wire(self.socket)

    @property
    def http_url(self) -> str:
        """The HTTP front's base URL, as the daemon reports it in HELLO."""
        w = self.wire()
        try:
            url: str = w.ok("HELLO")["http"]
        finally:
            w.close()
        return url


class Wire:
    """JSON lines by hand: what any client in any language would send."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(120)
        self.file = self.sock.makefile("rb")
        self.ids = 0

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: str, **fields: Any) -> int:
        self.ids += 1
        self.send_raw(json.dumps({"id": self.ids, "op": op, **fields}).encode() + b"\n")
        return self.ids

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("daemon closed the connection")
        frame: dict[str, Any] = json.loads(line)
        return frame

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request; stream events are collected under "events"."""
        rid = self.send(op, **fields)
        events: list[str] = []
        while True:
            frame = self.recv()
            assert frame["id"] == rid, frame
            if frame.get("event") == "token":
                events.append(frame["text"])
                continue
            if events:
                frame["events"] = events
            return frame

    def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        frame = self.call(op, **fields)
        assert frame["ok"], frame
        return frame
