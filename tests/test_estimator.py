"""The estimator against what llama.cpp really allocates (host memory on this CPU build)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lmxd.engine.measure import measure_allocation
from lmxd.errors import ContextSizeError
from lmxd.memory.estimator import Backend, decode_speed_share, estimate, weight_bytes
from lmxd.modelfile import read_model_info

CASES = [
    ("smollm2", 512, 1),
    ("smollm2", 4096, 1),
    ("smollm2", 8192, 1),
    ("smollm2", 4096, 3),
    ("gemma3", 512, 1),
    ("gemma3", 4096, 1),
    ("gemma3", 32768, 1),
    ("gemma3", 2048, 4),
    ("tiny", 512, 1),
    ("tiny", 4096, 1),
    ("tiny", 8192, 1),
    ("tiny", 1024, 8),
]


@pytest.mark.parametrize(("name", "n_ctx", "n_seq"), CASES)
def test_prediction_within_5_percent_and_never_below(
    request: pytest.FixtureRequest, name: str, n_ctx: int, n_seq: int
) -> None:
    path: Path = request.getfixturevalue(name)
    est = estimate(read_model_info(path), n_ctx, n_seq)
    measured = measure_allocation(path, n_ctx, n_seq)
    parts = measured.parts(device_only=False)
    total = sum(parts.values())
    assert est.total >= total, f"under-estimate: {est.parts()} vs {parts}"
    assert est.total <= 1.05 * total, f"over by more than 5%: {est.parts()} vs {parts}"
    # the exact parts are exact (llama.cpp logs sizes rounded to 0.01 MiB)
    for part in ("weights", "kv", "output"):
        assert abs(est.parts()[part] - parts[part]) <= max(0.001 * parts[part], 8 * 1024), part
    assert est.compute >= parts["compute"]


def test_kv_per_token_counts_every_layer_and_gqa(smollm2: Path, gemma3: Path) -> None:
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x (K + V) x 2 bytes
    assert estimate(read_model_info(smollm2), 1024).kv_per_token == 30 * 3 * 64 * 2 * 2
    # Gemma 3: 18 layers x 1 KV head x 256 dims x 2 x 2, of which 15 layers only hold a window
    est = estimate(read_model_info(gemma3), 16384)
    assert est.kv_per_token == 18 * 256 * 2 * 2
    window_cells = 512 + 512  # n_swa + one ubatch
    assert est.kv == 3 * 1024 * 16384 + 15 * 1024 * window_cells


def test_quantized_kv_is_smaller(smollm2: Path) -> None:
    info = read_model_info(smollm2)
    f16, q8 = estimate(info, 4096), estimate(info, 4096, type_k="q8_0", type_v="q8_0")
    assert q8.kv == f16.kv * 34 // 64  # q8_0: 34 bytes per 32 values, against 64


def test_partial_offload_splits_weights(smollm2: Path) -> None:
    info = read_model_info(smollm2)
    everything, _ = weight_bytes(info, Backend.CPU)
    none_on_gpu, host = weight_bytes(info, Backend.CUDA, n_gpu_layers=0)
    half, _ = weight_bytes(info, Backend.CUDA, n_gpu_layers=15)
    full, host_full = weight_bytes(info, Backend.CUDA, n_gpu_layers=-1)
    assert none_on_gpu == 0 and host > 0
    assert 0 < half < full < everything + host_full  # tied output: token_embd is duplicated
    est = estimate(info, 4096, backend=Backend.CUDA)
    assert est.overhead > 0 and est.total == est.weights + est.kv + est.compute + est.overhead


def test_every_split_accounts_for_every_byte_once(smollm2: Path, gemma3: Path) -> None:
    """Each layer's weights and KV are on the device or in host RAM, never both nor neither
    (but the device copy of tied embeddings' output matrix);
    the device's share grows with every layer offloaded; the host compute buffer (and the
    device's copy of one host block, with op_offload) exist only while layers stay home."""
    for path in (smollm2, gemma3):
        info = read_model_info(path)
        everything, _ = weight_bytes(info, Backend.CPU)
        full = estimate(info, 2048, 2, backend=Backend.CUDA)
        tied = full.weights + full.weights_host - everything  # the output's device copy
        cpu_kv = estimate(info, 2048, 2).kv
        previous = -1
        for k in range(info.n_layer + 2):
            est = estimate(info, 2048, 2, backend=Backend.CUDA, n_gpu_layers=k)
            assert est.n_gpu_layers == k
            assert est.kv + est.kv_host == cpu_kv
            # the output layer goes first (with tied embeddings, a copy of token_embd)
            assert est.weights + est.weights_host == everything + (tied if k else 0)
            if k <= info.n_layer:
                assert est.compute_host > 0
                staged = estimate(
                    info, 2048, 2, backend=Backend.CUDA, n_gpu_layers=k, op_offload=False
                )
                assert staged.compute < est.compute
            else:
                assert est.compute_host == 0 and est.kv_host == 0
            assert est.weights > previous
            previous = est.weights
            assert est.context_host == est.kv_host + est.compute_host + est.output
        assert estimate(info, 2048, 2, backend=Backend.CUDA, n_gpu_layers=0).kv == 0


def test_a_split_by_layer_gives_each_device_its_layers_and_a_compute_buffer(
    smollm2: Path, gemma3: Path
) -> None:
    """Split over devices at any cut, the shares' weights and KV add up to the whole model's
    on one device; the output layer's (and tied embeddings' copy) go with the last share;
    each device gets the whole compute buffer, none staged for host layers; the host keeps
    what it keeps at full offload."""
    for path in (smollm2, gemma3):
        info = read_model_info(path)
        layers = info.n_layer + 1
        whole = estimate(info, 2048, 2, backend=Backend.CUDA)
        for cut in (1, layers // 2, layers - 1):
            first, last = (
                estimate(info, 2048, 2, backend=Backend.CUDA, span=span)
                for span in (range(cut), range(cut, layers))
            )
            assert first.weights + last.weights == whole.weights
            assert first.kv + last.kv == whole.kv and first.kv > 0
            assert first.compute == last.compute == whole.compute
            for share in (first, last):
                assert (share.weights_host, share.kv_host, share.compute_host) == (
                    whole.weights_host,
                    0,
                    0,
                )
        output_only = weight_bytes(info, Backend.CUDA, span=range(info.n_layer, layers))[0]
        blocks = weight_bytes(info, Backend.CUDA, span=range(info.n_layer))[0]
        assert output_only + blocks == whole.weights and output_only > 0


@pytest.mark.parametrize("n_ctx", [0, -1, 8193, 10**9])
def test_bad_n_ctx(smollm2: Path, n_ctx: int) -> None:
    with pytest.raises(ContextSizeError) as exc:
        estimate(read_model_info(smollm2), n_ctx)
    assert exc.value.code == "BAD_N_CTX"


def test_bad_n_seq(smollm2: Path) -> None:
    with pytest.raises(ContextSizeError):
        estimate(read_model_info(smollm2), 512, 0)


def test_the_estimated_decode_speed_grows_with_every_layer_on_the_device(
    smollm2: Path, gemma3: Path
) -> None:
    """Both models tie their embeddings: with no layer on the device the input embeddings are
    the output matrix too, read at every step, so the first layer offloaded (the output
    layer) already speeds decoding up."""
    for path in (smollm2, gemma3):
        info = read_model_info(path)
        shares = [decode_speed_share(info, k) for k in range(info.n_layer + 2)]
        assert all(a < b for a, b in itertools.pairwise(shares)), shares
        assert shares[-1] == 1.0 and 0 < shares[0] < 0.1
