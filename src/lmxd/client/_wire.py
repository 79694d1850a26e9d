"""The client side of the wire: frames out, frames in, errors back to their types.

Shared by the blocking and the asyncio clients; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from lmxd import protocol
from lmxd.errors import DaemonUnavailable, LineTooLong, LmxdError, ProtocolError
from lmxd.results import DecodeResult

Frame = dict[str, Any]
Messages = list[dict[str, str]]  # [{"role": "user", "content": "..."}]
SamplingArgs = dict[str, Any]  # protocol.Sampling's fields: temperature, top_k, seed...


def _encode(rid: int, op: str, fields: Frame) -> bytes:
    # None stands for "the daemon's default": such fields are left out, not sent as null.
    line = protocol.encode(
        {"id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
    )
    # Checked here because the daemon cannot read the id of a frame it refuses for its size,
    # so its error reply would reach no request and this one would wait forever.
    if len(line) - 1 > protocol.MAX_LINE_BYTES:
        raise LineTooLong(
            f"the {op} request is {len(line) - 1} bytes; a frame is at most "
            f"{protocol.MAX_LINE_BYTES} bytes",
            id=rid,
        )
    return line


def _decode_fields(
    agent: str,
    prompt: str | None,
    messages: Messages | None,
    max_tokens: int,
    sampling: SamplingArgs | None,
    stop: Sequence[str],
) -> Frame:
    return {
        "agent": agent,
        "prompt": prompt,
        "messages": messages,
        "max_tokens": max_tokens,
        "sampling": sampling,
        "stop": list(stop) or None,
    }


def _parse(line: bytes) -> Frame:
    try:
        frame = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"the daemon sent a line that is not JSON: {exc}") from exc
    if not isinstance(frame, dict):
        raise ProtocolError("the daemon sent a line that is not a JSON object")
    return frame


def _result(frame: Frame) -> Frame:
    """The result fields of a final frame; an error frame is raised as its lmxd type."""
    if frame.get("ok"):
        return {k: v for k, v in frame.items() if k not in ("id", "ok")}
    error = frame.get("error") or {}
    code = str(error.get("code", LmxdError.code))
    details = dict(error.get("details") or {})
    cls = LmxdError.by_code().get(code)
    if cls is None:  # a code newer than this client: keep it where a caller can see it
        cls, details["code"] = LmxdError, code
    raise cls(str(error.get("message", "")), **details)


def _decode_result(fields: Frame) -> DecodeResult:
    try:
        return msgspec.convert(fields, DecodeResult)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed DECODE reply from the daemon: {exc}") from exc


def _socket_path(path: str | Path | None) -> Path:
    return Path(path) if path is not None else protocol.default_socket_path()


def _unreachable(path: Path, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        message = f"no daemon is listening at {path}; start one with `lmxd serve`"
    else:
        message = f"cannot connect to the daemon at {path}: {exc.strerror or exc}"
    return DaemonUnavailable(message, path=str(path))


def _lost(path: Path, why: str) -> DaemonUnavailable:
    return DaemonUnavailable(f"connection to the daemon at {path} lost: {why}", path=str(path))


def _too_long() -> str:
    return f"the daemon sent a line over {protocol.MAX_LINE_BYTES} bytes"


class _Streamed:
    _result: DecodeResult | None = None

    @property
    def result(self) -> DecodeResult:
        """The final reply, once the pieces have been iterated to the end."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result
