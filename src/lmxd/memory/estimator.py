"""Predicting what llama.cpp will allocate for a model, from its GGUF metadata alone.

The prediction has four parts, reported separately, because they live and die at different
times: the weights (once per model), the KV cache (grows with n_ctx and sequences), the compute
buffers (sized by the largest batch llama.cpp reserves a graph for) and the backend's fixed
overhead (once per process). Each formula below follows what llama.cpp does in the version we
pin (0.3.36), with the source named beside it; docs/memory.md puts predictions beside
measurements.

The estimate is meant to be slightly above the truth and never below it: the ledger admits
work on these numbers, and an under-estimate is an out-of-memory crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import gguf

from lmxd.errors import ContextSizeError
from lmxd.modelfile import ModelInfo
from lmxd.units import MiB

# llama-context.cpp pads n_ctx (and llama-kv-cache-iswa.cpp the sliding-window cache) to 256.
KV_PAD = 256
# CUDA's per-process cost beyond llama.cpp's own buffers: the CUDA context, cuBLAS's workspace
# and ggml's memory pool. On the H200 (2026-11-29) NVML showed 519-521 MiB for one model and
# context after short prompts, and 611-618 MiB after prefills of 4,000 to 5,700 tokens in
# batches of 512, whatever the layers on the device (scripts/measure_offload.py, and
# `lmxd bench offload`, whose peaks crossed caps by up to 11 MiB with 576 counted here).
CUDA_OVERHEAD = 640 * MiB
# Allocator alignment slack per context; it also covers llama.cpp's buffer log lines, which
# round to 0.01 MiB, so that a measured figure never exceeds an exact prediction.
COMPUTE_SLACK = 128 * 1024
# Decode reads every weight of the model once per step; a byte read from host RAM by the CPU
# costs this many times a byte read by the GPU from its own memory: 33-37 for the
# Llama-3.2-1B shape on the H200 against its 16 CPU cores (`lmxd bench offload`, 2026-11-29
# 22:33 UTC: all 17 layers 733 tok/s, 13 of 17 107, 8 of 17 47, 3 of 17 33, none 27). Another
# machine has another ratio: the REGISTER reply's estimate uses this one, and MODELS shows the
# speed measured.
HOST_SLOWDOWN = 35.0
# Tensors are placed at aligned offsets in their buffers; 256 covers CPU (32/64) and CUDA (128).
_TENSOR_ALIGN = 256


class Backend(StrEnum):
    CPU = "cpu"  # every buffer lands in host memory
    CUDA = "cuda"  # layers offloaded to the GPU; the ledger counts device bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes by part. ``weights``, ``kv`` and ``compute`` are the device's (host RAM
    on CPU: what the ledger charges); ``*_host`` what a CUDA model keeps in host RAM."""

    backend: Backend
    n_ctx: int  # per sequence, as asked
    n_seq: int
    n_gpu_layers: int  # of n_layer + 1 (the output layer counts as one); all on CPU
    kv_cells: int  # cells of the (full-attention) KV pool after padding
    weights: int  # on the device
    weights_host: int  # left in host memory (the input embeddings, and layers not offloaded)
    kv: int
    kv_host: int  # of the layers not offloaded
    kv_per_token: int  # bytes per token of context, summed over all layers
    compute: int
    compute_host: int  # the CPU backend's compute buffer, when layers stay on the CPU
    output: int  # the logits buffer (host memory on CUDA)
    overhead: int

    @property
    def context(self) -> int:
        """Bytes one context costs on the device: KV + compute (+ logits on CPU)."""
        return self.kv + self.compute + (self.output if self.backend is Backend.CPU else 0)

    @property
    def context_host(self) -> int:
        """Host bytes of one context on CUDA: the logits, and the KV and compute buffer of
        the layers not offloaded."""
        if self.backend is Backend.CPU:
            return 0
        return self.kv_host + self.compute_host + self.output

    @property
    def total(self) -> int:
        """Device bytes of the model, one context and the backend overhead."""
        return self.weights + self.context + self.overhead

    def parts(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv": self.kv,
            "compute": self.compute,
            "output": self.output if self.backend is Backend.CPU else 0,
            "overhead": self.overhead,
        }


def _type_bytes(type_name: str, n_elements: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return n_elements * size // block


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def check_n_ctx(info: ModelInfo, n_ctx: int, beyond_training: bool = False) -> None:
    if n_ctx <= 0:
        raise ContextSizeError(f"n_ctx must be positive, got {n_ctx}", n_ctx=n_ctx)
    if n_ctx > info.n_ctx_train and not beyond_training:
        raise ContextSizeError(
            f"n_ctx {n_ctx} is above the model's training context of {info.n_ctx_train}",
            n_ctx=n_ctx,
            n_ctx_train=info.n_ctx_train,
        )


def layers_on_device(info: ModelInfo, n_gpu_layers: int) -> int:
    """llama.cpp's layer count, normalized: 0 to n_layer + 1 (negative = all)."""
    return info.n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, info.n_layer + 1)


