"""A GGUF model loaded into llama.cpp: weights, vocabulary, the chat template's source.

A model is loaded once per (file, n_gpu_layers, device) and shared by every context and agent
that uses it; :class:`ModelRegistry` counts the references and frees the weights at zero. The
file is checked by :func:`lmxd.modelfile.read_model_info` first, so llama.cpp never sees a file
that is missing, truncated or of an unknown architecture.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from lmxd.engine.runtime import Engine
from lmxd.errors import EngineError, InvalidInput
from lmxd.memory.host import give_back_heap
from lmxd.modelfile import ModelInfo, read_model_info

# A model split over several devices by layer: (device, layers on it) in layer order, lower
# layers on lower device indices (llama.cpp's order); empty for a model on one device.
Split = tuple[tuple[int, int], ...]

_GPU = 1  # ggml_backend_dev_type's GGML_BACKEND_DEVICE_TYPE_GPU


class Model:
    """One loaded model. Create through :meth:`ModelRegistry.acquire`; use on the engine thread."""

    def __init__(
        self, engine: Engine, info: ModelInfo, n_gpu_layers: int, device: int, split: Split = ()
    ) -> None:
        engine.check_thread()
        self.engine = engine
        self.info = info
        self.n_gpu_layers = n_gpu_layers
        self.device = device
        self.split = split
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self._keep: tuple[object, ...] = ()  # what llama.cpp's parameters point to
        if split:
            self._keep = split_params(params, split, _gpu_devices())
        else:
            # Weights, KV and compute all on one device: llama.cpp would otherwise split the
            # layers over every GPU it sees, and no ledger would hold what its device holds.
            params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
            params.main_gpu = device
        # Weight repacking (AMX/AVX "extra buffer types") would keep a second, CPU-specific
        # copy of most weights beside the mapped file, nearly doubling host bytes in a way no
        # GGUF header predicts. GPU layers never use it; CPU layers go without.
        params.use_extra_bufts = False
        ptr = llama_cpp.llama_model_load_from_file(str(info.path).encode(), params)
        if not ptr:
            raise EngineError(f"llama.cpp could not load {info.path}", path=str(info.path))
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        template = llama_cpp.llama_model_chat_template(ptr, None)
        self.chat_template: str | None = template.decode("utf-8", "replace") if template else None
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self.vocab))
        self.refcount = 0
        self._pieces: list[bytes] | None = None
        self._eog: frozenset[int] | None = None

    @property
    def pieces(self) -> list[bytes]:
        """Every token's bytes, by token id, so that a decode step only indexes a list."""
        self.build_tables()
        assert self._pieces is not None
        return self._pieces

    @property
    def end_of_generation(self) -> frozenset[int]:
        """The tokens that end a reply (EOS, EOT and the like)."""
        self.build_tables()
        assert self._eog is not None
        return self._eog

    def build_tables(self) -> None:
        """Build :attr:`pieces` and :attr:`end_of_generation` if not yet built: two llama.cpp
        calls per token, about 0.46 s for a 262,144-token vocabulary (2-core machine)."""
        if self._pieces is None:
            self._pieces = [self.token_bytes(t) for t in range(self.n_vocab)]
        if self._eog is None:
            self._eog = frozenset(t for t in range(self.n_vocab) if self.is_end_of_generation(t))

    @property
    def path(self) -> Path:
        return self.info.path

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Text to tokens; ``add_special`` adds BOS where the model wants it."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (a piece may end inside a UTF-8 character)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def check_grammar(self, grammar: str) -> None:
        """InvalidInput unless llama.cpp's grammar parser takes ``grammar`` (GBNF, root rule
        ``root``) for this vocabulary."""
        self.engine.check_thread()
        if not self.ptr:
            raise EngineError(f"{self.path.name} was unloaded")
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            raise InvalidInput("llama.cpp's grammar parser refused the grammar")
        llama_cpp.llama_sampler_free(sampler)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def free(self) -> None:
        self.engine.check_thread()
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _gpu_devices() -> list[int]:
    """ggml's GPU devices (their handles), in the order llama.cpp numbers them."""
    lib = llama_cpp.llama_cpp._lib
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    everything = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    return [dev for dev in everything if lib.ggml_backend_dev_type(dev) == _GPU]


def split_params(
    params: llama_cpp.llama_model_params, split: Split, gpus: list[int]
) -> tuple[object, ...]:
    """Set ``params`` for a model split by layer over the devices of ``split`` (indices into
    ``gpus``), each given exactly its layers; returns the arrays llama.cpp points to, to be
    kept alive with the model."""
    # Only the split's devices: llama.cpp would otherwise set up a backend on every GPU,
    # those left out by --devices too. CUDA numbers them as NVML does (lmxd.daemon).
    devices = (ctypes.c_void_p * (len(split) + 1))(*[gpus[index] for index, _ in split], None)
    # Layer il of the n_layer + 1 goes to the first device whose cumulative share of them
    # is above il / (n_layer + 1) (llama-model.cpp): shares in layers make the cut exact.
    shares = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*[float(n) for _, n in split])
    # A pattern no tensor name matches: with any override, llama.cpp leaves pipeline
    # parallelism off. It would keep four copies of every graph input on each device, memory
    # the estimator does not count, for a gain only on prompts of several micro-batches.
    overrides = (_Override * 2)(_Override(b"^$", None), _Override(None, None))
    params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
    # The bindings declare these fields void * (their type hints say arrays): addresses.
    params.devices = ctypes.addressof(devices)  # type: ignore[assignment]
    params.tensor_split = shares
    params.tensor_buft_overrides = ctypes.addressof(overrides)  # type: ignore[assignment]
    return devices, shares, overrides


class ModelRegistry:
    """Loads each (file, n_gpu_layers, device, split) once and counts who holds it. Engine
    threads only; the lanes of several devices may load and free at once, one at a time here."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._models: dict[tuple[Path, int, int, Split], Model] = {}
        self._lock = threading.Lock()

    def acquire(
        self, path: Path, n_gpu_layers: int = -1, device: int = 0, split: Split = ()
    ) -> Model:
        self.engine.check_thread()
        info = read_model_info(path)
        key = (info.path.resolve(), n_gpu_layers, device, split)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = Model(self.engine, info, n_gpu_layers, device, split)
            model.refcount += 1
            return model

    def release(self, model: Model) -> None:
        """Drop one reference; the weights are freed when the last one goes."""
        self.engine.check_thread()
        with self._lock:
            model.refcount -= 1
            if model.refcount <= 0:
                key = (model.path.resolve(), model.n_gpu_layers, model.device, model.split)
                self._models.pop(key, None)
                model.free()
                if not self._models:
                    give_back_heap()  # llama.cpp's host buffers, freed, leave the process

    def loaded(self) -> list[Model]:
        with self._lock:
            return list(self._models.values())
