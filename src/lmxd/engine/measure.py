"""What llama.cpp actually allocates for a model and one context: the estimator's check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine, MeasuredBuffers


def measure_allocation(
    path: Path,
    n_ctx: int,
    n_seq: int = 1,
    n_ubatch: int = 512,
    n_gpu_layers: int = -1,
    while_loaded: Callable[[], None] | None = None,
) -> MeasuredBuffers:
    """Load ``path`` and make a context of ``n_seq`` x ``n_ctx`` cells; report its buffers.

    ``while_loaded`` runs while both exist (to read NVML, say). Both are freed before
    returning. The model must not already be loaded in this process (its buffers would not be
    reported again).
    """
    engine = Engine.get()
    registry = ModelRegistry(engine)

    def load() -> None:
        model = registry.acquire(path, n_gpu_layers)
        try:
            params = ContextParams(
                n_ctx=n_ctx, n_seq_max=n_seq, n_batch=n_ubatch, n_ubatch=n_ubatch
            )
            context = Context(model, params)
            try:
                if while_loaded is not None:
                    while_loaded()
            finally:
                context.free()
        finally:
            registry.release(model)

    _, measured = engine.measure(load)
    return measured
