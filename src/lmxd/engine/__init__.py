"""The engine: a thin layer over llama-cpp-python's low-level API, run on one thread.

``Engine`` owns that thread and the process's one backend init; ``Model`` is a GGUF loaded
once and shared; ``Context`` is one llama.cpp context of a model with several sequences over a
unified KV pool. Nothing outside this package calls llama.cpp.
"""

from lmxd.engine.context import Context, ContextParams, SeqBatch
from lmxd.engine.model import Model
from lmxd.engine.runtime import Engine, MeasuredBuffers
from lmxd.engine.sampling import Sampler, SamplingParams
from lmxd.engine.textstream import StopMatcher, TokenTextDecoder

__all__ = [
    "Context",
    "ContextParams",
    "Engine",
    "MeasuredBuffers",
    "Model",
    "Sampler",
    "SamplingParams",
    "SeqBatch",
    "StopMatcher",
    "TokenTextDecoder",
]
