"""Reading GGUF metadata, and every way a model file can be wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmxd.errors import ModelFileError, UnsupportedArchitecture
from lmxd.modelfile import read_model_info


def test_smollm2_metadata(smollm2: Path) -> None:
    info = read_model_info(smollm2)
    assert (info.architecture, info.n_layer, info.n_embd, info.n_vocab) == ("llama", 30, 576, 49152)
    assert info.n_head == (9,) * 30 and info.n_head_kv == (3,) * 30
    assert (info.head_dim_k, info.n_ctx_train, info.quantization) == (64, 8192, "Q4_1")
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert not any(info.swa_layers)
    assert info.weight_bytes < info.file_size


def test_gemma3_sliding_window_layers(gemma3: Path) -> None:
    info = read_model_info(gemma3)
    assert (info.architecture, info.n_layer, info.n_swa) == ("gemma3", 18, 512)
    assert info.head_dim_k == 256 and info.n_head_kv == (1,) * 18
    # five sliding-window layers, then one global layer
    assert [il for il, swa in enumerate(info.swa_layers) if not swa] == [5, 11, 17]
    assert info.chat_template is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_model_info(tmp_path / "absent.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_model_info(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError):
        read_model_info(path)


@pytest.mark.parametrize("keep", [4, 100, 5_000, 1_000_000, 50_000_000])
def test_truncated(tmp_path: Path, smollm2: Path, keep: int) -> None:
    path = tmp_path / "cut.gguf"
    with smollm2.open("rb") as src:
        path.write_bytes(src.read(keep))
    with pytest.raises(ModelFileError) as exc:
        read_model_info(path)
    assert exc.value.code == "BAD_MODEL_FILE"


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError):
        read_model_info(tmp_path)


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitecture) as exc:
        read_model_info(path)
    assert exc.value.details["architecture"] == "mamba"
    assert exc.value.code == "UNKNOWN_ARCH"


def test_copy_reads_the_same(tmp_path: Path, smollm2: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copy(smollm2, copy)
    a, b = read_model_info(smollm2), read_model_info(copy)
    assert a.tensors == b.tensors and a.n_params == b.n_params > 100_000_000


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_corrupted_header_never_escapes_as_another_error(
    tmp_path_factory: pytest.TempPathFactory, smollm2: Path, data: st.DataObject
) -> None:
    header = bytearray(smollm2.read_bytes()[:2_000_000])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(4, 4096))  # keep the magic, hit the counts and the keys
        header[at] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    path.write_bytes(bytes(header))
    with pytest.raises(ModelFileError):  # a 2 MB prefix never holds all the tensors
        read_model_info(path)