def _first_gpu_block(info: ModelInfo, n_gpu_layers: int) -> int:
    """The first repeating block on the device. llama.cpp counts the output layer as the
    last of n_layer + 1 and offloads from the end: one layer is the output layer, two are it
    and the last block, and so on (llama-model.cpp, ``i_gpu_start``)."""
    return max(info.n_layer + 1 - layers_on_device(info, n_gpu_layers), 0)


def device_span(info: ModelInfo, n_gpu_layers: int) -> range:
    """The layers on the device(s) with ``n_gpu_layers`` offloaded: the last ones, of the
    n_layer + 1 (the output layer is layer n_layer)."""
    return range(_first_gpu_block(info, n_gpu_layers), info.n_layer + 1)


def weight_bytes(
    info: ModelInfo, backend: Backend, n_gpu_layers: int = -1, span: range | None = None
) -> tuple[int, int]:
    """(device bytes, host bytes) of the weights.

    On CUDA, llama.cpp keeps the input embeddings in host memory and puts the last
    ``n_gpu_layers`` layers on the GPU, the output layer first (negative = all); the rest
    stays in host memory (exact against llama.cpp's buffers at 0, 8, 14, 16 and 17 of the
    Llama-3.2-1B shape's layers on the H200, scripts/measure_offload.py). A model with tied
    embeddings gets a device copy of token_embd as its output matrix (llama-model.cpp,
    TENSOR_DUPLICATED).

    ``span``: the layers of one device, for a model split over several by layer (a part of
    :func:`device_span`); the device bytes are that device's, the host bytes the model's.
    """
    sizes = [(t, _pad(t.n_bytes, _TENSOR_ALIGN)) for t in info.tensors]
    everything = sum(size for _, size in sizes)
    if backend is Backend.CPU:
        return everything, 0
    offloaded = device_span(info, n_gpu_layers)
    mine = offloaded if span is None else span
    names = {t.name for t in info.tensors}
    device = host = 0
    for t, size in sizes:
        if t.layer is not None:
            layer: int | None = t.layer
        elif t.name.startswith("output"):
            layer = info.n_layer
        else:
            layer = None  # the input embeddings, and any other tensor outside a block
        if layer in mine:
            device += size
        elif layer not in offloaded:
            host += size
        if t.name == "token_embd.weight" and info.n_layer in mine and "output.weight" not in names:
            device += size  # the duplicated output matrix of tied embeddings
    return device, host


def kv_bytes_per_token(info: ModelInfo, layers: range | None = None) -> int:
    """Bytes of f16 KV one token takes in the blocks of ``layers`` (None: all of them)."""
    return sum(
        _type_bytes("f16", info.n_head_kv[il] * (info.head_dim_k + info.head_dim_v))
        for il in (range(info.n_layer) if layers is None else layers)
        if il < info.n_layer
    )


def decode_speed_share(info: ModelInfo, n_gpu_layers: int) -> float:
    """Estimated decode speed with ``n_gpu_layers`` on the GPU, as a share of the speed with
    all of them there: each step reads every weight once, those in host RAM HOST_SLOWDOWN
    times slower (the input embeddings are only looked up, a row per token: not counted, but
    where they are the output matrix too)."""
    device, host = weight_bytes(info, Backend.CUDA, n_gpu_layers)
    names = {t.name for t in info.tensors}
    # With tied embeddings and the output layer off the device, token_embd is the output
    # matrix too: read whole at every step.
    if "output.weight" in names or layers_on_device(info, n_gpu_layers) > 0:
        host -= sum(
            _pad(t.n_bytes, _TENSOR_ALIGN) for t in info.tensors if t.name == "token_embd.weight"
        )
    full, _ = weight_bytes(info, Backend.CUDA)
    return full / (device + HOST_SLOWDOWN * host)


def _largest_block_tensor(info: ModelInfo) -> int:
    """The bytes of the largest weight matrix of a repeating block."""
    return max(
        (_pad(t.n_bytes, _TENSOR_ALIGN) for t in info.tensors if t.layer is not None), default=0
    )


def _activation_bytes_per_token(info: ModelInfo) -> int:
    """Compute-buffer bytes per token of a ubatch, at the graph's peak.

    The peak is the feed-forward block: the up, gate and gated outputs (3 x n_ff floats) live
    together with the residual stream and its copies (3 x n_embd) and the attention's query
    width (n_head x head_dim, which is n_embd except in models such as Gemma 3), plus the
    per-token inputs (positions, token ids, KV indices: 8 floats' worth). Fitted to within
    0.01 MiB on CPU with llama.cpp 0.3.36 on six shapes (docs/memory.md).
    """
    q_width = max(info.n_head) * info.head_dim_k
    return 4 * (3 * info.n_ff + 3 * info.n_embd + q_width + 8)


