"""Starting a daemon as a child process and waiting until it listens (demo, benches, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from lmxd.config import NO_FILE
from lmxd.errors import DaemonFailed


class DaemonProcess:
    """``lmxd serve`` in a child process on a private socket; stop() ends it with SIGTERM."""

    def __init__(
        self,
        *args: str,
        socket_path: Path | None = None,
        timeout: float = 120,
        http: str = "off",
        verbose: bool = False,  # log every park, restore and context (INFO)
        env: Mapping[str, str] | None = None,  # set in its environment, beside ours
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lmxd-", dir="/tmp"))  # AF_UNIX paths are short
        self.socket = socket_path or self.dir / "d.sock"
        self.log_path = self.dir / "daemon.log"
        cmd = [
            sys.executable,
            "-m",
            "lmxd.cli",
            *(["-v"] if verbose else []),
            "serve",
            "--socket",
            str(self.socket),
            "--http",
            http,
            # Its agents on disk in its own directory, not the user's (unless told).
            *([] if "--park-dir" in args else ["--park-dir", str(self.dir / "state")]),
            # Only the options given here: not the user's config file (unless told).
            *([] if "--config" in args else ["--config", NO_FILE]),
            *args,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonFailed(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise DaemonFailed(f"daemon did not listen within {timeout:.0f} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
