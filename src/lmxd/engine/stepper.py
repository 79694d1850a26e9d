"""The decode loop: replies of several sequences advanced together, one ``llama_decode`` a step.

The scheduler decides which sequences step and for how long; the :class:`Stepper` executes,
on the engine thread, with plain values in and out. :meth:`Stepper.start` gives a sequence the
prompt tokens it still has to decode and what its reply may be (:class:`ReplySpec`);
:meth:`Stepper.run` steps a set of sequences, each step one batch in which every generating
sequence brings its last token and prompts fill the rest, and returns a :class:`SeqReport` per
sequence. Text goes out as it is sampled through ``emit``, once per step.

Four ways to pick a token, chosen per reply (:class:`Pick`), all in one step:

- greedy: one numpy ``argmax`` over the logits rows of every greedy sequence of the step
  (measured faster than llama.cpp's on-device greedy sampler on the H200 at every batch size:
  the device sampler adds graph nodes and a copy per sequence);
- temperature with a top-k of at most 256, top-p, min-p, seed: numpy again, over the rows of
  every such sequence at once (:mod:`lmxd.engine.draw`; llama.cpp's on-device chain sorted
  the whole vocabulary once per sequence: 12 ms a step at 64 sequences on the H200);
- the same with no top-k (or a larger one): llama.cpp's backend (on-device) chain;
- a grammar, repetition penalties or log probabilities: llama.cpp's host chain, per sequence.

The per-token work left in Python is a list lookup of the token's bytes, an incremental UTF-8
decode and the stop-string check.

The same loop serves the daemon, the benchmarks and the engine's tests (:meth:`generate`).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from lmxd.engine.context import Context
from lmxd.engine.draw import Draw, draw, group_maxima
from lmxd.engine.draw import usable as draws_here
from lmxd.engine.sampling import Sampler, SamplingParams
from lmxd.engine.textstream import StopMatcher, TokenTextDecoder
from lmxd.errors import InvalidInput
from lmxd.results import Piece, StopReason, TokenLogprob, TopLogprob

Emit = Callable[[list[tuple[int, Piece]]], None]

# numpy's argmax lets go of the GIL, and llama.cpp's threads are idle between steps: 64 rows of
# a 128,256-token vocabulary took 1.4 ms on one core and 0.9 ms on two (2-core machine); on the
# H200 machine, 1.4 ms of a 8 ms step in three shares of 2M logits each (2026-11-29).
_ARGMAX_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
_ARGMAX_SPLIT = 1 << 19  # logits per share (2 MB): smaller batches are not worth a thread
_argmax_pool = ThreadPoolExecutor(_ARGMAX_THREADS, thread_name_prefix="lmxd-argmax")


@dataclass(frozen=True)
class ReplySpec:
    """What one reply may be: its length, sampling, stops and limits."""

    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    limit: int = 0  # tokens the sequence may hold in all (the agent's n_ctx; 0 = its stream)
    history: tuple[int, ...] = ()  # the conversation so far, for repetition penalties
    grammar: str | None = None  # GBNF the reply must follow
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives each
    stream: bool = False  # its text goes out through ``emit`` as it comes

    @property
    def pick(self) -> Pick:
        if self.grammar is not None or self.sampling.penalised or self.top_logprobs is not None:
            return Pick.CHAIN
        if self.sampling.greedy:
            return Pick.ARGMAX
        return Pick.DRAW if draws_here(self.sampling) else Pick.DEVICE


class Pick(Enum):
    """How a reply's tokens are chosen (see the module's docstring)."""

    ARGMAX = "argmax"
    DRAW = "draw"
    DEVICE = "device"
    CHAIN = "chain"


@dataclass(frozen=True)
class Reply:
    """A finished reply."""

    text: str  # as shown: cut before a stop string
    spelled: str  # the text of every token kept in the sequence, stop string or not
    n_tokens: int  # tokens generated and kept (an end-of-generation token is not)
    logprobs: list[TokenLogprob]
    stop_reason: StopReason
    unsent: str = ""  # the end of ``text`` no piece carried (a reply cancelled mid-character)


@dataclass
class SeqReport:
    """What one :meth:`Stepper.run` did to one sequence."""

    generated: list[int] = field(default_factory=list)  # tokens the conversation gained
    kv_tokens: int = 0  # tokens the sequence holds in KV now
    prefill_s: float = 0.0  # time of the steps that carried its prompt
    decode_s: float = 0.0  # time of the steps that carried its generated tokens
    reply: Reply | None = None  # set once the reply has ended


class SliceControl:
    """Written by the event loop while a :meth:`Stepper.run` goes on, read between steps.

    Plain attributes: each write and read is one bytecode, atomic under the GIL.
    """

    def __init__(self) -> None:
        self.stop = False  # end the run after the current step (a new job wants in)
        self.paused: set[int] = set()  # sequences whose client is not reading: sit out


class _Work:
    """A sequence's reply in progress: engine-thread state, never seen by the scheduler."""

    def __init__(
        self,
        seq: int,
        prompt: list[int],
        spec: ReplySpec,
        pick: Pick,
        sampler: Sampler | None,
        draw: Draw | None,
    ) -> None:
        self.seq = seq
        self.pending = prompt  # prompt tokens still to decode
        self.spec = spec
        self.pick = pick
        self.sampler = sampler  # the host chain of Pick.CHAIN
        self.draw = draw  # the settings and random stream of Pick.DRAW
        self.last = -1  # the token to decode next once generating
        self.n_tokens = 0
        self.decoder = TokenTextDecoder()
        self.stopper = StopMatcher(spec.stops) if spec.stops else None
        self.text: list[str] = []
        self.spelled: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.stop_reason: StopReason | None = None

    def end(self, reason: StopReason) -> str:
        self.stop_reason = reason
        flushed = self.decoder.flush()
        self.spelled.append(flushed)
        tail = flushed
        if self.stopper is not None:
            tail = self.stopper.feed(flushed) + self.stopper.flush()
        self.text.append(tail)
        if self.sampler is not None:
            self.sampler.free()
        return tail

    def reply(self) -> Reply:
        assert self.stop_reason is not None
        text, spelled = "".join(self.text), "".join(self.spelled)
        return Reply(text, spelled, self.n_tokens, self.logprobs, self.stop_reason)


