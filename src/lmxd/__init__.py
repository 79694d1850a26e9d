"""lmxd: one daemon owns the GPU; several LLM agents, each on its own small GGUF model, share it.

The public names are re-exported here; the modules behind them are internal.
"""

from lmxd.client import AsyncClient, Client, DecodeResult
from lmxd.errors import (
    BudgetParseError,
    ContextSizeError,
    EngineError,
    FetchError,
    InvalidInput,
    LedgerDenied,
    LmxdError,
    ModelFileError,
    UnknownModel,
    UnsupportedArchitecture,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BudgetParseError",
    "Client",
    "ContextSizeError",
    "DecodeResult",
    "EngineError",
    "FetchError",
    "InvalidInput",
    "LedgerDenied",
    "LmxdError",
    "ModelFileError",
    "UnknownModel",
    "UnsupportedArchitecture",
    "__version__",
]
