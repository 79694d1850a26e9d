"""Sampled tokens for a step's rows at once: top-k, top-p, min-p, temperature and a draw.

llama.cpp's chain, in its order (top-k, then top-p and min-p on the k best, then temperature,
then a draw from the softmax), computed with numpy over every row of the step together. On the
H200, llama.cpp's own backend (on-device) chain cost 12 ms per step at 64 sequences (a top-k
over the whole vocabulary per sequence, one after the other) against 5.5 ms for the step
itself; here the whole vocabulary is read once, as for greedy.

The top-k without sorting the vocabulary: the row's logits are cut into G groups (token t in
group t mod G, G = n_vocab // 32 so a group has 32 members), one maximum per group is taken
(one vectorised reduction over contiguous memory), and the k groups with the largest maxima
hold the row's k best tokens: each of those tokens is at least the k-th best logit, which is
at least the k-th largest group maximum, so its group's maximum is among the k largest. The
k best are then picked from those k * 32 candidates (and the few tokens past G * 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lmxd.engine.sampling import DEFAULT_SEED, SamplingParams

MAX_TOP_K = 256  # larger k (or none) is left to llama.cpp's chain
_MEMBERS = 32  # tokens per group: 16 to 64 measured alike, 32 the fastest at 64 rows

Floats = npt.NDArray[np.float32]


@dataclass
class Draw:
    """One reply's sampling settings and its random stream (seeded: the same draws again)."""

    params: SamplingParams
    rng: np.random.Generator

    @classmethod
    def start(cls, params: SamplingParams) -> Draw:
        seed = None if params.seed == DEFAULT_SEED else params.seed
        return cls(params, np.random.default_rng(seed))


def usable(params: SamplingParams) -> bool:
    """Whether these settings can be drawn here (a top-k small enough to gather)."""
    return not params.greedy and 0 < params.top_k <= MAX_TOP_K


def group_maxima(logits: Floats) -> Floats:
    """Per row, the maximum of each group (token t is in group t mod G). Rows may be split
    over threads: this is the one pass over the whole vocabulary."""
    n_vocab = logits.shape[1]
    width = n_vocab // _MEMBERS
    body = logits[:, : width * _MEMBERS].reshape(len(logits), _MEMBERS, width)
    return body.max(axis=1)  # type: ignore[no-any-return]


def draw(logits: Floats, maxima: Floats, draws: list[Draw]) -> list[int]:
    """The token drawn for each row of ``logits`` (rows and ``draws`` in the same order);
    ``maxima``: :func:`group_maxima` of the same rows."""
    k = min(max(d.params.top_k for d in draws), logits.shape[1])
    tokens, top = best(logits, maxima, k)
    weights = chances([d.params for d in draws], top)
    cumulative = np.cumsum(weights, axis=1)
    u = np.array([d.rng.random() for d in draws])
    picked = np.minimum((cumulative <= u[:, None]).sum(axis=1), k - 1)
    return np.take_along_axis(tokens, picked[:, None], axis=1)[:, 0].tolist()  # type: ignore[no-any-return]


def best(
    logits: Floats, maxima: Floats, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Each row's ``k`` best tokens and their logits, best first (see the module's
    docstring): from the members of the k groups with the largest maxima, and the tokens
    past the last whole group."""
    n_rows, n_vocab = logits.shape
    width = maxima.shape[1]
    n_groups = min(k, width)
    groups = np.argpartition(maxima, width - n_groups, axis=1)[:, width - n_groups :]
    members = groups[:, :, None] + width * np.arange(_MEMBERS)[None, None, :]
    tail = np.arange(width * _MEMBERS, n_vocab)
    candidates = np.concatenate(
        [members.reshape(n_rows, -1), np.broadcast_to(tail, (n_rows, len(tail)))], axis=1
    )
    values = np.take_along_axis(logits, candidates, axis=1)
    n = values.shape[1]
    top = np.argpartition(values, n - k, axis=1)[:, n - k :]
    order = np.argsort(-np.take_along_axis(values, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    tokens = np.take_along_axis(candidates, top, axis=1)
    return tokens, np.take_along_axis(values, top, axis=1).astype(np.float64)


def chances(params: list[SamplingParams], top: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each row's probabilities over its best logits (sorted, descending) after llama.cpp's
    top-k, top-p (min_keep 1), min-p and temperature, with each row's own settings."""
    k = top.shape[1]
    top_k = np.array([p.top_k for p in params])[:, None]
    top_p = np.array([p.top_p for p in params])[:, None]
    min_p = np.array([p.min_p for p in params])[:, None]
    temperature = np.array([p.temperature for p in params])[:, None]
    keep = np.arange(k)[None, :] < top_k
    # top-p: the shortest run of best tokens whose probability (at temperature 1, among the
    # top-k) reaches p; a token stays if the ones before it had not reached p yet.
    p = np.exp(top - top[:, :1]) * keep
    p /= p.sum(axis=1, keepdims=True)
    before = np.cumsum(p, axis=1) - p
    keep &= (before < top_p) | (top_p >= 1)
    # min-p: within log(min_p) of the best logit.
    with np.errstate(divide="ignore"):
        floor = top[:, :1] + np.log(min_p)
    keep &= (top >= floor) | (min_p <= 0)
    keep[:, 0] = True
    weights = np.where(keep, np.exp((top - top[:, :1]) / temperature), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]
