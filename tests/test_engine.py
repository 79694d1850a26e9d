"""The engine layer with the real models: generation, batching, state save/restore, errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from lmxd.chat import ChatMessage, ChatTemplate
from lmxd.engine.context import Context, ContextParams, StateLayout
from lmxd.engine.model import Model, ModelRegistry
from lmxd.engine.runtime import Engine
from lmxd.engine.sampling import SamplingParams
from lmxd.engine.stepper import Reply, ReplySpec, Stepper
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


def with_context(model: Model, fn: Callable[[Stepper], T], n_ctx: int = 512, n_seq: int = 4) -> T:
    """Run ``fn`` on the engine thread with a stepper over a fresh context (``n_ctx`` cells
    per sequence)."""

    def run() -> T:
        ctx = Context(model, ContextParams(n_ctx=n_ctx, n_seq_max=n_seq))
        try:
            return fn(Stepper(ctx))
        finally:
            ctx.free()

    return on_engine(run)


def generate(
    stepper: Stepper,
    seq: int,
    prompt: list[int],
    max_tokens: int,
    sampling: SamplingParams,
    stops: tuple[str, ...] = (),
    top_logprobs: int | None = None,
) -> Reply:
    spec = ReplySpec(max_tokens, sampling, stops, top_logprobs=top_logprobs)
    return stepper.generate(seq, prompt, spec)


def prefill(stepper: Stepper, seq: int, tokens: list[int]) -> None:
    """Decode ``tokens`` into ``seq``, n_batch at a time, reading nothing back."""
    ctx = stepper.ctx
    for start in range(0, len(tokens), ctx.n_batch):
        chunk = tokens[start : start + ctx.n_batch]
        first = ctx.seq_len[seq]
        n = len(chunk)
        ctx.decode([seq] * n, chunk, list(range(first, first + n)), [0] * n)


SYSTEM = ChatMessage("system", "You are a helpful assistant.")


def chat_tokens(model: Model, question: str) -> list[int]:
    template = ChatTemplate("model", model.chat_template, model.bos_text, model.eos_text)
    rendered = template.render([SYSTEM, ChatMessage("user", question)])
    return model.tokenize(rendered.text, add_special=rendered.add_bos)


def test_smollm2_chat_answers_sensibly(smol: Model) -> None:
    tokens = on_engine(lambda: chat_tokens(smol, "What is the capital of France?"))
    result = with_context(smol, lambda st: generate(st, 0, tokens, 40, GREEDY))
    assert "Paris" in result.text
    assert result.stop_reason in (StopReason.EOS, StopReason.LENGTH)
    assert 0 < result.n_tokens <= 40


def test_gemma3_completes_a_plain_prompt(gemma: Model) -> None:
    tokens = on_engine(lambda: gemma.tokenize("The Eiffel Tower is in the city of"))
    result = with_context(gemma, lambda st: generate(st, 0, tokens, 12, GREEDY))
    assert "Paris" in result.text
    tokens = on_engine(lambda: gemma.tokenize("def add(a, b):\n    return"))
    result = with_context(gemma, lambda st: generate(st, 0, tokens, 6, GREEDY))
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

    def run(stepper: Stepper) -> tuple[list[int], list[int], int]:
        ctx = stepper.ctx
        straight = generate(stepper, 0, prompt, 24, GREEDY).text
        ctx.clear_seq(0)
        prefill(stepper, 1, prompt[:-3])
        size = ctx.seq_state_size(1)
        buf = bytearray(size)
        layout = ctx.save_seq(1, buf)
        assert layout.nbytes == size
        ctx.clear_seq(1)
        assert ctx.seq_len[1] == 0
        ctx.load_seq(2, buf, layout)
        assert ctx.seq_len[2] == len(prompt) - 3
        resumed = generate(stepper, 2, prompt[-3:], 24, GREEDY).text
        return list(straight.encode()), list(resumed.encode()), size

    straight, resumed, size = with_context(smol, run)
    assert straight == resumed
    assert size > 30 * 3 * 64 * 2 * 2 * (len(prompt) - 3)  # at least the K and V rows


@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_a_state_restores_into_a_context_of_another_shape(
    name: str, request: pytest.FixtureRequest
) -> None:
    """Parked from sequence 2 of four, restored into the only sequence of a one-sequence
    context and into sequence 1 of three: each continues as the conversation did at first.
    Gemma 3 writes two KV caches (full and sliding-window), each with its stream header."""
    model: Model = request.getfixturevalue(name)
    prompt = on_engine(lambda: model.tokenize("The three primary colours are"))

    def saved(stepper: Stepper) -> tuple[bytearray, StateLayout, str]:
        straight = generate(stepper, 2, prompt, 16, GREEDY).text
        stepper.ctx.clear_seq(2)
        prefill(stepper, 2, prompt[:-1])
        buf = bytearray(stepper.ctx.seq_state_size(2))
        return buf, stepper.ctx.save_seq(2, buf), straight

    buf, layout, straight = with_context(model, saved, n_seq=4)
    assert layout.n_stream == 4 and layout.stream == 2
    assert len(layout.sections) == (2 if name == "gemma" else 1)

    def resumed(seq: int) -> Callable[[Stepper], str]:
        def run(stepper: Stepper) -> str:
            stepper.ctx.load_seq(seq, buf, layout)
            assert stepper.ctx.seq_len[seq] == len(prompt) - 1
            return generate(stepper, seq, prompt[-1:], 16, GREEDY).text

        return run

    assert with_context(model, resumed(0), n_seq=1) == straight
    assert with_context(model, resumed(1), n_seq=3) == straight


def test_batched_sequences_match_each_alone(smol: Model) -> None:
    questions = ["Name a fruit.", "What is 2 + 2?", "Say hello in French."]
    prompts = on_engine(lambda: [chat_tokens(smol, q) for q in questions])

    def alone(stepper: Stepper) -> list[str]:
        results = []
        for p in prompts:
            stepper.ctx.clear_seq(0)
            results.append(generate(stepper, 0, p, 16, GREEDY).text)
        return results

    def batched(stepper: Stepper) -> list[str]:
        # Each prompt is prefilled on its own: llama.cpp's CPU kernels take another path once
        # a batch holds 64 tokens or more (measured: the first logits of one prompt move by up
        # to 1.06 between a 63- and a 64-token batch, whatever the other tokens are), which
        # would flip near-tied greedy choices. The decode steps, one token per sequence, are
        # batched: that is what agents of one model share.
        seqs = list(range(len(prompts)))
        for seq, p in zip(seqs, prompts, strict=True):
            stepper.start(seq, p, ReplySpec(16, GREEDY))
            stepper.run([seq], 1)  # the prompt, and the first token sampled
        replies: dict[int, str] = {}
        while len(replies) < len(seqs):
            live = [seq for seq in seqs if seq not in replies]
            for seq, report in stepper.run(live, 100).items():
                if report.reply is not None:
                    replies[seq] = report.reply.text
        return [replies[seq] for seq in seqs]

    assert with_context(smol, alone) == with_context(smol, batched)


def test_greedy_argmax_and_the_host_chain_agree(smol: Model) -> None:
    """The batch's argmax picks the same tokens as llama.cpp's greedy host chain (asking for
    log probabilities puts a reply on the chain)."""
    tokens = on_engine(lambda: chat_tokens(smol, "Describe a sunset in two sentences."))
    argmax = with_context(smol, lambda st: generate(st, 0, tokens, 40, GREEDY))
    chain = with_context(smol, lambda st: generate(st, 0, tokens, 40, GREEDY, top_logprobs=0))
    assert argmax.text == chain.text and argmax.n_tokens == chain.n_tokens
    assert len(chain.logprobs) == chain.n_tokens and not argmax.logprobs


def test_a_seeded_draw_on_the_device_is_the_same_in_a_context_of_one_or_of_four(
    smol: Model,
) -> None:
    """Each step draws a fresh random number whatever the context's shape (with more than one
    output allowed per sequence, llama.cpp replayed one number until a token was accepted)."""
    tokens = on_engine(lambda: chat_tokens(smol, "Tell me a story."))
    hot = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    alone = with_context(smol, lambda st: generate(st, 0, tokens, 24, hot).text, n_seq=1)
    of_four = with_context(smol, lambda st: generate(st, 2, tokens, 24, hot).text, n_seq=4)
    assert alone == of_four and len(set(alone.split())) > 3


def test_device_chains_follow_the_settings_of_each_reply(smol: Model) -> None:
    """A sequence keeps its device chain while the settings stay, and gets another when they
    change: a seeded reply repeats itself on the same sequence, greedy comes back after."""
    tokens = on_engine(lambda: chat_tokens(smol, "Tell me a story."))
    hot = SamplingParams(temperature=1.0, seed=3)

    def run(stepper: Stepper) -> list[str]:
        texts = []
        for sampling in (GREEDY, hot, hot, GREEDY):
            stepper.ctx.clear_seq(1)
            texts.append(generate(stepper, 1, tokens, 16, sampling).text)
        return texts

    greedy, first, again, greedy_again = with_context(smol, run)
    assert first == again and greedy == greedy_again and first != greedy


def test_stop_strings_end_the_reply_before_them(smol: Model) -> None:
    tokens = on_engine(lambda: chat_tokens(smol, "Explain what a linked list is."))
    full = with_context(smol, lambda st: generate(st, 0, tokens, 40, GREEDY))
    words = full.text.split()
    stop = " ".join(words[6:8])  # two words: the stop string spans several tokens
    cut = with_context(
        smol, lambda st: generate(st, 0, tokens, 40, GREEDY, stops=("@@never@@", stop))
    )
    assert cut.stop_reason is StopReason.STOP
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.n_tokens < full.n_tokens


def test_seeded_sampling_is_reproducible(smol: Model) -> None:
    tokens = on_engine(lambda: chat_tokens(smol, "Tell me a story."))
    hot = SamplingParams(temperature=1.2, top_k=100, top_p=1.0, min_p=0.0, seed=7)
    a = with_context(smol, lambda st: generate(st, 0, tokens, 24, hot).text)
    b = with_context(smol, lambda st: generate(st, 0, tokens, 24, hot).text)
    c = with_context(
        smol, lambda st: generate(st, 0, tokens, 24, SamplingParams(temperature=1.2, seed=8)).text
    )
    assert a == b and a != c


def test_repeat_penalty_changes_output(smol: Model) -> None:
    tokens = on_engine(lambda: smol.tokenize("one one one one one one"))
    plain = with_context(smol, lambda st: generate(st, 0, tokens, 12, GREEDY).text)
    penalised = SamplingParams(repeat_penalty=1.8)
    other = with_context(smol, lambda st: generate(st, 0, tokens, 12, penalised).text)
    assert plain != other


def test_context_limit_stops_generation(smol: Model) -> None:
    tokens = on_engine(lambda: smol.tokenize("Once upon a time"))
    result = with_context(
        smol, lambda st: generate(st, 0, tokens, 10_000, GREEDY), n_ctx=256, n_seq=1
    )
    assert result.stop_reason is StopReason.CONTEXT
    assert len(tokens) + result.n_tokens <= 256


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
    def run(stepper: Stepper) -> None:
        ctx = stepper.ctx

        def decode(seqs: list[int], tokens: list[int]) -> None:
            n = len(tokens)
            ctx.decode(seqs, tokens, [ctx.seq_len[0] + i for i in range(n)], [0] * n)

        with pytest.raises(InvalidInput):
            generate(stepper, 0, [], 4, GREEDY)  # no token, no logits to start from
        with pytest.raises(InvalidInput):
            generate(stepper, 0, [1], 0, GREEDY)  # no room for a reply
        with pytest.raises(InvalidInput):
            decode([0] * 600, [1] * 600)  # more than n_batch
        with pytest.raises(InvalidInput):
            decode([9], [1])  # no such sequence
        assert ctx.seq_len == [0, 0, 0, 0]
        decode([0, 0, 0], [1, 2, 3])  # and the context still works (sequence 0 was empty)
        assert ctx.seq_len[0] == 3

    with_context(smol, run)


def test_corrupt_state_is_refused_and_the_sequence_stays_usable(smol: Model) -> None:
    def run(stepper: Stepper) -> int:
        ctx = stepper.ctx
        prefill(stepper, 0, smol.tokenize("Hello there, general"))
        size = ctx.seq_state_size(0)
        buf = bytearray(size)
        layout = ctx.save_seq(0, buf)
        with pytest.raises(EngineError):
            ctx.load_seq(1, buf, StateLayout(layout.n_stream, 0, (size // 2 - 8,)))  # truncated
        assert ctx.seq_len[1] == 0
        with pytest.raises(InvalidInput):
            ctx.save_seq(0, bytearray(10))  # too small a buffer
        ctx.load_seq(1, buf, layout)
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

    def continued(stepper: Stepper) -> str:
        ctx = stepper.ctx
        prefill(stepper, 0, tokens)
        ctx.truncate_seq(0, keep)
        assert ctx.seq_len[0] in (0, keep)
        return generate(stepper, 0, tokens[ctx.seq_len[0] : keep + 1], 8, GREEDY).text

    def fresh(stepper: Stepper) -> str:
        return generate(stepper, 0, tokens[: keep + 1], 8, GREEDY).text

    assert len(tokens) > 1100
    assert with_context(gemma, continued, n_ctx=2048, n_seq=1) == with_context(
        gemma, fresh, n_ctx=2048, n_seq=1
    )
