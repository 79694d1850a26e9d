"""The engine layer with the real models: generation, batching, state save/restore, errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from lmxd.chat import ChatMessage, ChatTemplate
from lmxd.engine.context import Context, ContextParams, SeqBatch
from lmxd.engine.generate import Generation, generate, prefill
from lmxd.engine.model import Model, ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import EngineError, InvalidInput
from lmxd.results import StopReason

T = TypeVar("T")
GREEDY = SamplingParams()


def on_engine(fn: Callable[[], T]) -> T:
    return Engine.get().call(fn)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return on_engine(lambda: ModelRegistry(Engine.get()))


@pytest.fixture(scope="module")
def smol(registry: ModelRegistry, smollm2: Path) -> Iterator[Model]:
    model = on_engine(lambda: registry.acquire(smollm2))
    yield model
    on_engine(lambda: registry.release(model))


@pytest.fixture(scope="module")
def gemma(registry: ModelRegistry, gemma3: Path) -> Iterator[Model]:
    model = on_engine(lambda: registry.acquire(gemma3))
    yield model
    on_engine(lambda: registry.release(model))


def with_context(model: Model, fn: Callable[[Context], T], n_ctx: int = 2048, n_seq: int = 4) -> T:
    def run() -> T:
        ctx = Context(model, ContextParams(n_ctx=n_ctx, n_seq_max=n_seq))
        try:
            return fn(ctx)
        finally:
            ctx.free()

    return on_engine(run)


SYSTEM = ChatMessage("system", "You are a helpful assistant.")


def chat_tokens(model: Model, question: str) -> list[int]:
    template = ChatTemplate("model", model.chat_template, model.bos_text, model.eos_text)
    rendered = template.render([SYSTEM, ChatMessage("user", question)])
    return model.tokenize(rendered.text, add_special=rendered.add_bos)


def test_smollm2_chat_answers_sensibly(smol: Model) -> None:
    tokens = on_engine(lambda: chat_tokens(smol, "What is the capital of France?"))
    result = with_context(smol, lambda ctx: generate(ctx, 0, tokens, 40, GREEDY))
    assert "Paris" in result.text
    assert result.stop_reason in (StopReason.EOS, StopReason.LENGTH)
    assert list(result.history) == tokens and 0 < len(result.tokens) <= 40


def test_gemma3_completes_a_plain_prompt(gemma: Model) -> None:
    tokens = on_engine(lambda: gemma.tokenize("The Eiffel Tower is in the city of"))
    result = with_context(gemma, lambda ctx: generate(ctx, 0, tokens, 12, GREEDY))
    assert "Paris" in result.text
    tokens = on_engine(lambda: gemma.tokenize("def add(a, b):\n    return"))
    result = with_context(gemma, lambda ctx: generate(ctx, 0, tokens, 6, GREEDY))
    assert result.text.startswith(" a + b")


def test_tokenize_round_trip(smol: Model) -> None:
    text = "naïve café — 東京 🚀 def f(x): return x"
    tokens = on_engine(lambda: smol.tokenize(text, add_special=False))
    assert on_engine(lambda: smol.detokenize(tokens)) == text


def test_model_is_loaded_once_and_shared(registry: ModelRegistry, smollm2: Path) -> None:
    def run() -> tuple[bool, int, int]:
        a = registry.acquire(smollm2)
        b = registry.acquire(smollm2)
        refs = a.refcount
        registry.release(b)
        after = a.refcount
        registry.release(a)
        return a is b, refs, after

    same, refs, after = on_engine(run)
    assert same and after == refs - 1


def test_restored_state_continues_token_for_token(smol: Model) -> None:
    """Save a sequence, free its cells, restore it into another id: the same greedy tokens."""
    prompt = on_engine(lambda: chat_tokens(smol, "List three colours."))

    def run(ctx: Context) -> tuple[list[int], list[int], int]:
        straight = generate(ctx, 0, prompt, 24, GREEDY).text
        ctx.clear_seq(0)
        prefill(ctx, 1, prompt[:-3])
        size = ctx.seq_state_size(1)
        buf = bytearray(size)
        assert ctx.save_seq(1, buf) == size
        ctx.clear_seq(1)
        assert ctx.seq_len[1] == 0
        ctx.load_seq(2, buf, size)
        assert ctx.seq_len[2] == len(prompt) - 3
        resumed = generate(ctx, 2, prompt[-3:], 24, GREEDY).text
        return list(straight.encode()), list(resumed.encode()), size

    straight, resumed, size = with_context(smol, run)
    assert straight == resumed
    assert size > 30 * 3 * 64 * 2 * 2 * (len(prompt) - 3)  # at least the K and V rows


def test_batched_sequences_match_each_alone(smol: Model) -> None:
    questions = ["Name a fruit.", "What is 2 + 2?", "Say hello in French."]
    prompts = on_engine(lambda: [chat_tokens(smol, q) for q in questions])

    def tokens_alone(ctx: Context) -> list[list[int]]:
        results = []
        for p in prompts:
            ctx.clear_seq(0)
            out = prefill(ctx, 0, p)
            g = Generation(ctx, 0, 16, GREEDY)
            while True:
                g.sample(out)
                if g.done:
                    break
                out = ctx.decode([g.next_input()])[0]
            results.append(g.tokens)
        return results

    def tokens_batched(ctx: Context) -> list[list[int]]:
        # Each prompt is prefilled on its own: llama.cpp's CPU kernels take another path once
        # a batch holds 64 tokens or more (measured: the first logits of one prompt move by up
        # to 1.06 between a 63- and a 64-token batch, whatever the other tokens are), which
        # would flip near-tied greedy choices. The decode steps, one token per sequence, are
        # batched: that is what agents of one model share.
        gens = [Generation(ctx, i, 16, GREEDY) for i in range(len(prompts))]
        for g, p in zip(gens, prompts, strict=True):
            g.sample(prefill(ctx, g.seq_id, p))  # sampled before the next decode overwrites
        while True:
            live = [g for g in gens if not g.done]
            if not live:
                return [g.tokens for g in gens]
            outs = ctx.decode([g.next_input() for g in live])
            for g in live:
                g.sample(outs[g.seq_id])

    assert with_context(smol, tokens_alone) == with_context(smol, tokens_batched)


def test_stop_strings_end_the_reply_before_them(smol: Model) -> None:
    tokens = on_engine(lambda: chat_tokens(smol, "Explain what a linked list is."))
    full = with_context(smol, lambda ctx: generate(ctx, 0, tokens, 40, GREEDY))
    words = full.text.split()
    stop = " ".join(words[6:8])  # two words: the stop string spans several tokens
    cut = with_context(
        smol, lambda ctx: generate(ctx, 0, tokens, 40, GREEDY, stops=["@@never@@", stop])
    )
    assert cut.stop_reason is StopReason.STOP
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.tokens) < len(full.tokens)


def test_seeded_sampling_is_reproducible(smol: Model) -> None:
    tokens = on_engine(lambda: chat_tokens(smol, "Tell me a story."))
    hot = SamplingParams(temperature=1.2, top_k=100, top_p=1.0, min_p=0.0, seed=7)
    a = with_context(smol, lambda ctx: generate(ctx, 0, tokens, 24, hot).text)
    b = with_context(smol, lambda ctx: generate(ctx, 0, tokens, 24, hot).text)
    c = with_context(
        smol, lambda ctx: generate(ctx, 0, tokens, 24, SamplingParams(temperature=1.2, seed=8)).text
    )
    assert a == b and a != c


def test_repeat_penalty_changes_output(smol: Model) -> None:
    tokens = on_engine(lambda: smol.tokenize("one one one one one one"))
    plain = with_context(smol, lambda ctx: generate(ctx, 0, tokens, 12, GREEDY).text)
    penalised = SamplingParams(repeat_penalty=1.8)
    other = with_context(smol, lambda ctx: generate(ctx, 0, tokens, 12, penalised).text)
    assert plain != other


def test_context_limit_stops_generation(smol: Model) -> None:
    tokens = on_engine(lambda: smol.tokenize("Once upon a time"))
    result = with_context(
        smol, lambda ctx: generate(ctx, 0, tokens, 10_000, GREEDY), n_ctx=256, n_seq=1
    )
    assert result.stop_reason is StopReason.CONTEXT
    assert len(result.history) + len(result.tokens) <= 256


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(min_p=2),
        dict(top_k=-1),
        dict(repeat_penalty=0),
        dict(seed=-1),
    ],
)
def test_bad_sampling_params(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        SamplingParams(**bad)  # type: ignore[arg-type]


def test_bad_batches_are_refused_before_llama_cpp(smol: Model) -> None:
    def run(ctx: Context) -> None:
        with pytest.raises(InvalidInput):
            generate(ctx, 0, [], 4, GREEDY)  # no token, no logits to start from
        with pytest.raises(InvalidInput):
            ctx.decode([SeqBatch(0, [1] * 600)])  # more than n_batch
        with pytest.raises(InvalidInput):
            ctx.decode([SeqBatch(0, [1]), SeqBatch(0, [2])])  # one entry per sequence
        with pytest.raises(InvalidInput):
            ctx.decode([SeqBatch(9, [1])])  # no such sequence
        assert ctx.seq_len == [0, 0, 0, 0]
        ctx.decode([SeqBatch(0, [1, 2, 3])])  # and the context still works
        assert ctx.seq_len[0] == 3

    with_context(smol, run)


def test_corrupt_state_is_refused_and_the_sequence_stays_usable(smol: Model) -> None:
    def run(ctx: Context) -> int:
        prefill(ctx, 0, smol.tokenize("Hello there, general"))
        size = ctx.seq_state_size(0)
        buf = bytearray(size)
        ctx.save_seq(0, buf)
        with pytest.raises(EngineError):
            ctx.load_seq(1, buf, size // 2)  # truncated
        assert ctx.seq_len[1] == 0
        with pytest.raises(InvalidInput):
            ctx.save_seq(0, bytearray(10))  # too small a buffer
        ctx.load_seq(1, buf, size)
        return ctx.seq_len[1]

    assert with_context(smol, run) == len(on_engine(lambda: smol.tokenize("Hello there, general")))


def test_llama_cpp_objects_refuse_other_threads(smol: Model) -> None:
    with pytest.raises(EngineError, match="engine thread"):
        smol.free()  # this test runs on the main thread
    assert smol.ptr is not None


def test_truncating_a_sliding_window_sequence_continues_like_a_fresh_one(gemma: Model) -> None:
    """Gemma 3 keeps only a 512-token window in most layers: cutting a long sequence back must
    either keep a usable window or clear it (and the caller prefills again), never leave a
    sequence that attends over a hole."""
    tokens = on_engine(lambda: gemma.tokenize("The history of the city of Paris. " * 160))
    keep = len(tokens) - 100

    def continued(ctx: Context) -> str:
        prefill(ctx, 0, tokens)
        ctx.truncate_seq(0, keep)
        assert ctx.seq_len[0] in (0, keep)
        return generate(ctx, 0, tokens[ctx.seq_len[0] : keep + 1], 8, GREEDY).text

    def fresh(ctx: Context) -> str:
        return generate(ctx, 0, tokens[: keep + 1], 8, GREEDY).text

    assert len(tokens) > 1100
    assert with_context(gemma, continued, n_ctx=2048, n_seq=1) == with_context(
        gemma, fresh, n_ctx=2048, n_seq=1
    )
