"""The one exception tree of lmxd.

Every failure a caller can act on is one of these types, and each carries a stable
``code`` that the wire protocol sends as is::

    LmxdError
    ├── InvalidInput            bad input from a user or client        (code: INVALID_INPUT)
    │   ├── BudgetParseError    "8GB" parses, "eight" does not         (code: BAD_BUDGET)
    │   ├── ConfigError         a config file lmxd serve cannot take   (code: BAD_CONFIG)
    │   ├── ContextSizeError    n_ctx <= 0 or above the training ctx   (code: BAD_N_CTX)
    │   ├── UnknownModel        no catalog entry or file by that name  (code: UNKNOWN_MODEL)
    │   ├── PromptTooLong       more tokens than the agent's n_ctx     (code: PROMPT_TOO_LONG)
    │   ├── UnknownAgent        no agent registered by that id         (code: UNKNOWN_AGENT)
    │   ├── AgentExists         an agent by that id is registered      (code: AGENT_EXISTS)
    │   └── ProtocolError       a frame we cannot take                 (code: BAD_REQUEST)
    │       ├── BadJson         not a JSON object                      (code: BAD_JSON)
    │       ├── BadUtf8         not UTF-8                              (code: BAD_UTF8)
    │       ├── LineTooLong     over the frame size limit              (code: LINE_TOO_LONG)
    │       └── UnknownOp       an op we do not have                   (code: UNKNOWN_OP)
    ├── ModelFileError          missing, not GGUF, truncated           (code: BAD_MODEL_FILE)
    │   └── UnsupportedArchitecture  GGUF of an architecture we cannot size (code: UNKNOWN_ARCH)
    ├── LedgerDenied            the VRAM ledger's cap would be crossed (code: VRAM_LEDGER_DENY)
    ├── ParkBudgetExceeded      host RAM for parked state is used up   (code: PARK_BUDGET_EXCEEDED)
    ├── Busy                    the request queue is full              (code: BUSY)
    ├── Forbidden               only the daemon's own uid may do that  (code: FORBIDDEN)
    ├── Cancelled               the request was cancelled              (code: CANCELLED)
    ├── ShuttingDown            the daemon is stopping                 (code: SHUTTING_DOWN)
    ├── EngineError             llama.cpp refused or failed a call     (code: ENGINE_ERROR)
    │   └── KvCacheFull         no KV cells left for a batch           (code: KV_CACHE_FULL)
    ├── DaemonRunning           a daemon already owns that socket      (code: DAEMON_RUNNING)
    ├── DaemonUnavailable       no daemon answers, or it went away     (code: DAEMON_UNAVAILABLE)
    ├── DaemonFailed            a spawned daemon did not come up       (code: DAEMON_FAILED)
    └── FetchError              a model could not be fetched/verified  (code: FETCH_FAILED)

llama.cpp and OS failures are translated into this tree where they happen (``raise … from
exc``), so callers never see a bare ``OSError`` or a NULL pointer.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LmxdError(Exception):
    """Base of every lmxd error: a stable code, a message and structured details."""

    code: ClassVar[str] = "INTERNAL"

    @classmethod
    def by_code(cls) -> dict[str, type[LmxdError]]:
        """Every error type by its code: how a client turns a wire error back into a type."""
        out: dict[str, type[LmxdError]] = {}
        todo: list[type[LmxdError]] = [cls]
        while todo:
            t = todo.pop()
            out[t.code] = t
            todo.extend(t.__subclasses__())
        return out

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details


class InvalidInput(LmxdError):
    code = "INVALID_INPUT"


class BudgetParseError(InvalidInput):
    code = "BAD_BUDGET"


class ConfigError(InvalidInput):
    """The config file of ``lmxd serve``: unreadable, not TOML, an unknown key, a bad value."""

    code = "BAD_CONFIG"


class ContextSizeError(InvalidInput):
    code = "BAD_N_CTX"


class UnknownModel(InvalidInput):
    code = "UNKNOWN_MODEL"


class PromptTooLong(InvalidInput):
    code = "PROMPT_TOO_LONG"


class UnknownAgent(InvalidInput):
    code = "UNKNOWN_AGENT"


class AgentExists(InvalidInput):
    code = "AGENT_EXISTS"


class ProtocolError(InvalidInput):
    code = "BAD_REQUEST"


class BadJson(ProtocolError):
    code = "BAD_JSON"


class BadUtf8(ProtocolError):
    code = "BAD_UTF8"


class LineTooLong(ProtocolError):
    code = "LINE_TOO_LONG"


class UnknownOp(ProtocolError):
    code = "UNKNOWN_OP"


class ModelFileError(LmxdError):
    code = "BAD_MODEL_FILE"


class UnsupportedArchitecture(ModelFileError):
    code = "UNKNOWN_ARCH"


class LedgerDenied(LmxdError):
    """Raised at a boundary from a :class:`lmxd.memory.ledger.Denial` value."""

    code = "VRAM_LEDGER_DENY"


class ParkBudgetExceeded(LmxdError):
    code = "PARK_BUDGET_EXCEEDED"


class Busy(LmxdError):
    code = "BUSY"


class Forbidden(LmxdError):
    code = "FORBIDDEN"


class Cancelled(LmxdError):
    code = "CANCELLED"


class ShuttingDown(LmxdError):
    code = "SHUTTING_DOWN"


class EngineError(LmxdError):
    code = "ENGINE_ERROR"


class KvCacheFull(EngineError):
    code = "KV_CACHE_FULL"


class DaemonRunning(LmxdError):
    code = "DAEMON_RUNNING"


class DaemonUnavailable(LmxdError):
    code = "DAEMON_UNAVAILABLE"


class DaemonFailed(LmxdError):
    code = "DAEMON_FAILED"


class FetchError(LmxdError):
    code = "FETCH_FAILED"
