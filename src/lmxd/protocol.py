"""The wire protocol: JSON lines over a Unix socket, as typed messages.

A client sends one JSON object per line: a request id, an ``op`` and the op's fields. The
daemon answers each request with one line, ``{"id", "ok": true, ...}`` or ``{"id", "ok":
false, "error": {"code", "message", "details"}}``; a streamed DECODE first sends
``{"id", "event": "token", ...}`` lines. Error codes are :mod:`lmxd.errors`' codes, one-to-one.
docs/protocol.md documents every op, field and code with an example.

This module only describes and checks frames; it knows nothing of sockets or agents.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from lmxd.errors import BadJson, BadUtf8, LineTooLong, LmxdError, ProtocolError, UnknownOp

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20  # one frame; a prompt of ~250k tokens fits
AGENT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_AGENT_ID = re.compile(AGENT_ID)

AgentId = Annotated[str, msgspec.Meta(pattern=AGENT_ID)]
INT32_MAX = (1 << 31) - 1  # counts of tokens: llama.cpp's are 32-bit
RequestId = int | str


class Sampling(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling overrides; absent fields take the agent's defaults, then greedy. A field is
    a number or absent: ``null`` is refused, as the docs say."""

    temperature: Annotated[float, msgspec.Meta(ge=0)] | msgspec.UnsetType = msgspec.UNSET
    top_k: Annotated[int, msgspec.Meta(ge=0)] | msgspec.UnsetType = msgspec.UNSET
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | msgspec.UnsetType = msgspec.UNSET
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | msgspec.UnsetType = msgspec.UNSET
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0)] | msgspec.UnsetType = msgspec.UNSET
    seed: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)] | msgspec.UnsetType = msgspec.UNSET


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    content: str


class _Op(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: RequestId


class Hello(_Op, tag="HELLO"):
    pass


class Register(_Op, tag="REGISTER"):
    agent: AgentId
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    n_ctx: Annotated[int, msgspec.Meta(gt=0, le=INT32_MAX)] = 4096
    sampling: Sampling | None = None
    system_prompt: str | None = None


class Decode(_Op, tag="DECODE"):
    agent: AgentId
    prompt: str | None = None
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(gt=0, le=INT32_MAX)] = 256
    sampling: Sampling | None = None
    stop: list[str] = []
    stream: bool = False


class Reset(_Op, tag="RESET"):
    agent: AgentId


class Unregister(_Op, tag="UNREGISTER"):
    agent: AgentId


class Status(_Op, tag="STATUS"):
    pass


class List(_Op, tag="LIST"):
    pass


class Models(_Op, tag="MODELS"):
    pass


class Cancel(_Op, tag="CANCEL"):
    target: RequestId  # the id of a request of this connection


class Shutdown(_Op, tag="SHUTDOWN"):
    pass


Request = (
    Hello | Register | Decode | Reset | Unregister | Status | List | Models | Cancel | Shutdown
)
OPS = (
    "HELLO",
    "REGISTER",
    "DECODE",
    "RESET",
    "UNREGISTER",
    "STATUS",
    "LIST",
    "MODELS",
    "CANCEL",
    "SHUTDOWN",
)

_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


def parse_request(line: bytes) -> Request:
    """One frame to a typed request; every defect is a :class:`ProtocolError` with a code.

    The request id, when one can be read, is in the error's details so the reply can carry it:
    from a frame that is not JSON, or is nested too deeply to decode, only when ``id`` is its
    first key (:func:`leading_id`).
    """
    if len(line) > MAX_LINE_BYTES:
        raise LineTooLong(f"a frame is at most {MAX_LINE_BYTES} bytes, got {len(line)}")
    if not line.strip():
        raise BadJson("an empty line is not a frame: send one JSON object per line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadUtf8(
            f"frames are UTF-8: invalid byte at offset {exc.start}", id=leading_id(line)
        ) from exc
    if too_deep(line):
        raise ProtocolError(
            f"a frame nests at most {MAX_NESTING} objects and arrays", id=leading_id(line)
        )
    try:
        raw = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise BadJson(f"not JSON: {exc}", id=leading_id(line)) from exc
    if not isinstance(raw, dict):
        raise BadJson("a frame is one JSON object")
    rid = raw.get("id")
    rid = rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None
    if "op" not in raw:
        raise ProtocolError(f"a frame needs an `op`; ops: {', '.join(OPS)}", id=rid)
    op = raw["op"]
    if op not in OPS:
        raise UnknownOp(f"unknown op {op!r}; ops: {', '.join(OPS)}", id=rid, op=op)
    try:
        request: Request = _decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"bad {op} request: {exc}", id=rid) from exc
    if isinstance(request, Decode) and (request.prompt is None) == (request.messages is None):
        raise ProtocolError("DECODE takes exactly one of `prompt` and `messages`", id=rid)
    return request


MAX_NESTING = 32  # objects and arrays inside one another; the deepest valid frame has 4
# A string runs to its closing quote, or to the end of the line: an unclosed one must not be
# searched for from every quote after it (0.7 s for 16 KB of \" that way; 45 ms for 1 MiB).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,128}")\s*[,}]')


def too_deep(line: bytes) -> bool:
    """Whether the frame's objects and arrays nest more than MAX_NESTING deep (brackets inside
    strings aside), found without decoding it: decoding a deep enough frame exhausts the
    stack."""
    brackets = _STRING.sub(b"", line).translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_NESTING:
        return False
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max()) > MAX_NESTING


def leading_id(line: bytes) -> RequestId | None:
    """The id of a frame that cannot be decoded, if ``id`` is its first key."""
    match = _LEADING_ID.match(line)
    if match is None:
        return None
    try:
        value = msgspec.json.decode(match.group(1))
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, int | str) else None


SOCKET_ENV = "LMXD_SOCKET"


def default_socket_path() -> Path:
    """``$LMXD_SOCKET``, else ``$XDG_RUNTIME_DIR/lmxd.sock``, else ``/tmp/lmxd-$UID.sock``."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lmxd.sock"
    return Path(f"/tmp/lmxd-{os.getuid()}.sock")


def is_agent_id(text: str) -> bool:
    return _AGENT_ID.match(text) is not None


def encode(frame: dict[str, Any]) -> bytes:
    return _encoder.encode(frame) + b"\n"


def ok(rid: RequestId | None, **fields: Any) -> bytes:
    return encode({"id": rid, "ok": True, **fields})


def error(rid: RequestId | None, exc: LmxdError) -> bytes:
    body = {"code": exc.code, "message": exc.message, "details": exc.details}
    return encode({"id": rid, "ok": False, "error": body})


def event(rid: RequestId, kind: Literal["token"], **fields: Any) -> bytes:
    return encode({"id": rid, "event": kind, **fields})


def to_builtins(value: Any) -> Any:
    """Structs, enums and dataclasses to plain JSON values."""
    return msgspec.to_builtins(value)
