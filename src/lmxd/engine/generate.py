"""One sequence's generation: sampling, end-of-generation, stop strings, max_tokens, logprobs.

:class:`Generation` is the per-sequence state a decode loop advances one token at a time; the
daemon's scheduler batches many of them in one step. :func:`generate` drives a single one to
the end (chunked prefill, then token by token): what the engine's own tests use directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from lmxd.engine.context import Context, SeqBatch
from lmxd.engine.model import Model
from lmxd.engine.sampling import Sampler, SamplingParams
from lmxd.engine.textstream import StopMatcher, TokenTextDecoder
from lmxd.errors import InvalidInput
from lmxd.results import StopReason, TokenLogprob, TopLogprob


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
    grammar: str | None = None  # GBNF the reply must follow
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives each
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the reply as shown: cut before a stop string
    spelled: str = ""  # the text of every token kept in the sequence, stop string or not
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_reason: StopReason | None = None

    def __post_init__(self) -> None:
        model = self.context.model
        self._sampler = Sampler(
            self.sampling, model.vocab, model.n_vocab, self.history, self.grammar
        )
        self._decoder = TokenTextDecoder()
        self._stopper = StopMatcher(self.stops)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def sample(self, output_index: int) -> tuple[int, str]:
        """Sample the next token from a step's output; returns it and the new visible text.

        Keep stepping until :attr:`done` (or :meth:`cancel`). A token that ends the reply
        (end-of-generation) is not added to the sequence.
        """
        token = self._sampler.sample(self.context.ptr, output_index)
        model = self.context.model
        if model.is_end_of_generation(token):
            return token, self._end(StopReason.EOS)
        if self.top_logprobs is not None:
            self.logprobs.append(
                _logprob(model, self.context, output_index, token, self.top_logprobs)
            )
        self.tokens.append(token)
        piece = self._decoder.feed(model.token_bytes(token))
        self.spelled += piece
        new = self._stopper.feed(piece)
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
        flushed = self._decoder.flush()
        self.spelled += flushed
        tail = self._stopper.feed(flushed) + self._stopper.flush()
        self.text += tail
        self._sampler.free()
        return tail


def _logprob(model: Model, ctx: Context, output_index: int, token: int, top: int) -> TokenLogprob:
    """The model's log probability of ``token`` and of its ``top`` best alternatives, from the
    raw logits (before any sampler or grammar reshaped them)."""
    row = llama_cpp.llama_get_logits_ith(ctx.ptr, output_index)
    logits = np.ctypeslib.as_array(row, shape=(model.n_vocab,)).astype(np.float64)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logprobs, top)[:top] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-logprobs[best])]

    def entry(t: int) -> TopLogprob:
        data = model.token_bytes(t)
        return TopLogprob(data.decode("utf-8", errors="replace"), list(data), float(logprobs[t]))

    chosen = entry(token)
    return TokenLogprob(chosen.token, chosen.bytes, chosen.logprob, [entry(int(t)) for t in best])


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
) -> Generation:
    """Continue sequence ``seq_id`` with ``prompt_tokens`` and generate a reply. Engine thread."""
    out = prefill(context, seq_id, prompt_tokens)
    gen = Generation(context, seq_id, max_tokens, sampling, stops, history=list(prompt_tokens))
    while True:
        _, text = gen.sample(out)
        if on_text is not None and text:
            on_text(text)
        if gen.done:
            return gen
        out = context.decode([gen.next_input()])[seq_id]
