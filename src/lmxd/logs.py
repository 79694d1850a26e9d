"""How the daemon's log lines look: plain text or one JSON object per line, and their level.

Every event is one line whose facts are ``key=value`` pairs (``park agent=coder tokens=412
bytes=92952 ms=1.20``). In JSON (``lmxd serve --log-format json``) a line is an object with
``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger`` and ``message``, and each pair of
the message as a field of its own: a number as a number, ``True``/``False`` as a boolean,
``None`` as null, a quoted value (:func:`pairs` quotes one with spaces) as its string, anything
else as text. A pair whose key is one of those four is left in the message only; a traceback
goes in ``exc``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from lmxd.errors import Busy, Forbidden, LedgerDenied, LmxdError, ParkBudgetExceeded

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_PAIR = re.compile(r'(?<![\w.])([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|[^\s,;]+)')
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")  # not 0600: a mode
_WORDS = {"True": True, "False": False, "None": None}
_BASE = ("time", "level", "logger", "message")
# Refusals an operator acts on (a bigger cap or budget, a longer queue, a stranger knocking):
# WARNING. Any other failed request (a wrong name, a bad n_ctx) is the client's: INFO.
REFUSALS = (LedgerDenied, ParkBudgetExceeded, Busy, Forbidden)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in fields(message).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def fields(message: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a message, each value typed as the module says."""
    out: dict[str, Any] = {}
    for key, text in _PAIR.findall(message):
        if key in _BASE:
            continue
        out[key] = _value(text.rstrip(":"))
    return out


def _value(text: str) -> Any:
    if text.startswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            return text
    if _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    return _WORDS.get(text, text)


def pairs(details: Mapping[str, Any]) -> str:
    """``details`` as ``key=value`` pairs for a log line: a nested mapping's entries as
    ``key.inner=value``, text with spaces or quotes quoted; lists of mappings (a refusal's
    every device) left out, their gist being in the other pairs."""
    out = []
    for key, value in details.items():
        if isinstance(value, Mapping):
            out += [f"{key}.{k}={_text(v)}" for k, v in value.items() if _scalar(v)]
        elif _scalar(value):
            out.append(f"{key}={_text(value)}")
    return " ".join(out)


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _text(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' \t\n"=,;'):
        return json.dumps(text, ensure_ascii=False)
    return text


def failed(log: logging.Logger, op: str, exc: LmxdError, **facts: object) -> None:
    """The one line for a request that failed: ``refused op=REGISTER agent=... model=...
    code=VRAM_LEDGER_DENY cap_bytes=... reserved_bytes=...: message`` (the error's details
    as pairs), or ``failed op=...`` for what is not a refusal."""
    line = pairs({"op": op, **facts, "code": exc.code, **exc.details})
    if isinstance(exc, REFUSALS):
        log.warning("refused %s: %s", line, exc.message)
    else:
        log.info("failed %s: %s", line, exc.message)


def configure(level: int, fmt: str) -> None:
    """Every log line to stderr at ``level`` and above, in ``fmt`` (text or json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
