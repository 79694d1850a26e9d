"""One llama.cpp context of a model: several sequences, each with its own KV stream.

Each resident agent of a model owns one sequence id of its model's context. :meth:`decode`
runs one ``llama_decode`` over plain arrays (sequence ids, tokens, positions, which rows want
a token back) that may hold tokens of several sequences, which is how agents of one model
share a step; :class:`lmxd.engine.stepper.Stepper` builds those arrays and samples.

Every sequence has a KV stream of its own (``kv_unified=false``): in one shared pool, where an
agent's cells land among other agents' cells changed the order in which attention sums them,
and so its greedy text depended on who else was resident. A sequence's state can be copied out
to a caller-owned buffer and back into any free sequence, and its cells freed: that is parking.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import llama_cpp
import numpy as np
import numpy.typing as npt

from lmxd.engine.model import Model
from lmxd.engine.sampling import SamplingParams, device_chain
from lmxd.engine.threads import ThreadTuner
from lmxd.errors import EngineError, InvalidInput, KvCacheFull

_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "bf16": 30}
KV_PAD = 256  # llama.cpp pads each sequence's stream to a multiple of this


class WritableBuffer(Protocol):
    """Anything ctypes can take the address of: bytearray, numpy array, ctypes array."""

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int  # cells per sequence (padded to KV_PAD by llama.cpp)
    n_seq_max: int = 1
    n_batch: int = 512  # most tokens one decode step may carry
    n_ubatch: int = 512  # tokens per compute pass; sizes the compute buffer
    type_k: str = "f16"
    type_v: str = "f16"
    n_threads: int = 0  # 0 = up to one per CPU core, tuned as it runs (CPU builds)
    # Layers left in host RAM: their matrix products over batches of 32 tokens and more run
    # on the GPU, their weights copied over as they go (llama.cpp's op_offload).
    op_offload: bool = True

    def __post_init__(self) -> None:
        if self.n_seq_max < 1 or self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidInput("n_seq_max, n_batch and n_ubatch must be >= 1")
        if self.type_k not in _KV_TYPES or self.type_v not in _KV_TYPES:
            raise InvalidInput(f"KV cache types must be among {sorted(_KV_TYPES)}")


@dataclass(frozen=True)
class StateLayout:
    """How llama.cpp laid out a saved sequence, so that it can be restored into a context with
    another number of sequences.

    After an 8-byte header (a magic number and the sequence id), each KV cache (two for a
    sliding-window model) writes its stream count, then per stream a cell count and, when not
    zero, the cells. Only the sequence's own stream holds cells; the restore puts them into
    the stream of whichever sequence it targets, but refuses a stream count other than its
    own, so the stream headers are rewritten when the counts differ.
    """

    n_stream: int
    stream: int  # the stream that holds the cells
    sections: tuple[int, ...]  # bytes of each KV cache's part, in order, after the header

    HEADER = 8

    @property
    def nbytes(self) -> int:
        return self.HEADER + sum(self.sections)

    def restreamed(self, data: WritableBuffer, n_stream: int) -> bytearray:
        """The same cells, laid out for a context of ``n_stream`` streams."""
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        out = bytearray(view[: self.HEADER])
        start = self.HEADER
        before, after = 4 * self.stream, 4 * (self.n_stream - 1 - self.stream)
        for size in self.sections:
            cells = view[start + 4 + before : start + size - after]
            out += struct.pack("<I", n_stream) + cells + bytes(4 * (n_stream - 1))
            start += size
        return out


class _Batch:
    """A ``llama_batch`` over numpy arrays we own, so a step is filled by slice assignment.

    llama.cpp reads one pointer per token for its sequence ids; each points at that token's
    entry of :attr:`seq`, set once here, so the per-step work is the same slices as the rest.
    """

    def __init__(self, n: int) -> None:
        self.token = np.zeros(n, np.int32)
        self.pos = np.zeros(n, np.int32)
        self.n_seq_id = np.ones(n, np.int32)
        self.seq = np.zeros(n, np.int32)
        self.logits = np.zeros(n, np.int8)
        self._seq_ptrs = (ctypes.c_void_p * n)(*(self.seq.ctypes.data + 4 * i for i in range(n)))
        i32 = ctypes.POINTER(ctypes.c_int32)
        self.struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(i32),
            embd=None,
            pos=self.pos.ctypes.data_as(i32),
            n_seq_id=self.n_seq_id.ctypes.data_as(i32),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


class Context:
    """A context over ``model``. Engine thread only; call :meth:`free` when done."""

    def __init__(self, model: Model, params: ContextParams) -> None:
        model.engine.check_thread()
        self.model = model
        self.params = params
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = -(-params.n_ctx // KV_PAD) * KV_PAD * params.n_seq_max
        cp.n_seq_max = params.n_seq_max
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_ubatch
        # Agents need the logits of one token per sequence per step; by default llama.cpp
        # sizes its output and compute buffers for n_batch logit rows (96 MiB for SmolLM2 at
        # n_batch 512), so we ask for one row per sequence.
        cp.n_outputs_max = params.n_seq_max
        # One output per sequence per step, said so: with more allowed, llama.cpp's device
        # draw turns "transactional" and replays one random number until a token is
        # accepted, so every token of a reply would come from the same quantile.
        cp.n_outputs_max_per_seq = 1
        cp.kv_unified = False  # one KV stream per sequence: see the module's docstring
        cp.swa_full = False  # sliding-window layers keep only their window
        cp.op_offload = params.op_offload
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
        self.n_ctx = int(llama_cpp.llama_n_ctx(ptr))  # all sequences together
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ptr))  # one sequence's stream
        # llama.cpp caps n_batch at the n_ctx it was asked for (before padding it to 256) and
        # aborts the process on a larger batch: every check below uses its own figure.
        self.n_batch = int(llama_cpp.llama_n_batch(ptr))
        self._memory = llama_cpp.llama_get_memory(ptr)
        self.seq_len = [0] * params.n_seq_max  # tokens held by each sequence
        self._batch = _Batch(self.n_batch)
        # On a CPU build with no thread count given, how many threads decode is measured as
        # it runs (engine/threads.py); a count given is kept as it is.
        self._tuner: ThreadTuner | None = None
        if params.n_threads == 0 and not model.engine.gpu_offload:
            self._tuner = model.engine.thread_tuner
        self.n_threads = threads
        self._logits_address: int | None = None
        self._logits_view = np.zeros((0, 0), np.float32)
        # Device sampler chains attached to sequences, with what they were built from.
        self._chains: dict[int, tuple[tuple[float, int, float, float, int], object]] = {}

    # -- decoding ----------------------------------------------------------------------------

    def decode(
        self,
        seqs: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
        want: Sequence[int],
    ) -> None:
        """One llama_decode over ``len(tokens)`` rows. Rows of one sequence are contiguous and
        continue it (their positions start at its length); ``want`` marks the rows whose
        logits (or device-sampled token) are read afterwards, by row index.

        Plain lists are the fast case: a decode step of a few sequences is a few dozen values,
        and numpy's per-call cost would be most of the host's work (measured 0.16 ms a step
        with numpy arrays, on the 2-core machine).
        """
        self.model.engine.check_thread()
        n = len(tokens)
        if n == 0:
            return
        if n > self.n_batch:
            raise InvalidInput(f"a step carries at most {self.n_batch} tokens, got {n}")
        if min(seqs) < 0 or max(seqs) >= self.params.n_seq_max:
            raise InvalidInput(f"sequence ids must be below {self.params.n_seq_max}")
        b = self._batch
        b.token[:n], b.pos[:n], b.seq[:n], b.logits[:n] = tokens, positions, seqs, want
        b.struct.n_tokens = n
        tuner = self._tuner
        if tuner is None:
            ret = llama_cpp.llama_decode(self.ptr, b.struct)
        else:
            threads = tuner.choose()
            if threads != self.n_threads:
                llama_cpp.llama_set_n_threads(self.ptr, threads, threads)
                self.n_threads = threads
            wall, cpu = time.perf_counter(), time.process_time()
            ret = llama_cpp.llama_decode(self.ptr, b.struct)
            tuner.record(threads, time.perf_counter() - wall, time.process_time() - cpu)
        if ret != 0:
            self._resync(sorted(set(seqs)))
            if ret == 1:
                raise KvCacheFull(f"no room in a KV stream ({self.n_ctx_seq} cells) for {n} tokens")
            raise EngineError(f"llama_decode failed with {ret}", ret=ret)
        seq_len = self.seq_len
        for s, pos in zip(seqs, positions, strict=True):  # runs rise: the last row wins
            seq_len[s] = pos + 1

    def logits(self, n_outputs: int) -> npt.NDArray[np.float32]:
        """The logits rows of the last decode's ``n_outputs`` outputs, in batch order: a view
        into llama.cpp's buffer, valid until the next decode."""
        rows = llama_cpp.llama_get_logits(self.ptr)
        address = ctypes.cast(rows, ctypes.c_void_p).value
        if address != self._logits_address:  # llama.cpp reallocated its output buffer
            size = self.params.n_seq_max * self.model.n_vocab
            view = np.ctypeslib.as_array(rows, shape=(size,))
            self._logits_view = view.reshape(self.params.n_seq_max, self.model.n_vocab)
            self._logits_address = address
        return self._logits_view[:n_outputs]

    def sampled_token(self, row: int) -> int:
        """The token a device chain picked for ``row`` of the last decode."""
        token = int(llama_cpp.llama_get_sampled_token_ith(self.ptr, row))
        if token < 0:  # LLAMA_TOKEN_NULL: part of the chain did not run on the device
            raise EngineError(f"llama.cpp's device sampler gave no token for row {row}")
        return token

    def use_device_chain(self, seq: int, params: SamplingParams) -> None:
        """Sample ``seq`` on the device from now on. Attaching a chain makes llama.cpp
        rebuild its graph at the next decode (4 ms for SmolLM2 on 2 cores), so a chain stays
        attached from one job to the next while the settings stay the same."""
        key = params.device_key
        held = self._chains.get(seq)
        if held is not None and held[0] == key:
            llama_cpp.llama_sampler_reset(held[1])  # a seeded draw starts over
            return
        self.use_host_sampling(seq)
        chain = device_chain(params)
        if not llama_cpp.llama_set_sampler(self.ptr, seq, chain):
            llama_cpp.llama_sampler_free(chain)
            raise EngineError(f"llama.cpp refused a device sampler for sequence {seq}")
        self._chains[seq] = (key, chain)

    def use_host_sampling(self, seq: int) -> None:
        """Detach ``seq``'s device chain, if any: its logits come back to the host."""
        held = self._chains.pop(seq, None)
        if held is not None:
            llama_cpp.llama_set_sampler(self.ptr, seq, None)
            llama_cpp.llama_sampler_free(held[1])

    def _resync(self, seqs: list[int]) -> None:
        """After a failed step, take each sequence's length from llama.cpp's own memory."""
        for s in seqs:
            self.seq_len[s] = int(llama_cpp.llama_memory_seq_pos_max(self._memory, s)) + 1

    # -- sequence state: parking and restoring -----------------------------------------------

    def seq_state_size(self, seq_id: int) -> int:
        self.model.engine.check_thread()
        return int(llama_cpp.llama_state_seq_get_size(self.ptr, seq_id))

    def save_seq(self, seq_id: int, into: WritableBuffer, size: int = 0) -> StateLayout:
        """Copy sequence ``seq_id``'s state into ``into``; returns how it is laid out.
        ``size``: its :meth:`seq_state_size`, when the caller has it already (each is a walk
        over the sequence's cells)."""
        self.model.engine.check_thread()
        size = size or self.seq_state_size(seq_id)
        if len(into) < size:
            raise InvalidInput(f"state of sequence {seq_id} needs {size} bytes, got {len(into)}")
        # A sliding-window model's "partial" state is the header and its window cache alone,
        # which comes last; any other model's is the whole state (and asking walks the cells).
        partial = size
        if any(self.model.info.swa_layers):
            partial = int(
                llama_cpp.llama_state_seq_get_size_ext(
                    self.ptr, seq_id, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
                )
            )
        ptr = (ctypes.c_uint8 * len(into)).from_buffer(into)  # type: ignore[arg-type]
        written = int(llama_cpp.llama_state_seq_get_data(self.ptr, ptr, size, seq_id))
        if written != size:
            raise EngineError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        header = StateLayout.HEADER
        sections = (size - partial, partial - header) if partial < size else (size - header,)
        return StateLayout(self.params.n_seq_max, seq_id, sections)

    def load_seq(self, seq_id: int, data: WritableBuffer, layout: StateLayout) -> None:
        """Restore a saved state (laid out as ``layout`` in ``data``) into the empty sequence
        ``seq_id``. From a context with as many sequences as this one it is read in place;
        otherwise from a copy with the headers rewritten."""
        self.model.engine.check_thread()
        if self.seq_len[seq_id] != 0:
            raise EngineError(f"sequence {seq_id} is not empty")
        source, nbytes = data, layout.nbytes
        if layout.n_stream != self.params.n_seq_max:
            source = layout.restreamed(data, self.params.n_seq_max)
            nbytes = len(source)
        ptr = (ctypes.c_uint8 * len(source)).from_buffer(source)  # type: ignore[arg-type]
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
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
            for _, chain in self._chains.values():  # they must outlive the context
                llama_cpp.llama_sampler_free(chain)
            self._chains.clear()
