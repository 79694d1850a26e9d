"""Client: one blocking connection, one request at a time (threads take turns)."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Generator, Sequence
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
from lmxd.errors import DaemonUnavailable, ProtocolError
from lmxd.results import DecodeResult


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
        self,
        agent: str,
        model: str,
        *,
        n_ctx: int = 4096,
        sampling: SamplingArgs | None = None,
        system_prompt: str | None = None,
    ) -> Frame:
        return self._request(
            "REGISTER",
            agent=agent,
            model=model,
            n_ctx=n_ctx,
            sampling=sampling,
            system_prompt=system_prompt,
        )

    def decode(
        self,
        agent: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_tokens: int = 256,
        sampling: SamplingArgs | None = None,
        stop: Sequence[str] = (),
    ) -> DecodeResult:
        fields = _decode_fields(agent, prompt, messages, max_tokens, sampling, stop)
        return _decode_result(self._request("DECODE", **fields))

    def stream(
        self,
        agent: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_tokens: int = 256,
        sampling: SamplingArgs | None = None,
        stop: Sequence[str] = (),
    ) -> DecodeStream:
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
