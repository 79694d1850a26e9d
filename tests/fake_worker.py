"""A fake engine behind the scheduler's :class:`lmxd.engine.worker.Worker` protocol.

For the scheduler's unit tests only: no llama.cpp, no model weights. A model file is still
read for its metadata (the ledger sizes contexts from it). Every call is logged, so a test can
assert what the scheduler asked for and in which order; a step takes ``step_s`` of wall time on
the event loop, so that other requests can arrive while a slice runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmxd.engine.context import ContextParams, StateLayout
from lmxd.engine.model import Split
from lmxd.engine.stepper import Emit, Reply, ReplySpec, SeqReport, SliceControl
from lmxd.engine.worker import ContextHandle, ModelHandle
from lmxd.errors import EngineError, InvalidInput
from lmxd.kvstore import KvStore, ParkedState
from lmxd.modelfile import ModelInfo, read_model_info
from lmxd.results import Piece, StopReason

STATE_BYTES_PER_TOKEN = 1000
REFUSED = "refused"  # a grammar begin() refuses, as llama.cpp refuses a bad one


@dataclass
class FakeModel:
    info: ModelInfo
    chat_template: str | None = None
    bos_text: str = ""
    eos_text: str = ""
    device: int = 0
    n_gpu_layers: int = -1


@dataclass
class _Reply:
    pending: list[int]
    spec: ReplySpec
    generated: int = 0


@dataclass
class FakeContext:
    name: str
    n_ctx_seq: int
    n_seq: int
    device: int
    seq_len: list[int] = field(default_factory=list)
    replies: dict[int, _Reply] = field(default_factory=dict)

    @property
    def n_ctx(self) -> int:
        return self.n_ctx_seq * self.n_seq


class FakeWorker:
    """Each generated token is one character, ``x``; a reply ends at its max_tokens."""

    def __init__(self, step_s: float = 0.001) -> None:
        self.step_s = step_s
        self.log: list[tuple[str, ...]] = []
        self.fail_saves = False  # every copy out raises, as a failed one would
        self.fail_restores = False  # every copy in raises, as llama.cpp refusing a state would
        self.most_layers: int | None = None  # loads with more layers fail, as out of memory
        self.step_s_of: dict[str, float] = {}  # a step's time, by model file stem
        self.splits: dict[str, Split] = {}  # each model's split over devices, as last loaded

    async def load(
        self, path: Path, device: int, n_gpu_layers: int, split: Split = ()
    ) -> ModelHandle:
        self.log.append(("load", path.stem))
        self.splits[path.stem] = split
        if self.most_layers is not None and n_gpu_layers > self.most_layers:
            raise EngineError(f"the fake engine loads at most {self.most_layers} layers")
        return FakeModel(read_model_info(path), device=device, n_gpu_layers=n_gpu_layers)

    async def unload(self, model: ModelHandle) -> None:
        self.log.append(("unload", model.info.path.stem))

    async def tokenize(self, model: ModelHandle, text: str, add_special: bool) -> list[int]:
        return [1 + ord(c) % 100 for c in text]

    async def check_grammar(self, model: ModelHandle, grammar: str) -> None:
        return None

    async def open_context(self, model: ModelHandle, params: ContextParams) -> ContextHandle:
        name = model.info.path.stem
        self.log.append(("open", name, str(params.n_seq_max), str(params.n_ctx)))
        device = model.device  # type: ignore[attr-defined]
        return FakeContext(name, params.n_ctx, params.n_seq_max, device, [0] * params.n_seq_max)

    async def close_context(self, ctx: ContextHandle) -> None:
        self.log.append(("close", _fake(ctx).name))

    async def begin(
        self, ctx: ContextHandle, seq: int, tokens: list[int], keep: int, spec: ReplySpec
    ) -> int:
        fake = _fake(ctx)
        kept = min(keep, fake.seq_len[seq])
        fake.seq_len[seq] = kept
        if spec.grammar == REFUSED:
            raise InvalidInput("the fake engine refuses this grammar")
        fake.replies[seq] = _Reply(tokens[kept:], spec)
        return kept

    async def run(
        self,
        ctx: ContextHandle,
        seqs: Sequence[int],
        max_steps: int,
        control: SliceControl,
        emit: Emit,
    ) -> dict[int, SeqReport]:
        fake = _fake(ctx)
        self.log.append(("run", fake.name, *(str(s) for s in seqs)))
        reports = {seq: SeqReport() for seq in seqs}
        for step in range(max_steps):
            if step and control.stop:
                break
            live = [s for s in seqs if s in fake.replies and s not in control.paused]
            if not live:
                break
            await asyncio.sleep(self.step_s_of.get(fake.name, self.step_s))
            pieces, ended = [], False
            for seq in live:
                reply = fake.replies[seq]
                fake.seq_len[seq] += len(reply.pending) or 1
                reply.pending = []
                reply.generated += 1
                reports[seq].generated.append(120)  # "x"
                reports[seq].decode_s += self.step_s
                if reply.spec.stream:
                    pieces.append((seq, Piece("x")))
                if reply.generated >= reply.spec.max_tokens:
                    reports[seq].reply = self._reply(fake, seq, StopReason.LENGTH)
                    ended = True
            if pieces:
                emit(pieces)
            if ended:
                break
        for seq in seqs:
            reports[seq].kv_tokens = fake.seq_len[seq]
        self.log.append(("ran", fake.name))
        return reports

    def _reply(self, fake: FakeContext, seq: int, reason: StopReason) -> Reply:
        n = fake.replies.pop(seq).generated
        return Reply("x" * n, "x" * n, n, [], reason)

    async def cancel(self, ctx: ContextHandle, seq: int) -> Reply | None:
        fake = _fake(ctx)
        return self._reply(fake, seq, StopReason.CANCELLED) if seq in fake.replies else None

    def drop(self, ctx: ContextHandle, seq: int) -> None:
        _fake(ctx).replies.pop(seq, None)

    async def save(self, ctx: ContextHandle, seq: int, store: KvStore) -> ParkedState | None:
        fake = _fake(ctx)
        if self.fail_saves:
            raise EngineError("the fake engine's copy failed")
        n_tokens = fake.seq_len[seq]
        size = 8 + STATE_BYTES_PER_TOKEN * n_tokens
        buffer = store.allocate(size)
        if buffer is None:
            return None
        self.log.append(("save", fake.name, str(seq), str(n_tokens)))
        return ParkedState(buffer, StateLayout(fake.n_seq, seq, (size - 8,)), n_tokens)

    async def restore(self, ctx: ContextHandle, seq: int, state: ParkedState) -> None:
        fake = _fake(ctx)
        if self.fail_restores:
            raise EngineError("the fake engine refused the state")
        if state.n_tokens > fake.n_ctx_seq:  # as llama.cpp: no room in the stream
            raise EngineError(f"{state.n_tokens} cells do not fit a {fake.n_ctx_seq}-cell stream")
        fake.seq_len[seq] = state.n_tokens
        self.log.append(("restore", fake.name, str(seq), str(state.n_tokens)))

    async def clear(self, ctx: ContextHandle, seq: int) -> None:
        fake = _fake(ctx)
        self.log.append(("clear", fake.name, str(seq), str(fake.seq_len[seq])))
        fake.seq_len[seq] = 0


def _fake(ctx: ContextHandle) -> FakeContext:
    assert isinstance(ctx, FakeContext)
    return ctx
