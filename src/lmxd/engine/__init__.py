"""The engine: a thin layer over llama-cpp-python's low-level API, run on one thread.

``Engine`` owns that thread and the process's one backend init; ``Model`` is a GGUF loaded
once and shared; ``Context`` is one llama.cpp context of a model with several sequences, each
with a KV stream of its own; ``Stepper`` is the decode loop over a context's sequences. Nothing
outside this package calls llama.cpp.
"""

from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import Model
from lmxd.engine.runtime import Engine, MeasuredBuffers
from lmxd.engine.sampling import Sampler, SamplingParams
from lmxd.engine.stepper import Reply, ReplySpec, SeqReport, SliceControl, Stepper
from lmxd.engine.textstream import StopMatcher, TokenTextDecoder

__all__ = [
    "Context",
    "ContextParams",
    "Engine",
    "MeasuredBuffers",
    "Model",
    "Reply",
    "ReplySpec",
    "Sampler",
    "SamplingParams",
    "SeqReport",
    "SliceControl",
    "Stepper",
    "StopMatcher",
    "TokenTextDecoder",
]
