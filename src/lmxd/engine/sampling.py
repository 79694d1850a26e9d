"""Sampling: the parameters a request may set, and the llama.cpp sampler chains built from them.

Two kinds of chain. A *device chain* is attached to a sequence of a context and runs inside
``llama_decode``'s graph (llama.cpp's backend samplers): greedy, top-k, top-p, min-p,
temperature and a seeded draw, with no logits copied to the host. A *host chain*
(:class:`Sampler`) reads the logits on the host: what the device cannot do (a grammar,
repetition penalties) and what needs the raw logits (log probabilities).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import llama_cpp

from lmxd.errors import InvalidInput

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per sampler


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy: the same prompt always gives the same tokens."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1 = off)"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (0 <= self.seed <= 0xFFFFFFFF, "seed must fit in 32 bits"),
        )
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message, sampling=self.__dict__)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return (
            self.repeat_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @property
    def device_key(self) -> tuple[float, int, float, float, int]:
        """What a device chain is built from: two jobs with the same key share one chain."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.seed)


def _add_sampling(chain: llama_cpp.llama_sampler_p, params: SamplingParams) -> None:
    """The choice itself, after any grammar and penalties: greedy, or filter then draw."""
    add = llama_cpp.llama_sampler_chain_add
    if params.greedy:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(params.seed))


def device_chain(params: SamplingParams) -> llama_cpp.llama_sampler_p:
    """A chain for ``llama_set_sampler``; the caller frees it after the context."""
    chain: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_chain_init(
        llama_cpp.llama_sampler_chain_default_params()
    )
    _add_sampling(chain, params)
    return chain


class Sampler:
    """A host sampler chain for one generation. Engine thread only; call :meth:`free`.

    A grammar, when given, comes first: it rules out every token that cannot continue the
    grammar, and what follows picks among the rest (greedy takes the best allowed token).
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        history: Iterable[int] = (),
        grammar: str | None = None,
    ) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain
        add = llama_cpp.llama_sampler_chain_add
        if grammar is not None:
            constraint = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not constraint:
                self.free()
                raise InvalidInput("llama.cpp's grammar parser refused the grammar")
            add(chain, constraint)
        if params.penalised:
            penalties = llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                params.repeat_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
            # The penalties look back over the conversation, not only over this reply; the
            # history goes to them alone (a grammar must not see it).
            for token in history:
                llama_cpp.llama_sampler_accept(penalties, token)
            add(chain, penalties)
        _add_sampling(chain, params)

    def sample(self, ctx: llama_cpp.llama_context_p, output_index: int) -> int:
        """Pick the next token from the logits of batch output ``output_index``."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, output_index))

    def free(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
