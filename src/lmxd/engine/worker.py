"""What the scheduler may ask of the engine: a narrow, awaitable interface with plain values.

The scheduler decides and the engine executes; :class:`Worker` is everything in between.
:class:`LlamaWorker` runs each call over llama.cpp on the engine lane of the device the model
or context is on (lmxd.engine.runtime), so that two devices work at once; the scheduler's unit
tests put a fake behind the same protocol, so that admission, parking and fairness run in
milliseconds without a model. Models and contexts cross the interface as opaque handles that
show only what the scheduler reads (:class:`ModelHandle`, :class:`ContextHandle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from lmxd.engine.context import Context, ContextParams
from lmxd.engine.model import Model, ModelRegistry, Split
from lmxd.engine.runtime import Engine, Lane
from lmxd.engine.stepper import Emit, Reply, ReplySpec, SeqReport, SliceControl, Stepper
from lmxd.errors import EngineError, LmxdError
from lmxd.kvstore import KvStore, ParkedState
from lmxd.modelfile import ModelInfo


class ModelHandle(Protocol):
    @property
    def info(self) -> ModelInfo: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def bos_text(self) -> str: ...
    @property
    def eos_text(self) -> str: ...


class ContextHandle(Protocol):
    @property
    def n_ctx(self) -> int: ...  # cells, all sequences together
    @property
    def n_ctx_seq(self) -> int: ...  # cells of one sequence's stream


class Worker(Protocol):
    async def load(
        self, path: Path, device: int, n_gpu_layers: int, split: Split = ()
    ) -> ModelHandle: ...
    async def unload(self, model: ModelHandle) -> None: ...
    async def tokenize(self, model: ModelHandle, text: str, add_special: bool) -> list[int]: ...
    async def check_grammar(self, model: ModelHandle, grammar: str) -> None: ...
    async def open_context(self, model: ModelHandle, params: ContextParams) -> ContextHandle: ...
    async def close_context(self, ctx: ContextHandle) -> None: ...
    async def begin(
        self, ctx: ContextHandle, seq: int, tokens: list[int], keep: int, spec: ReplySpec
    ) -> int:
        """Keep the sequence's first ``keep`` tokens, decode the rest of ``tokens``, then
        reply; returns the tokens kept (none when a sliding-window cache was cleared)."""
        ...

    async def run(
        self,
        ctx: ContextHandle,
        seqs: Sequence[int],
        max_steps: int,
        control: SliceControl,
        emit: Emit,
    ) -> dict[int, SeqReport]: ...
    async def cancel(self, ctx: ContextHandle, seq: int) -> Reply | None: ...
    def drop(self, ctx: ContextHandle, seq: int) -> None:
        """Forget the sequence's reply, without waiting."""
        ...

    async def save(self, ctx: ContextHandle, seq: int, store: KvStore) -> ParkedState | None:
        """Copy the sequence's state into ``store``, leaving its cells; None if over budget."""
        ...

    async def restore(self, ctx: ContextHandle, seq: int, state: ParkedState) -> None: ...
    async def clear(self, ctx: ContextHandle, seq: int) -> None: ...


class _Open:
    """A llama.cpp context with its stepper and its device's lane: the handle
    :class:`LlamaWorker` gives out."""

    def __init__(self, context: Context, one_per_step: bool, lane: Lane) -> None:
        self.context = context
        self.stepper = Stepper(context, one_per_step)
        self.lane = lane

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    @property
    def n_ctx_seq(self) -> int:
        return self.context.n_ctx_seq


