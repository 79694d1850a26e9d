"""The one exception tree of lmxd.

Every failure a caller can act on is one of these types, and each carries a stable
``code`` that the wire protocol sends as is::

    LmxdError
    ├── InvalidInput            bad input from a user or client        (code: INVALID_INPUT)
    │   ├── BudgetParseError    "8GB" parses, "eight" does not         (code: BAD_BUDGET)
    │   ├── ContextSizeError    n_ctx <= 0 or above the training ctx   (code: BAD_N_CTX)
    │   └── UnknownModel        no catalog entry or file by that name  (code: UNKNOWN_MODEL)
    ├── ModelFileError          missing, not GGUF, truncated           (code: BAD_MODEL_FILE)
    │   └── UnsupportedArchitecture  GGUF of an architecture we cannot size (code: UNKNOWN_ARCH)
    ├── LedgerDenied            the VRAM ledger's cap would be crossed (code: VRAM_LEDGER_DENY)
    ├── EngineError             llama.cpp refused or failed a call     (code: ENGINE_ERROR)
    └── FetchError              a model could not be fetched/verified  (code: FETCH_FAILED)

llama.cpp and OS failures are translated into this tree where they happen (``raise … from
exc``), so callers never see a bare ``OSError`` or a NULL pointer.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LmxdError(Exception):
    """Base of every lmxd error: a stable code, a message and structured details."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details


class InvalidInput(LmxdError):
    code = "INVALID_INPUT"


class BudgetParseError(InvalidInput):
    code = "BAD_BUDGET"


class ContextSizeError(InvalidInput):
    code = "BAD_N_CTX"


class UnknownModel(InvalidInput):
    code = "UNKNOWN_MODEL"


class ModelFileError(LmxdError):
    code = "BAD_MODEL_FILE"


class UnsupportedArchitecture(ModelFileError):
    code = "UNKNOWN_ARCH"


class LedgerDenied(LmxdError):
    """Raised at a boundary from a :class:`lmxd.memory.ledger.Denial` value."""

    code = "VRAM_LEDGER_DENY"


class EngineError(LmxdError):
    code = "ENGINE_ERROR"


class FetchError(LmxdError):
    code = "FETCH_FAILED"
