"""What one step does: which tokens go in the batch, and the engine-thread work itself.

``prepare`` and ``run_step`` run on the engine thread (they call llama.cpp); ``plan_step`` is
plain bookkeeping on the scheduler's side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmxd.chat.messages import ChatMessage
from lmxd.engine.context import SeqBatch
from lmxd.engine.generate import Generation
from lmxd.errors import InvalidInput, LmxdError, PromptTooLong
from lmxd.scheduler.agents import Agent
from lmxd.scheduler.jobs import ChatTurn, Job, Piece, TextPrompt
from lmxd.scheduler.slots import ModelSlot


@dataclass
class Plan:
    """One step's batch: per agent, the tokens it decodes now."""

    budget: int  # tokens one step may carry (n_batch)
    entries: list[tuple[Agent, list[int]]] = field(default_factory=list)
    prefilling: set[Agent] = field(default_factory=set)  # agents still in their prompt

    def fitted(self, cells: int) -> Plan:
        """The same step trimmed to ``cells`` free KV cells (prompt chunks shrink first)."""
        out = Plan(self.budget, prefilling=self.prefilling)
        for agent, tokens in sorted(self.entries, key=lambda e: e[0] in self.prefilling):
            take = tokens[: max(0, cells)]
            if take:
                out.entries.append((agent, take))
                cells -= len(take)
        return out


def plan_step(active: list[Agent], n_batch: int) -> Plan:
    """Generating agents bring their last token; prompts fill the rest of the batch."""
    plan = Plan(n_batch)
    budget = n_batch
    for agent in sorted(active, key=lambda a: a.jobs[0].generation is None):
        job = agent.jobs[0]
        if job.generation is not None:
            tokens = [job.generation.tokens[-1]]
        else:
            tokens = job.pending[:budget]
            plan.prefilling.add(agent)
        if tokens:
            plan.entries.append((agent, tokens))
            budget -= len(tokens)
        if budget <= 0:
            break
    return plan


def _conversation(agent: Agent, job: Job) -> list[int]:
    """Engine thread: the tokens of the whole conversation once this job's prompt is in.

    A rendered conversation that extends the text the agent's tokens spell needs only its new
    text tokenized: the tokens the model generated stay exactly as they are in KV, even where
    tokenizing the reply's text afresh would split it differently.
    """
    model, prompt = agent.slot.model, job.request.prompt
    if isinstance(prompt, TextPrompt):
        job.stops = job.request.stops
        text = prompt.text
        if not agent.tokens and agent.system_prompt:
            text = agent.system_prompt + text
        return agent.tokens + model.tokenize(text, add_special=not agent.tokens)
    if isinstance(prompt, ChatTurn):
        system = [ChatMessage("system", agent.system_prompt)] if agent.system_prompt else []
        messages = [*(agent.history or system), *prompt.messages]
        rendered = agent.slot.chat.render(messages)
    else:
        messages, rendered = list(prompt.messages), prompt.rendered
    job.text, job.add_bos, job.history = rendered.text, rendered.add_bos, messages
    job.stops = (*job.request.stops, *rendered.stops)
    known = agent.text
    if known is not None and agent.text_bos == rendered.add_bos and rendered.text.startswith(known):
        return agent.tokens + model.tokenize(rendered.text[len(known) :], add_special=False)
    return model.tokenize(rendered.text, add_special=rendered.add_bos)


def prepare(agent: Agent, job: Job) -> None:
    """Engine thread: the tokens this job adds to the conversation, checked against n_ctx.

    The agent's conversation continues: the longest prefix of the new conversation that KV
    already holds is kept and only the rest is prefilled (a conversation that diverged, or a
    reply a template renders differently from the tokens generated, loses only its tail).
    """
    ctx = agent.slot.context
    assert ctx is not None and agent.seq is not None
    tokens = _conversation(agent, job)
    if not tokens:
        raise InvalidInput("the prompt is empty and the conversation has nothing to continue")
    if len(tokens) >= agent.n_ctx:
        raise PromptTooLong(
            f"the conversation would be {len(tokens)} tokens; agent {agent.id!r} has n_ctx "
            f"{agent.n_ctx} (RESET it, or register it with a larger n_ctx)",
            tokens=len(tokens),
            n_ctx=agent.n_ctx,
        )
    in_kv = ctx.seq_len[agent.seq]
    keep = 0
    while keep < min(in_kv, len(tokens)) and tokens[keep] == agent.tokens[keep]:
        keep += 1
    keep = min(keep, len(tokens) - 1)  # at least one token to decode: its logits start the reply
    ctx.truncate_seq(agent.seq, keep)
    keep = ctx.seq_len[agent.seq]  # 0 if a sliding-window cache had to be cleared
    agent.tokens = tokens
    job.pending = tokens[keep:]
    job.prompt_tokens = len(job.pending)
    job.cached_tokens = keep


