"""Synthetic models: llama.cpp loads them, they decode to finite logits, and the real shapes
come within 3% of the published Q4_K_M files (about 100 s for the three on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.errors import InvalidInput, ModelFileError
from lmxd.synth import SHAPES, Shape, shape_named, synthesize


def loads_as(path: Path, shape: Shape) -> None:
    engine = Engine.get()

    def check() -> None:
        registry = ModelRegistry(engine)
        model = registry.acquire(path)
        try:
            assert llama_cpp.llama_model_n_layer(model.ptr) == shape.n_layer
            assert model.n_vocab == shape.n_vocab
            assert model.info.n_embd == shape.n_embd
        finally:
            registry.release(model)

    engine.call(check)


def test_unknown_shape_lists_known_ones() -> None:
    with pytest.raises(InvalidInput) as exc:
        shape_named("gpt-5")
    assert all(name in exc.value.message for name in SHAPES)
    assert shape_named("tiny") is SHAPES["tiny"]


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError):
        synthesize(SHAPES["tiny"], tmp_path / "m.gguf", tmp_path / "nope.gguf", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # temporary files are cleaned up on failure too


def test_unknown_quantization(tmp_path: Path, smollm2: Path) -> None:
    with pytest.raises(InvalidInput):
        synthesize(SHAPES["tiny"], tmp_path / "m.gguf", smollm2, "Q9_X", log=lambda _: None)


def test_tiny_loads_and_decodes_finite_logits(tiny: Path) -> None:
    shape = SHAPES["tiny"]
    assert [p.name for p in tiny.parent.iterdir()] == [tiny.name]  # no temporaries left
    assert tiny.stat().st_size < 20_000_000
    loads_as(tiny, shape)
    engine = Engine.get()

    def decode() -> np.ndarray:
        registry = ModelRegistry(engine)
        model = registry.acquire(tiny)
        ctx = Context(model, ContextParams(n_ctx=256))
        try:
            ctx.decode([0, 0, 0, 0], [1, 100, 2000, 30000], [0, 1, 2, 3], [0, 0, 0, 1])
            ptr = llama_cpp.llama_get_logits_ith(ctx.ptr, 3)
            return np.ctypeslib.as_array(ptr, shape=(shape.n_vocab,)).copy()
        finally:
            ctx.free()
            registry.release(model)

    logits = engine.call(decode)
    assert np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("name", ["smollm2-360m", "qwen2-0.5b", "llama3.2-1b"])
def test_real_shape_matches_published_size(tmp_path: Path, smollm2: Path, name: str) -> None:
    shape = SHAPES[name]
    dest = synthesize(shape, tmp_path / f"{name}.gguf", smollm2, log=lambda _: None)
    assert shape.published_q4_k_m_bytes is not None
    ratio = dest.stat().st_size / shape.published_q4_k_m_bytes
    assert abs(ratio - 1) < 0.03, f"{name}: {dest.stat().st_size:,} bytes, {ratio:.3f}x published"
    loads_as(dest, shape)  # memory-mapped, so loading even the 1B shape is quick
