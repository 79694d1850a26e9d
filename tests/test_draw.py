"""The host draw (lmxd.engine.draw) against a plain, row-by-row reading of llama.cpp's chain."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmxd.engine import stepper
from lmxd.engine.draw import Draw, best, chances, draw, group_maxima
from lmxd.engine.sampling import SamplingParams


def reference(row: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """llama.cpp's top-k, top-p, min-p, temperature and softmax, one filter after another."""
    order = sorted(range(len(row)), key=lambda t: -row[t])[: p.top_k]
    probs = np.exp(row[order] - row[order[0]])
    probs /= probs.sum()
    if p.top_p < 1:
        cum, cut = 0.0, len(order)
        for i, q in enumerate(probs):
            cum += q
            if cum >= p.top_p:
                cut = i + 1
                break
        order = order[:cut]
    if p.min_p > 0:
        order = [t for t in order if row[t] >= row[order[0]] + np.log(p.min_p)]
    weights = np.exp((row[order] - row[order[0]]) / p.temperature)
    return dict(zip(order, weights / weights.sum(), strict=True))


@pytest.mark.parametrize("n_vocab", [64 * 50, 64 * 50 + 37, 1000])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_the_k_best_tokens_are_found_without_sorting_the_vocabulary(n_vocab: int, k: int) -> None:
    rng = np.random.default_rng(n_vocab + k)
    logits = rng.standard_normal((5, n_vocab)).astype(np.float32)
    logits[1, -3:] += 10  # the best tokens in the tail past the last whole group
    logits[2, ::64] += 5  # the best tokens all in one group
    tokens, values = best(logits, group_maxima(logits), k)
    for row in range(5):
        expected = np.argsort(-logits[row], kind="stable")[:k]
        assert tokens[row].tolist() == expected.tolist()
        assert np.allclose(values[row], logits[row, expected])


@settings(max_examples=200, deadline=None)
@given(
    top_k=st.integers(1, 40),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
    temperature=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**32 - 2),
)
def test_the_chances_are_llama_cpps_chain(
    top_k: int, top_p: float, min_p: float, temperature: float, seed: int
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = (np.random.default_rng(seed).standard_normal((1, 300)) * 3).astype(np.float32)
    tokens, values = best(logits, group_maxima(logits), 40)
    got = chances([params], values)[0]
    want = reference(logits[0].astype(np.float64), params)
    assert {int(t) for t, q in zip(tokens[0], got, strict=True) if q > 0} == set(want)
    for t, q in zip(tokens[0], got, strict=True):
        if q > 0:
            assert q == pytest.approx(want[int(t)], rel=1e-6, abs=1e-12)


def test_rows_with_different_settings_are_drawn_together_and_a_seed_repeats() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 4096)).astype(np.float32)
    settings_ = [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7),
        SamplingParams(temperature=1.5, top_k=1, seed=7),  # top-k 1: always the best
        SamplingParams(temperature=0.8, top_k=5, top_p=1.0, min_p=0.0),  # a random seed
    ]

    def run(n: int) -> list[list[int]]:
        draws = [Draw.start(p) for p in settings_]
        return [draw(logits, group_maxima(logits), draws) for _ in range(n)]

    first, again = run(200), run(200)
    assert [d[0] for d in first] == [d[0] for d in again]  # seeded: the same draws
    assert {d[1] for d in first} == {int(logits[1].argmax())}
    five = set(np.argsort(-logits[2])[:5].tolist())
    assert {d[2] for d in first} <= five and len({d[2] for d in first}) > 1
    assert len({d[0] for d in first}) > 1  # temperature 0.8 over 40 near-equal logits


@pytest.mark.parametrize("n_rows", [1, 5, 9, 33, 64])
def test_a_step_split_over_threads_gives_what_one_pass_gives(
    n_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stepper splits a step's rows over threads once they hold enough logits (from 9
    rows of a 128,256-token vocabulary; up to 8 shares, as on a 16-core machine): the argmax
    and the groups' maxima come out the same, in row order."""
    monkeypatch.setattr(stepper, "_ARGMAX_THREADS", 8)
    logits = np.random.default_rng(n_rows).standard_normal((n_rows, 128256), dtype=np.float32)
    assert np.array_equal(stepper._by_rows(stepper._row_argmax, logits), logits.argmax(axis=1))
    assert np.array_equal(stepper._by_rows(group_maxima, logits), group_maxima(logits))