def run_step(slot: ModelSlot, plan: Plan) -> list[tuple[Agent, Piece]]:
    """Engine thread: one decode over the plan, then sample for every agent that is due."""
    ctx = slot.context
    assert ctx is not None
    batch = []
    for agent, tokens in plan.entries:
        assert agent.seq is not None
        job = agent.jobs[0]
        due = job.generation is not None or len(tokens) == len(job.pending)
        batch.append(SeqBatch(agent.seq, tokens, want_logits=due))
    outs = ctx.decode(batch)
    pieces = []
    for agent, tokens in plan.entries:
        job, seq = agent.jobs[0], agent.seq
        assert seq is not None
        if job.generation is None:
            del job.pending[: len(tokens)]
            if job.pending:
                continue
            request = job.request
            try:
                job.generation = Generation(
                    ctx,
                    seq,
                    request.max_tokens,
                    job.sampling,
                    job.stops,
                    n_ctx_limit=agent.n_ctx,
                    history=agent.tokens,
                    grammar=request.grammar,
                    top_logprobs=request.top_logprobs,
                )
            except LmxdError as exc:  # this job's own settings: its batchmates go on
                job.error = exc
                continue
        gen = job.generation
        before, scored = len(gen.tokens), len(gen.logprobs)
        token, text = gen.sample(outs[seq])
        if len(gen.tokens) > before:  # an end-of-generation token is not kept
            agent.tokens.append(token)
        logprobs = tuple(gen.logprobs[scored:])
        if text or logprobs:
            pieces.append((agent, Piece(text, logprobs)))
    return pieces


def run_steps(
    slot: ModelSlot, plan: Plan, max_steps: int, emit: Callable[[Job, Piece], None]
) -> None:
    """Engine thread: up to ``max_steps`` steps for the same agents, without a round trip to
    the event loop between them (each costs about as much as a small model's step).

    Stops early when a job ends, fails or is cancelled (the scheduler then admits or
    finishes), when a DECODE for this model was submitted meanwhile (it joins the batch at the
    next step instead of after the slice: requests arriving a few milliseconds apart, as HTTP
    requests on several connections do, share their prefill), or when the next step would
    need KV cells that only parking can free. An agent whose stream fills up sits out the rest
    of the slice; the others go on. Pieces go out through ``emit`` as they are sampled.
    """
    agents = [agent for agent, _ in plan.entries]
    submitted = slot.submitted  # read across threads: an int, written by the event loop
    for step in range(max_steps):
        if step:
            if slot.submitted != submitted:
                return
            agents = [agent for agent in agents if not agent.jobs[0].stream_full]
            if not agents:
                return
            plan = plan_step(agents, plan.budget)
            if slot.free_cells() < sum(len(t) for _, t in plan.entries):
                return
        t0 = time.perf_counter()
        pieces = run_step(slot, plan)
        elapsed = time.perf_counter() - t0
        for agent, _ in plan.entries:
            timings = agent.jobs[0].timings
            if agent in plan.prefilling:
                timings.prefill += elapsed
            else:
                timings.decode += elapsed
        for agent, piece in pieces:
            emit(agent.jobs[0], piece)
        if any(_must_yield(agent.jobs[0]) for agent in agents):
            return


def _must_yield(job: Job) -> bool:
    """The scheduler has to see this job before its next step."""
    gen = job.generation
    ended = (gen is not None and gen.done) or job.error is not None
    return ended or job.cancelled
