"""lmxd: one daemon owns the GPU; several LLM agents, each on its own small GGUF model, share it.

The public names are re-exported here; the modules behind them are internal.
"""

from lmxd.client import AsyncClient, Client, DecodeResult
from lmxd.errors import (
    AgentExists,
    BudgetParseError,
    Busy,
    Cancelled,
    ContextSizeError,
    DaemonRunning,
    DaemonUnavailable,
    EngineError,
    FetchError,
    Forbidden,
    InvalidInput,
    KvCacheFull,
    LedgerDenied,
    LmxdError,
    ModelFileError,
    ParkBudgetExceeded,
    PromptTooLong,
    ProtocolError,
    ShuttingDown,
    UnknownAgent,
    UnknownModel,
    UnsupportedArchitecture,
)

__version__ = "0.1.0"

__all__ = [
    "AgentExists",
    "AsyncClient",
    "BudgetParseError",
    "Busy",
    "Cancelled",
    "Client",
    "ContextSizeError",
    "DaemonRunning",
    "DaemonUnavailable",
    "DecodeResult",
    "EngineError",
    "FetchError",
    "Forbidden",
    "InvalidInput",
    "KvCacheFull",
    "LedgerDenied",
    "LmxdError",
    "ModelFileError",
    "ParkBudgetExceeded",
    "PromptTooLong",
    "ProtocolError",
    "ShuttingDown",
    "UnknownAgent",
    "UnknownModel",
    "UnsupportedArchitecture",
    "__version__",
]
