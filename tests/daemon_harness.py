"""A real daemon in a subprocess on a real Unix socket, and a raw JSON-lines wire to it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class Daemon:
    def __init__(self, *args: str, socket: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lmxd-", dir="/tmp"))  # AF_UNIX paths are short
        self.socket = socket or self.dir / "d.sock"
        self.log_path = self.dir / "daemon.log"
        cmd = [sys.executable, "-m", "lmxd.cli", "serve", "--socket", str(self.socket),
               "--keep-alive", "0", *args]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                Wire(self.socket).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"daemon did not listen in 60 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wire(self) -> Wire:
        return Wire(self.socket)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


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
