"""lmxd: one daemon owns the GPU; several LLM agents, each on its own small GGUF model, share it.

The public names are re-exported here; the modules behind them are internal.
"""

# llama.cpp's shared libraries are loaded before anything else of lmxd's: on the H200 machine,
# a process that imported gguf (and what it imports) first died in its first CUDA model load
# (seen 2026-11-29, llama-cpp-python 0.3.36). The order is fixed here, once, for every entry.
import llama_cpp  # noqa: F401

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