def estimate(
    info: ModelInfo,
    n_ctx: int,
    n_seq: int = 1,
    *,
    backend: Backend = Backend.CPU,
    n_gpu_layers: int = -1,
    n_ubatch: int = 512,
    type_k: str = "f16",
    type_v: str = "f16",
    beyond_training: bool = False,
    swa_full: bool = False,
    op_offload: bool = True,
    span: range | None = None,
) -> MemoryEstimate:
    """Predict the bytes of ``n_seq`` sequences of ``n_ctx`` tokens each, each sequence with a
    KV stream of its own (lmxd's contexts set ``kv_unified=false``).

    ``beyond_training`` sizes contexts longer than the model was trained for, as the
    article's naive set-up did (n_ctx 172,032 for every model); lmxd itself refuses them.
    ``swa_full`` gives sliding-window layers a full cache, llama.cpp's default outside lmxd.

    On CUDA with some layers left on the CPU (``n_gpu_layers`` below n_layer + 1), each
    layer's KV lives where the layer does, and both backends get a compute buffer. Those two
    buffers are over-estimated, not fitted: each is given the whole graph's peak, and with
    ``op_offload`` the device's also holds a copy of the largest weight matrix of a block
    (llama.cpp copies the weights of a host layer's matrix products to the device, one at a
    time, for batches of 32 tokens and more, and runs them there). On the H200, for the
    Llama-3.2-1B shape: 64.0 MiB on the device without op_offload, 74.2 with it, against
    72.1 and 85.3 predicted; in host RAM, 72.0 and 16.0 against 72.1.

    ``span``: for a model split over several devices by layer (all of them offloaded), the
    layers of one device; its weights and KV are those layers', and its compute buffer is
    over-estimated the same way, as the whole graph's peak (not measured: no machine with
    two GPUs was at hand; llama.cpp gives each device a buffer for the nodes it runs).
    """
    check_n_ctx(info, n_ctx, beyond_training)
    if n_seq < 1:
        raise ContextSizeError(f"n_seq must be >= 1, got {n_seq}", n_seq=n_seq)
    weights, weights_host = weight_bytes(info, backend, n_gpu_layers, span)

    # KV cache (llama-kv-cache.cpp): per layer, n_head_kv heads of K and V rows per cell; one
    # stream of n_ctx cells (padded) per sequence.
    stream = _pad(n_ctx, KV_PAD)
    cells = stream * n_seq
    # Sliding-window layers keep, per stream, the window plus one ubatch
    # (llama-kv-cache-iswa.cpp, one stream per sequence, swa_full off).
    swa_stream = stream if swa_full else _pad(min(stream, info.n_swa + n_ubatch), KV_PAD)
    swa_cells = swa_stream * n_seq
    full_per_token = swa_per_token = 0
    kv = kv_host = 0
    offloaded = device_span(info, n_gpu_layers) if backend is Backend.CUDA else range(0)
    mine = offloaded if span is None or backend is Backend.CPU else span
    for il in range(info.n_layer):
        k = _type_bytes(type_k, info.n_head_kv[il] * info.head_dim_k)
        v = _type_bytes(type_v, info.n_head_kv[il] * info.head_dim_v)
        if info.swa_layers[il]:
            swa_per_token += k + v
            layer = (k + v) * swa_cells
        else:
            full_per_token += k + v
            layer = (k + v) * cells
        if backend is Backend.CPU or il in mine:
            kv += layer
        elif il not in offloaded:
            kv_host += layer

    # Compute buffers (llama-context.cpp sched_reserve): the largest graph is a full ubatch
    # attending over a whole stream. Flash attention takes an f16 mask per KV cache of
    # (stream cells x ubatch); the activations scale with the ubatch. A one-token graph's peak
    # is the logits rows instead, when those are larger.
    ubatch = min(n_ubatch, cells)
    masks = 2 * ubatch * (stream if full_per_token else 0) + 2 * ubatch * (
        swa_stream if swa_per_token else 0
    )
    logits = 4 * info.n_vocab * n_seq  # one row per sequence (n_outputs_max = n_seq)
    compute = max(logits, masks + ubatch * _activation_bytes_per_token(info)) + COMPUTE_SLACK
    on_device = layers_on_device(info, n_gpu_layers) if backend is Backend.CUDA else 0
    compute_host = 0
    if backend is Backend.CUDA and on_device <= info.n_layer:
        compute_host = compute
        if op_offload:
            compute += _largest_block_tensor(info)

    return MemoryEstimate(
        backend=backend,
        n_ctx=n_ctx,
        n_seq=n_seq,
        n_gpu_layers=on_device,
        kv_cells=cells,
        weights=weights,
        weights_host=weights_host,
        kv=kv,
        kv_host=kv_host,
        kv_per_token=full_per_token + swa_per_token,
        compute=compute,
        compute_host=compute_host,
        output=logits,
        overhead=CUDA_OVERHEAD if backend is Backend.CUDA else 0,
    )
