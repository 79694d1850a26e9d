"""One sequence's generation: sampling, end-of-generation, stop strings, max_tokens.

:class:`Generation` is the per-sequence state a decode loop advances one token at a time; the
daemon's scheduler batches many of them in one step. :func:`generate` drives a single one to
the end (chunked prefill, then token by token): what the demo and the tests use directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from lmxd.engine.context import Context, SeqBatch
from lmxd.engine.sampling import Sampler, SamplingParams
from lmxd.engine.textstream import StopMatcher, TokenTextDecoder
from lmxd.errors import InvalidInput


class StopReason(StrEnum):
    EOS = "eos"  # the model emitted an end-of-generation token
    STOP = "stop"  # a stop string appeared
    LENGTH = "length"  # max_tokens reached
    CONTEXT = "context"  # the sequence's context is full
    CANCELLED = "cancelled"


@dataclass
class Generation:
    """The state of one reply being generated on one sequence."""

    context: Context
    seq_id: int
    max_tokens: int
    sampling: SamplingParams
    stops: Sequence[str] = ()
    n_ctx_limit: int = 0  # the agent's own context limit in tokens (0 = the context's)
    history: Sequence[int] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: StopReason | None = None

    def __post_init__(self) -> None:
        self._sampler = Sampler(self.sampling, self.context.model.n_vocab, self.history)
        self._decoder = TokenTextDecoder()
        self._stopper = StopMatcher(self.stops)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def sample(self, output_index: int) -> tuple[int, str]:
        """Sample the next token from a step's output; returns it and the new visible text.

        Call :meth:`finish` or keep stepping until :attr:`done`. A token that ends the reply
        (end-of-generation) is not added to the sequence.
        """
        token = self._sampler.sample(self.context.ptr, output_index)
        model = self.context.model
        if model.is_end_of_generation(token):
            return token, self._end(StopReason.EOS)
        self.tokens.append(token)
        new = self._stopper.feed(self._decoder.feed(model.token_bytes(token)))
        if self._stopper.stopped:
            self.text += new
            self._end(StopReason.STOP)
            return token, new
        self.text += new
        limit = self.n_ctx_limit or self.context.n_ctx
        if len(self.tokens) >= self.max_tokens:
            return token, new + self._end(StopReason.LENGTH)
        if self.context.seq_len[self.seq_id] + 1 >= limit:
            return token, new + self._end(StopReason.CONTEXT)
        return token, new

    def next_input(self) -> SeqBatch:
        """The sampled token, to be decoded in the next step so that its logits follow."""
        return SeqBatch(self.seq_id, [self.tokens[-1]])

    def cancel(self) -> str:
        return self._end(StopReason.CANCELLED)

    def _end(self, reason: StopReason) -> str:
        self.stop_reason = reason
        tail = self._stopper.feed(self._decoder.flush()) + self._stopper.flush()
        self.text += tail
        self._sampler.free()
        return tail


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: StopReason
    prefill_s: float
    decode_s: float


def prefill(context: Context, seq_id: int, tokens: Sequence[int]) -> int:
    """Decode ``tokens`` into sequence ``seq_id`` in chunks of n_batch; returns the output index."""
    if not tokens:
        raise InvalidInput("nothing to prefill: a reply starts from the logits of a new token")
    step = context.n_batch
    out = 0
    for start in range(0, len(tokens), step):
        chunk = tokens[start : start + step]
        last = start + step >= len(tokens)
        out = context.decode([SeqBatch(seq_id, chunk, want_logits=last)]).get(seq_id, 0)
    return out


def generate(
    context: Context,
    seq_id: int,
    prompt_tokens: Sequence[int],
    max_tokens: int,
    sampling: SamplingParams,
    stops: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Continue sequence ``seq_id`` with ``prompt_tokens`` and generate a reply. Engine thread."""
    t0 = time.perf_counter()
    history = list(prompt_tokens)
    out = prefill(context, seq_id, prompt_tokens)
    t1 = time.perf_counter()
    gen = Generation(context, seq_id, max_tokens, sampling, stops, history=history)
    while True:
        _, text = gen.sample(out)
        if on_text is not None and text:
            on_text(text)
        if gen.done:
            break
        out = context.decode([gen.next_input()])[seq_id]
    assert gen.stop_reason is not None
    return GenerationResult(
        text=gen.text,
        prompt_tokens=len(prompt_tokens),
        generated_tokens=len(gen.tokens),
        stop_reason=gen.stop_reason,
        prefill_s=t1 - t0,
        decode_s=time.perf_counter() - t1,
    )
