"""Reading a GGUF file's metadata: what the estimator and the catalog need to know of a model.

Nothing here loads weights or touches llama.cpp: the header and tensor table are read from a
memory map with the ``gguf`` package's type tables, and every way a file can be wrong (missing, not
GGUF, truncated, an architecture we cannot size) becomes a :class:`ModelFileError`.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from lmxd.errors import ModelFileError, UnsupportedArchitecture

GGUF_MAGIC = b"GGUF"

# Architectures whose attention layout we know how to size. The value is the sliding-window
# pattern llama.cpp assumes when the file gives none (0 = no sliding-window layers):
# gemma3 has five sliding-window layers then one global layer (llama.cpp models/gemma3.cpp).
SUPPORTED_ARCHITECTURES: dict[str, int] = {"llama": 0, "qwen2": 0, "qwen3": 0, "gemma3": 6}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int

    @property
    def layer(self) -> int | None:
        """The block index of ``blk.N.*`` tensors, None for the others (embeddings, output)."""
        parts = self.name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
            return int(parts[1])
        return None


@dataclass(frozen=True)
class ModelInfo:
    """The facts of one GGUF file that sizing and serving depend on."""

    path: Path
    file_size: int
    mtime_ns: int  # with ``file_size``, what tells this file from a later one at the same path
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer
    head_dim_k: int
    head_dim_v: int
    n_swa: int  # sliding-window length in tokens, 0 when the model has none
    swa_layers: tuple[bool, ...]  # per layer: True for a sliding-window layer
    quantization: str
    chat_template: str | None
    tensors: tuple[TensorInfo, ...]

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read and check a GGUF file's metadata, raising :class:`ModelFileError` on any defect.

    Kept per file while its size and modification time stay the same: walking past a 128,256
    token vocabulary takes about 80 ms of Python, and every REGISTER reads its model's file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}", path=str(path))
    stat = path.stat()
    return _read_model_info(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_model_info(path: Path, file_size: int, mtime_ns: int) -> ModelInfo:
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})",
                path=str(path),
            )
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                fields, tensors, data_start = _Header(data).read()
        except (_Truncated, struct.error, UnicodeDecodeError, ValueError, KeyError) as exc:
            raise ModelFileError(
                f"{path} is not a readable GGUF file (truncated or corrupt header: {exc})",
                path=str(path),
            ) from exc
    end = max((data_start + offset + size for _, size, offset in tensors.values()), default=0)
    if end > file_size:
        raise ModelFileError(
            f"{path} is truncated: its tensors end at byte {end} but the file has {file_size}",
            path=str(path),
            expected_bytes=end,
            file_bytes=file_size,
        )
    infos = tuple(
        TensorInfo(name, type_name, n_elements, size)
        for name, ((type_name, n_elements), size, _) in tensors.items()
    )
    return _model_info(path, file_size, mtime_ns, _Fields(fields), infos)


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class _LongArray:
    """An array too long to be metadata we read (the tokenizer's), kept by its length only."""

    length: int

    def __len__(self) -> int:
        return self.length


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.FLOAT64: "<d",
    gguf.GGUFValueType.BOOL: "<?",
}
_LONG_ARRAY = 4096  # arrays longer than this are vocabularies, not hyper-parameters


class _Header:
    """A GGUF header (v2/v3, little-endian) read straight from a memory map.

    ``gguf.GGUFReader`` turns every vocabulary string into a numpy array: 8 s for Gemma 3's
    262,144 tokens. We need the hyper-parameters and the tensor table, so long arrays are
    stepped over and kept by length; the layout and type sizes are the gguf package's.
    """

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 4  # after the magic

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise _Truncated(f"header ends at byte {len(self.data)}")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise _Truncated(f"a string of {n} bytes runs past the end of the file")
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos]).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if count <= _LONG_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype == gguf.GGUFValueType.STRING:
                for _ in range(count):
                    length = self.take("<Q")
                    self.pos += length
            else:
                self.pos += count * struct.calcsize(_SCALARS[gguf.GGUFValueType(etype)])
            return _LongArray(count)
        return self.take(_SCALARS[gguf.GGUFValueType(vtype)])

    def read(self) -> tuple[dict[str, Any], dict[str, tuple[tuple[str, int], int, int]], int]:
        version = self.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self.take("<Q"), self.take("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ValueError(f"implausible counts: {n_tensors} tensors, {n_kv} keys")
        fields = {}
        for _ in range(n_kv):
            key = self.string()
            fields[key] = self.value(self.take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.take("<Q") for _ in range(self.take("<I"))]
            qtype = gguf.GGMLQuantizationType(self.take("<I"))
            offset = self.take("<Q")
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n_elements = math.prod(dims)
            tensors[name] = ((qtype.name, n_elements), n_elements * size // block, offset)
        alignment = int(fields.get("general.alignment", 32))
        return fields, tensors, (self.pos + alignment - 1) // alignment * alignment


class _Fields:
    """Typed access to a header's key/value fields."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def get(self, key: str) -> Any:
        return self._fields.get(key)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelFileError(f"GGUF metadata lacks the key {key!r}", key=key)
        return value


def _per_layer(value: Any, n_layer: int, key: str) -> tuple[int, ...]:
    """Head counts are a scalar, or an array with one entry per layer (e.g. OpenELM)."""
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelFileError(f"{key} has {len(value)} entries for {n_layer} layers", key=key)
        return tuple(int(v) for v in value)
    return (int(value),) * n_layer


def _swa_layers(fields: _Fields, arch: str, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    if n_swa <= 0:
        return (False,) * n_layer
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return tuple(bool(p) for p in pattern[:n_layer])
    n_pattern = int(pattern) if pattern is not None else SUPPORTED_ARCHITECTURES[arch]
    # llama.cpp llama_hparams::set_swa_pattern: every n_pattern-th layer is global.
    return tuple(n_pattern == 0 or (il % n_pattern < n_pattern - 1) for il in range(n_layer))


def _model_info(
    path: Path, file_size: int, mtime_ns: int, fields: _Fields, tensors: tuple[TensorInfo, ...]
) -> ModelInfo:
    arch = str(fields.require("general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})",
            path=str(path),
            architecture=arch,
        )
    n_layer = int(fields.require(f"{arch}.block_count"))
    n_embd = int(fields.require(f"{arch}.embedding_length"))
    n_head = _per_layer(fields.require(f"{arch}.attention.head_count"), n_layer, "head_count")
    n_head_kv_raw = fields.get(f"{arch}.attention.head_count_kv")
    n_head_kv = n_head if n_head_kv_raw is None else _per_layer(n_head_kv_raw, n_layer, "kv")
    head_dim_k = int(fields.get(f"{arch}.attention.key_length") or n_embd // max(n_head))
    head_dim_v = int(fields.get(f"{arch}.attention.value_length") or n_embd // max(n_head))
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = int(fields.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
    n_swa = int(fields.get(f"{arch}.attention.sliding_window") or 0)
    file_type = fields.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quantization = "unknown"
    ff = fields.get(f"{arch}.feed_forward_length")
    return ModelInfo(
        path=path,
        file_size=file_size,
        mtime_ns=mtime_ns,
        architecture=arch,
        name=str(fields.get("general.name") or path.stem),
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=int(max(ff) if isinstance(ff, list) else ff or 0),
        n_vocab=n_vocab,
        n_ctx_train=int(fields.require(f"{arch}.context_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_swa=n_swa,
        swa_layers=_swa_layers(fields, arch, n_layer, n_swa),
        quantization=quantization,
        chat_template=fields.get("tokenizer.chat_template"),
        tensors=tensors,
    )