class LlamaWorker:
    """The :class:`Worker` over llama.cpp: every call runs on its device's engine lane.

    ``deterministic``: every step carries one sequence (see :class:`Stepper`)."""

    def __init__(self, engine: Engine, deterministic: bool = False) -> None:
        self.engine = engine
        self.deterministic = deterministic
        self._registry = engine.call(ModelRegistry, engine)

    async def load(
        self, path: Path, device: int, n_gpu_layers: int, split: Split = ()
    ) -> ModelHandle:
        def load_() -> Model:
            model = self._registry.acquire(path, n_gpu_layers, device, split)
            # The stepper's token tables, built with the load (a REGISTER) rather than when
            # the model's first context opens (its agents' first DECODE): about 0.4 s for a
            # vocabulary of 128,256 tokens.
            model.build_tables()
            return model

        return await self.engine.lane(device).acall(load_)

    async def unload(self, model: ModelHandle) -> None:
        assert isinstance(model, Model), "a model handle from another worker"
        if model.ptr:  # one that failed to load back after a reload is freed already
            await self.engine.lane(model.device).acall(self._registry.release, model)

    async def tokenize(self, model: ModelHandle, text: str, add_special: bool) -> list[int]:
        return await self._lane(model).acall(_loaded(model).tokenize, text, add_special)

    async def check_grammar(self, model: ModelHandle, grammar: str) -> None:
        await self._lane(model).acall(_loaded(model).check_grammar, grammar)

    async def open_context(self, model: ModelHandle, params: ContextParams) -> ContextHandle:
        lane = self._lane(model)

        def open_() -> _Open:
            return _Open(Context(_loaded(model), params), self.deterministic, lane)

        return await lane.acall(open_)

    def _lane(self, model: ModelHandle) -> Lane:
        return self.engine.lane(_loaded(model).device)

    async def close_context(self, ctx: ContextHandle) -> None:
        opened = _opened(ctx)
        await opened.lane.acall(opened.context.free)

    async def begin(
        self, ctx: ContextHandle, seq: int, tokens: list[int], keep: int, spec: ReplySpec
    ) -> int:
        opened = _opened(ctx)
        stepper = opened.stepper

        def begin_() -> int:
            stepper.ctx.truncate_seq(seq, keep)
            kept = stepper.ctx.seq_len[seq]
            stepper.start(seq, tokens[kept:], spec)
            return kept

        return await opened.lane.acall(begin_)

    async def run(
        self,
        ctx: ContextHandle,
        seqs: Sequence[int],
        max_steps: int,
        control: SliceControl,
        emit: Emit,
    ) -> dict[int, SeqReport]:
        opened = _opened(ctx)
        return await opened.lane.acall(opened.stepper.run, seqs, max_steps, control, emit)

    async def cancel(self, ctx: ContextHandle, seq: int) -> Reply | None:
        opened = _opened(ctx)
        return await opened.lane.acall(opened.stepper.cancel, seq)

    def drop(self, ctx: ContextHandle, seq: int) -> None:
        opened = _opened(ctx)
        opened.lane.post(lambda: opened.stepper.drop(seq))

    async def save(self, ctx: ContextHandle, seq: int, store: KvStore) -> ParkedState | None:
        opened = _opened(ctx)
        context = opened.context

        def save_() -> ParkedState | None:
            n_tokens = context.seq_len[seq]
            size = context.seq_state_size(seq)
            buffer = store.allocate(size)
            if buffer is None:
                return None
            try:
                layout = context.save_seq(seq, buffer, size)
            except LmxdError:
                store.release(buffer)
                raise
            return ParkedState(buffer, layout, n_tokens)

        return await opened.lane.acall(save_)

    async def restore(self, ctx: ContextHandle, seq: int, state: ParkedState) -> None:
        opened = _opened(ctx)
        await opened.lane.acall(opened.context.load_seq, seq, state.buffer, state.layout)

    async def clear(self, ctx: ContextHandle, seq: int) -> None:
        opened = _opened(ctx)
        await opened.lane.acall(opened.context.clear_seq, seq)


def _opened(ctx: ContextHandle) -> _Open:
    assert isinstance(ctx, _Open), "a context handle from another worker"
    return ctx


def _loaded(model: ModelHandle) -> Model:
    assert isinstance(model, Model), "a model handle from another worker"
    if not model.ptr:
        raise EngineError(f"{model.path.name} is not loaded", path=str(model.path))
    return model
