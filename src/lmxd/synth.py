"""Synthetic GGUF models: random weights in the exact tensor shapes of a real architecture.

This module owns the catalogue of architecture shapes (:data:`SHAPES`) and the generator
(:func:`synthesize`) that turns a shape into a loadable, quantized GGUF file. The files exist so
that sizing, loading and serving can be tested against realistic tensor layouts and file sizes
without downloading real weights: the weights are noise, the tokenizer is borrowed from a real
GGUF and padded to the shape's vocabulary size, and llama.cpp's own quantizer produces the final
file, so its tensor-type choices (and therefore its size) match what published files went through.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np

from lmxd.engine.runtime import Engine
from lmxd.errors import EngineError, InvalidInput, ModelFileError


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters that fix every tensor shape of a model."""

    name: str
    architecture: str  # "llama" or "qwen2"
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    tied_embeddings: bool
    rope_theta: float
    published_q4_k_m_bytes: int | None  # size of the published Q4_K_M file; None for "tiny"

    @property
    def n_embd_kv(self) -> int:
        return self.n_embd // self.n_head * self.n_head_kv


# Shapes from each model's config.json on Hugging Face; sizes are the published Q4_K_M GGUFs
# (Qwen/Qwen2-0.5B-Instruct-GGUF, bartowski's SmolLM2-360M-Instruct and Llama-3.2-1B-Instruct).
# Fields: name, arch, n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx, tied, theta, size
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        # Generates in ~3 s; vocab = the SmolLM2 tokenizer's own size, so no padding is needed.
        Shape("tiny", "llama", 2, 256, 768, 4, 2, 49152, 8192, True, 1e4, None),
        Shape("smollm2-360m", "llama", 32, 960, 2560, 15, 5, 49152, 8192, True, 1e5, 271_000_000),
        Shape("qwen2-0.5b", "qwen2", 24, 896, 4864, 14, 2, 151936, 32768, True, 1e6, 398_000_000),
        Shape("llama3.2-1b", "llama", 16, 2048, 8192, 32, 8, 128256, 131072, True, 5e5, 807694464),
    )
}

_DISPLAY_NAMES = {
    "smollm2-360m": "SmolLM2-360M",
    "qwen2-0.5b": "Qwen2-0.5B",
    "llama3.2-1b": "Llama-3.2-1B",
}
_WEIGHT_STD = 0.02  # the usual init scale: keeps activations, hence logits, finite and tame
_CHUNK = 1 << 24  # elements drawn per RNG call, so peak RAM is one F16 tensor plus ~64 MiB
_TOKEN_TYPE_UNUSED = 5  # llama_token_type: never produced by tokenization, never special


def shape_named(name: str) -> Shape:
    """The shape called ``name``; :class:`InvalidInput` listing the known ones otherwise."""
    try:
        return SHAPES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}",
            shape=name,
            known=list(SHAPES),
        ) from None