def _by_rows(
    fn: Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]], logits: npt.NDArray[np.float32]
) -> npt.NDArray[Any]:
    """``fn`` over a step's logits rows, split into slices of rows, one per thread of the
    pool, when there are enough logits to be worth it; its results, in row order. ``fn``
    must be one numpy pass that lets go of the GIL: work that holds it only queues up."""
    n_rows = len(logits)
    shares = min(_ARGMAX_THREADS, logits.size // _ARGMAX_SPLIT, n_rows)
    if shares <= 1:
        return fn(logits)
    bounds = np.linspace(0, n_rows, shares + 1).astype(int).tolist()
    parts = [logits[a:b] for a, b in itertools.pairwise(bounds)]
    return np.concatenate(list(_argmax_pool.map(fn, parts)))


def _row_argmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
    return logits.argmax(axis=1)  # type: ignore[no-any-return]


class Stepper:
    """Replies on the sequences of one context. Engine thread only.

    ``one_per_step`` (lmxd's ``--deterministic``): each step carries one sequence only, in
    turn, so that every sequence is computed exactly as it would be alone. llama.cpp's
    kernels take other paths for other batch sizes (on the CPU once a batch holds 64 tokens
    or more; on a GPU by batch size): decoding with other agents, or a prompt prefilled in
    one batch with theirs, can flip a near-tied greedy token.
    """

    def __init__(self, context: Context, one_per_step: bool = False) -> None:
        self.ctx = context
        self.one_per_step = one_per_step
        self._pieces = context.model.pieces
        self._eog = context.model.end_of_generation
        self._work: dict[int, _Work] = {}

    def start(self, seq: int, prompt: Sequence[int], spec: ReplySpec) -> None:
        """Sequence ``seq`` decodes ``prompt`` (at least one token: its logits start the
        reply), then generates a reply as ``spec`` says."""
        self.ctx.model.engine.check_thread()
        if not prompt:
            raise InvalidInput("nothing to decode: a reply starts from the logits of a new token")
        if spec.max_tokens <= 0:
            raise InvalidInput("max_tokens must be > 0", max_tokens=spec.max_tokens)
        self.drop(seq)
        sampler = None
        pick = spec.pick
        if pick is Pick.DEVICE:
            self.ctx.use_device_chain(seq, spec.sampling)
        else:
            self.ctx.use_host_sampling(seq)
        if pick is Pick.CHAIN:
            model = self.ctx.model
            sampler = Sampler(spec.sampling, model.vocab, model.n_vocab, spec.history, spec.grammar)
        draw = Draw.start(spec.sampling) if pick is Pick.DRAW else None
        self._work[seq] = _Work(seq, list(prompt), spec, pick, sampler, draw)

    def cancel(self, seq: int) -> Reply | None:
        """End ``seq``'s reply now (CANCELLED); None if it has none."""
        work = self._work.pop(seq, None)
        if work is None:
            return None
        unsent = work.end(StopReason.CANCELLED) if work.stop_reason is None else ""
        text, spelled = "".join(work.text), "".join(work.spelled)
        return Reply(text, spelled, work.n_tokens, work.logprobs, StopReason.CANCELLED, unsent)

    def drop(self, seq: int) -> None:
        """Forget ``seq``'s reply, if any (its job failed, or its agent left)."""
        work = self._work.pop(seq, None)
        if work is not None and work.sampler is not None:
            work.sampler.free()

    def run(
        self,
        seqs: Sequence[int],
        max_steps: int,
        control: SliceControl | None = None,
        emit: Emit | None = None,
    ) -> dict[int, SeqReport]:
        """Up to ``max_steps`` steps over ``seqs``. Ends early when a reply ends (the
        scheduler has to see it), when ``control.stop`` is set, or when every sequence is
        paused. A decode that fails raises; the sequences keep what llama.cpp holds."""
        self.ctx.model.engine.check_thread()
        reports = {seq: SeqReport() for seq in seqs}
        live = [self._work[seq] for seq in seqs if seq in self._work]
        for step in range(max_steps):
            if control is not None:
                if step and control.stop:
                    break
                if control.paused:
                    live = [w for w in live if w.seq not in control.paused]
            if not live:
                break
            batch = [live[step % len(live)]] if self.one_per_step else live
            pieces, ended = self._step(batch, reports)
            if pieces and emit is not None:
                emit(pieces)
            if ended:
                break
        for seq, report in reports.items():
            report.kv_tokens = self.ctx.seq_len[seq]
            work = self._work.get(seq)
            if work is not None and work.stop_reason is not None:
                report.reply = work.reply()
                del self._work[seq]
        return reports

    def generate(self, seq: int, prompt: Sequence[int], spec: ReplySpec) -> Reply:
        """One reply on one sequence, to its end: the loop above with nothing else in it."""
        self.start(seq, prompt, spec)
        while True:
            reply = self.run([seq], 1 << 30)[seq].reply
            if reply is not None:
                return reply

    # -- one step ----------------------------------------------------------------------------

    def _step(
        self, live: list[_Work], reports: dict[int, SeqReport]
    ) -> tuple[list[tuple[int, Piece]], bool]:
        """One decode over ``live``: generating sequences first, one token each, then prompt
        chunks in the room left of n_batch. Returns the pieces and whether a reply ended."""
        ctx = self.ctx
        budget = ctx.n_batch
        seq_len = ctx.seq_len
        seqs: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        want: list[int] = []
        due: list[tuple[_Work, int]] = []  # sequences whose logits are read, by row
        prefilling: set[_Work] = set()
        for w in live:
            if not w.pending and budget > 0:
                due.append((w, len(tokens)))
                seqs.append(w.seq)
                tokens.append(w.last)
                positions.append(seq_len[w.seq])
                want.append(1)
                budget -= 1
        for w in live:
            if w.pending and budget > 0:
                chunk = w.pending[:budget]
                n, start = len(chunk), seq_len[w.seq]
                del w.pending[:n]
                seqs += [w.seq] * n
                tokens += chunk
                positions += range(start, start + n)
                want += [0] * n
                if not w.pending:
                    want[-1] = 1
                    due.append((w, len(tokens) - 1))
                budget -= n
                prefilling.add(w)
        t0 = time.perf_counter()
        ctx.decode(seqs, tokens, positions, want)
        picked = self._host_picks([w for w, _ in due])
        pieces: list[tuple[int, Piece]] = []
        ended = False
        for k, (w, row) in enumerate(due):
            if k in picked:
                token = picked[k]
            elif w.pick is Pick.DEVICE:
                token = ctx.sampled_token(row)
            else:
                assert w.sampler is not None
                token = w.sampler.sample(ctx.ptr, row)
            piece = self._accept(w, token, row, reports[w.seq])
            if piece is not None and w.spec.stream:
                pieces.append((w.seq, piece))
            ended = ended or w.stop_reason is not None
        # On a GPU llama_decode returns once the step is queued: the step has run when its
        # tokens are read, so that is when its time is taken (a prompt's chunks whose logits
        # nobody reads are waited for by the next step's, which is the same prompt's).
        elapsed = time.perf_counter() - t0
        for w in prefilling:
            reports[w.seq].prefill_s += elapsed
        for w, _ in due:
            if w not in prefilling:
                reports[w.seq].decode_s += elapsed
        return pieces, ended

    def _host_picks(self, due: list[_Work]) -> dict[int, int]:
        """The tokens numpy picks for the step's logits rows (``due``, in row order): the
        argmax of greedy rows, a draw for Pick.DRAW rows. Each is one pass over the rows'
        logits, split over threads when there are many."""
        greedy = [k for k, w in enumerate(due) if w.pick is Pick.ARGMAX]
        drawn = [k for k, w in enumerate(due) if w.pick is Pick.DRAW]
        if not greedy and not drawn:
            return {}
        logits = self.ctx.logits(len(due))
        picked: dict[int, int] = {}
        if greedy:
            rows = logits if len(greedy) == len(due) else logits[greedy]
            picked.update(zip(greedy, _by_rows(_row_argmax, rows).tolist(), strict=True))
        if drawn:
            some = logits if len(drawn) == len(due) else logits[drawn]
            draws = [w.draw for w in (due[k] for k in drawn) if w.draw is not None]
            # Only the pass over the whole vocabulary is split over threads: the draw from
            # the groups' best is many small numpy calls, which hold the GIL.
            tokens = draw(some, _by_rows(group_maxima, some), draws)
            picked.update(zip(drawn, tokens, strict=True))
        return picked

    def _accept(self, w: _Work, token: int, row: int, report: SeqReport) -> Piece | None:
        """``w``'s next token is ``token`` (sampled from ``row``); its new visible text."""
        ctx = self.ctx
        if token in self._eog:
            tail = w.end(StopReason.EOS)
            return Piece(tail) if tail else None
        logprobs: tuple[TokenLogprob, ...] = ()
        if w.spec.top_logprobs is not None:
            entry = self._logprob(row, token, w.spec.top_logprobs)
            w.logprobs.append(entry)
            logprobs = (entry,)
        w.last = token
        w.n_tokens += 1
        report.generated.append(token)
        text = w.decoder.feed(self._pieces[token])
        w.spelled.append(text)
        if w.stopper is not None:
            text = w.stopper.feed(text)
            if w.stopper.stopped:
                w.text.append(text)
                w.end(StopReason.STOP)
                return Piece(text, logprobs) if text or logprobs else None
        w.text.append(text)
        limit = min(w.spec.limit or ctx.n_ctx_seq, ctx.n_ctx_seq)
        if w.n_tokens >= w.spec.max_tokens:
            text += w.end(StopReason.LENGTH)
        elif ctx.seq_len[w.seq] + 1 >= limit:
            text += w.end(StopReason.CONTEXT)
        return Piece(text, logprobs) if text or logprobs else None

    def _logprob(self, row: int, token: int, top: int) -> TokenLogprob:
        """The model's log probability of ``token`` and of its ``top`` best alternatives, from
        the raw logits (before any sampler or grammar reshaped them)."""
        n_vocab = self.ctx.model.n_vocab
        raw = llama_cpp.llama_get_logits_ith(self.ctx.ptr, row)
        logits = np.ctypeslib.as_array(raw, shape=(n_vocab,)).astype(np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argpartition(-logprobs, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-logprobs[best])]

        def entry(t: int) -> TopLogprob:
            data = self._pieces[t]
            text = data.decode("utf-8", errors="replace")
            return TopLogprob(text, list(data), float(logprobs[t]))

        chosen = entry(token)
        return TokenLogprob(
            chosen.token, chosen.bytes, chosen.logprob, [entry(int(t)) for t in best]
        )
