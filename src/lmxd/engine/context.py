"""One llama.cpp context of a model: several sequences over one unified KV pool.

Each resident agent of a model owns one sequence id of its model's context. ``decode`` runs one
``llama_decode`` step over a batch that may hold tokens of several sequences (one entry per
sequence), which is how agents of one model share a step. A sequence's state can be copied out
to a caller-owned buffer and back into any free sequence, and its cells freed: that is parking.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import llama_cpp
import numpy as np

from lmxd.engine.model import Model
from lmxd.errors import EngineError, InvalidInput, KvCacheFull

_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "bf16": 30}


class WritableBuffer(Protocol):
    """Anything ctypes can take the address of: bytearray, numpy array, ctypes array."""

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int  # cells in the KV pool, shared by all sequences
    n_seq_max: int = 1
    n_batch: int = 512  # most tokens one decode step may carry
    n_ubatch: int = 512  # tokens per compute pass; sizes the compute buffer
    type_k: str = "f16"
    type_v: str = "f16"
    n_threads: int = 0  # 0 = one per CPU core

    def __post_init__(self) -> None:
        if self.n_seq_max < 1 or self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidInput("n_seq_max, n_batch and n_ubatch must be >= 1")
        if self.type_k not in _KV_TYPES or self.type_v not in _KV_TYPES:
            raise InvalidInput(f"KV cache types must be among {sorted(_KV_TYPES)}")


@dataclass(frozen=True)
class SeqBatch:
    """New tokens of one sequence for a decode step; logits are kept for the last one."""

    seq_id: int
    tokens: Sequence[int]
    want_logits: bool = True


class Context:
    """A context over ``model``. Engine thread only; call :meth:`free` when done."""

    def __init__(self, model: Model, params: ContextParams) -> None:
        model.engine.check_thread()
        self.model = model
        self.params = params
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = params.n_ctx
        cp.n_seq_max = params.n_seq_max
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_ubatch
        # Agents need the logits of one token per sequence per step; by default llama.cpp
        # sizes its output and compute buffers for n_batch logit rows (96 MiB for SmolLM2 at
        # n_batch 512), so we ask for one row per sequence.
        cp.n_outputs_max = params.n_seq_max
        cp.kv_unified = True  # one pool of cells shared by all sequences
        cp.swa_full = False  # sliding-window layers keep only their window
        cp.type_k = _KV_TYPES[params.type_k]
        cp.type_v = _KV_TYPES[params.type_v]
        threads = params.n_threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = threads
        ptr = llama_cpp.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise EngineError(
                f"llama.cpp could not create a context of n_ctx={params.n_ctx} "
                f"for {model.path.name} (out of memory?)",
                n_ctx=params.n_ctx,
            )
        self.ptr = ptr
        self.n_ctx = int(llama_cpp.llama_n_ctx(ptr))
        # llama.cpp caps n_batch at the n_ctx it was asked for (before padding it to 256) and
        # aborts the process on a larger batch: every check below uses its own figure.
        self.n_batch = int(llama_cpp.llama_n_batch(ptr))
        self._memory = llama_cpp.llama_get_memory(ptr)
        self.seq_len = [0] * params.n_seq_max  # tokens held by each sequence
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        n = self.n_batch
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(n,))
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(n,))
        self._seq_ids = [self._batch.seq_id[i] for i in range(n)]

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, entries: Sequence[SeqBatch]) -> dict[int, int]:
        """One llama_decode step. Returns, per sequence that wanted logits, the batch index of
        its last token: the index llama.cpp's samplers and ``llama_get_logits_ith`` take."""
        self.model.engine.check_thread()
        total = sum(len(e.tokens) for e in entries)
        if total == 0:
            return {}
        if total > self.n_batch:
            raise InvalidInput(f"a step carries at most {self.n_batch} tokens, got {total}")
        seqs = [e.seq_id for e in entries]
        if len(set(seqs)) != len(seqs) or not all(0 <= s < self.params.n_seq_max for s in seqs):
            raise InvalidInput(f"one entry per sequence, ids below {self.params.n_seq_max}")
        outputs: dict[int, int] = {}
        i = 0
        for entry in entries:
            n = len(entry.tokens)
            if n == 0:
                continue
            start = self.seq_len[entry.seq_id]
            self._tokens[i : i + n] = entry.tokens
            self._pos[i : i + n] = np.arange(start, start + n, dtype=np.int32)
            self._n_seq_id[i : i + n] = 1
            self._logits[i : i + n] = 0
            for j in range(i, i + n):
                self._seq_ids[j][0] = entry.seq_id
            if entry.want_logits:
                self._logits[i + n - 1] = 1
                outputs[entry.seq_id] = i + n - 1
            i += n
        self._batch.n_tokens = total
        ret = llama_cpp.llama_decode(self.ptr, self._batch)
        if ret != 0:
            self._resync(seqs)
            if ret == 1:
                raise KvCacheFull(f"no room in the KV pool ({self.n_ctx} cells) for {total} tokens")
            raise EngineError(f"llama_decode failed with {ret}", ret=ret)
        for entry in entries:
            self.seq_len[entry.seq_id] += len(entry.tokens)
        return outputs

    def _resync(self, seqs: Sequence[int]) -> None:
        """After a failed step, take each sequence's length from llama.cpp's own memory."""
        for s in seqs:
            self.seq_len[s] = int(llama_cpp.llama_memory_seq_pos_max(self._memory, s)) + 1

    # -- sequence state: parking and restoring -----------------------------------------------

    def seq_state_size(self, seq_id: int) -> int:
        self.model.engine.check_thread()
        return int(llama_cpp.llama_state_seq_get_size(self.ptr, seq_id))

    def save_seq(self, seq_id: int, into: WritableBuffer) -> int:
        """Copy sequence ``seq_id``'s state into ``into``; returns the bytes written."""
        self.model.engine.check_thread()
        size = self.seq_state_size(seq_id)
        if len(into) < size:
            raise InvalidInput(f"state of sequence {seq_id} needs {size} bytes, got {len(into)}")
        ptr = (ctypes.c_uint8 * len(into)).from_buffer(into)  # type: ignore[arg-type]
        written = int(llama_cpp.llama_state_seq_get_data(self.ptr, ptr, size, seq_id))
        if written != size:
            raise EngineError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return written

    def load_seq(self, seq_id: int, data: WritableBuffer, nbytes: int) -> None:
        """Restore a saved state (``nbytes`` of ``data``) into the empty sequence ``seq_id``."""
        self.model.engine.check_thread()
        if self.seq_len[seq_id] != 0:
            raise EngineError(f"sequence {seq_id} is not empty")
        ptr = (ctypes.c_uint8 * len(data)).from_buffer(data)  # type: ignore[arg-type]
        read = int(llama_cpp.llama_state_seq_set_data(self.ptr, ptr, nbytes, seq_id))
        if read != nbytes:
            self.clear_seq(seq_id)
            raise EngineError(
                f"llama_state_seq_set_data read {read} of {nbytes} bytes (no room, or bad state)"
            )
        self._resync([seq_id])

    def truncate_seq(self, seq_id: int, keep: int) -> None:
        """Keep the first ``keep`` tokens of a sequence and free the rest.

        A sliding-window cache cannot always drop a tail (the window before it is gone); the
        sequence is then cleared whole, and the caller prefills it again from the start.
        """
        self.model.engine.check_thread()
        if keep >= self.seq_len[seq_id]:
            return
        removed = llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep, -1)
        # A sliding-window cache keeps only the last n_swa positions: if the window the kept
        # tokens need is gone already, nothing short of prefilling again brings it back.
        n_swa = self.model.info.n_swa
        first = int(llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id))  # -1: no cells
        lost = n_swa > 0 and keep > 0 and (first < 0 or first > max(0, keep - n_swa))
        if removed and not lost:
            self.seq_len[seq_id] = keep
        else:
            self.clear_seq(seq_id)

    def clear_seq(self, seq_id: int) -> None:
        """Free every cell of sequence ``seq_id``."""
        self.model.engine.check_thread()
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1):
            raise EngineError(f"llama_memory_seq_rm refused sequence {seq_id}")
        self.seq_len[seq_id] = 0

    def free(self) -> None:
        self.model.engine.check_thread()
        if self.ptr:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