def _tensors(shape: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor llama.cpp expects, with its numpy shape (the reverse of ggml's ``ne``)."""
    e, kv, ff = shape.n_embd, shape.n_embd_kv, shape.n_ff
    yield "token_embd.weight", (shape.n_vocab, e)
    yield "output_norm.weight", (e,)
    if not shape.tied_embeddings:  # absent => llama.cpp reuses token_embd as the output head
        yield "output.weight", (shape.n_vocab, e)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (e,)
        yield b + "attn_q.weight", (e, e)
        yield b + "attn_k.weight", (kv, e)
        yield b + "attn_v.weight", (kv, e)
        if shape.architecture == "qwen2":  # qwen2 loads these as required tensors
            yield b + "attn_q.bias", (e,)
            yield b + "attn_k.bias", (kv,)
            yield b + "attn_v.bias", (kv,)
        yield b + "attn_output.weight", (e, e)
        yield b + "ffn_norm.weight", (e,)
        yield b + "ffn_gate.weight", (ff, e)
        yield b + "ffn_up.weight", (ff, e)
        yield b + "ffn_down.weight", (e, ff)


def _data(name: str, dims: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    if name.endswith("norm.weight"):
        return np.ones(dims, dtype=np.float32)
    if len(dims) == 1:  # biases stay F32 like the converter writes them; 1-D is never quantized
        return (rng.standard_normal(dims, dtype=np.float32) * _WEIGHT_STD).astype(np.float32)
    out = np.empty(dims, dtype=np.float16)
    flat = out.reshape(-1)
    for lo in range(0, flat.size, _CHUNK):  # fill in chunks: no full-size float32 temporary
        n = min(_CHUNK, flat.size - lo)
        flat[lo : lo + n] = rng.standard_normal(n, dtype=np.float32) * _WEIGHT_STD
    return out


def _copy_tokenizer(writer: gguf.GGUFWriter, tokenizer_gguf: Path, n_vocab: int) -> None:
    """Copy ``tokenizer.*`` keys, padding the per-token arrays with placeholders to n_vocab."""
    if not tokenizer_gguf.is_file():
        raise ModelFileError(
            f"tokenizer GGUF not found: {tokenizer_gguf}", path=str(tokenizer_gguf)
        )
    try:
        fields = gguf.GGUFReader(tokenizer_gguf).fields
    except (ValueError, OSError) as exc:
        raise ModelFileError(
            f"cannot read tokenizer GGUF {tokenizer_gguf}: {exc}", path=str(tokenizer_gguf)
        ) from exc
    if "tokenizer.ggml.tokens" not in fields:
        raise ModelFileError(
            f"{tokenizer_gguf} has no tokenizer.ggml.tokens", path=str(tokenizer_gguf)
        )
    have = len(fields["tokenizer.ggml.tokens"].data)
    if have > n_vocab:
        raise InvalidInput(f"tokenizer has {have} tokens, more than the shape's {n_vocab}")
    pad = n_vocab - have
    # llama.cpp requires the token list to match token_embd's rows; placeholder names must be
    # unique (the vocab is a map) and UNUSED so they never take part in tokenization.
    padding: dict[str, list[Any]] = {
        "tokenizer.ggml.tokens": [f"<|pad_{i}|>" for i in range(have, n_vocab)],
        "tokenizer.ggml.token_type": [_TOKEN_TYPE_UNUSED] * pad,
        "tokenizer.ggml.scores": [0.0] * pad,
    }
    for key, field in fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key in padding:
            value = value + padding[key]
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)


def _write_source(shape: Shape, path: Path, tokenizer_gguf: Path, seed: int) -> None:
    """Write the unquantized model (F16 matrices, F32 norms and biases) one tensor at a time."""
    arch = shape.architecture
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"synthetic {_DISPLAY_NAMES.get(shape.name, shape.name)} shape")
    w.add_file_type(llama_cpp.LLAMA_FTYPE_MOSTLY_F16)
    for key, val in (
        ("block_count", shape.n_layer),
        ("context_length", shape.n_ctx_train),
        ("embedding_length", shape.n_embd),
        ("feed_forward_length", shape.n_ff),
        ("attention.head_count", shape.n_head),
        ("attention.head_count_kv", shape.n_head_kv),
        ("vocab_size", shape.n_vocab),
        ("rope.dimension_count", shape.n_embd // shape.n_head),
    ):
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5 if arch == "llama" else 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", shape.rope_theta)
    _copy_tokenizer(w, tokenizer_gguf, shape.n_vocab)

    # Declare every tensor first (header + tensor table), then stream the data in the same order,
    # so only one tensor is in memory at a time (token_embd of the 1B shape is 0.5 GB in F16).
    specs = list(_tensors(shape))
    for name, dims in specs:
        dtype = np.dtype(np.float32 if len(dims) == 1 else np.float16)
        w.add_tensor_info(name, dims, dtype, int(np.prod(dims)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in specs:
        w.write_tensor_data(_data(name, dims, rng))
    w.close()


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise EngineError(f"llama_model_quantize failed ({rc}) for {src}", rc=rc)


def synthesize(
    shape: Shape,
    dest: Path,
    tokenizer_gguf: Path,
    quantization: str = "Q4_K_M",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Generate a random-weight GGUF of ``shape`` at ``dest``, quantized by llama.cpp.

    Deterministic for a given seed. The F16 source (about 3x the result) is written next to
    ``dest`` and deleted afterwards; ``dest`` only appears once complete.
    On 2 CPU cores: tiny ~3 s, smollm2-360m ~11 s, qwen2-0.5b ~15 s, llama3.2-1b ~70 s.
    """
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization.upper()}", None)
    if not isinstance(ftype, int):
        raise InvalidInput(f"unknown quantization {quantization!r}", quantization=quantization)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Both temporaries sit next to dest: os.replace is only atomic within one filesystem. The
    # pid keeps concurrent runs apart; the files get the usual umask-derived mode, unlike mkstemp.
    src = dest.with_name(f".{dest.name}.{os.getpid()}.f16.gguf")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    start = time.monotonic()
    try:
        log(
            f"synth: writing random F16 weights of shape {shape.name} "
            f"({shape.n_layer} layers, n_embd {shape.n_embd}, vocab {shape.n_vocab}) to {src}"
            " (llama3.2-1b takes about 70 s in all on 2 cores)"
        )
        _write_source(shape, src, Path(tokenizer_gguf), seed)
        log(
            f"synth: F16 source {src.stat().st_size / 1e6:.1f} MB in "
            f"{time.monotonic() - start:.1f} s; quantizing to {quantization.upper()}"
        )
        Engine.get().call(_quantize, src, tmp, ftype)  # llama.cpp runs on the engine thread
        os.replace(tmp, dest)
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    log(f"synth: wrote {dest} ({dest.stat().st_size:,} bytes) in {time.monotonic() - start:.1f} s")
    return dest
