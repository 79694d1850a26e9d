"""What a job hands the engine: its conversation as tokens, and how its reply begins.

:func:`tokenize` renders the job's prompt (:func:`conversation` says which text still has to
be tokenized after which tokens) before the job is seated, since how many KV cells it needs
decides where it goes; :func:`begin`, once it has a sequence, keeps what KV holds of the
conversation (:func:`common_prefix`) and starts its reply on the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmxd.chat.messages import ChatMessage
from lmxd.engine.stepper import ReplySpec
from lmxd.engine.worker import Worker
from lmxd.errors import InvalidInput, PromptTooLong
from lmxd.scheduler.agents import Agent
from lmxd.scheduler.jobs import ChatTurn, Job, TextPrompt


@dataclass(frozen=True)
class ToTokenize:
    """The conversation once the job's prompt is in: ``prefix`` then ``text`` tokenized."""

    prefix: list[int]
    text: str
    add_special: bool


def conversation(agent: Agent, job: Job) -> ToTokenize:
    """The tokens of the whole conversation once this job's prompt is in; records on ``job``
    what the reply will need (its stops, the rendered text, the history it continues).

    A rendered conversation that extends the text the agent's tokens spell needs only its new
    text tokenized: the tokens the model generated stay exactly as they are in KV, even where
    tokenizing the reply's text afresh would split it differently.
    """
    prompt = job.request.prompt
    if isinstance(prompt, TextPrompt):
        job.stops = job.request.stops
        text = prompt.text
        if not agent.tokens and agent.system_prompt:
            text = agent.system_prompt + text
        return ToTokenize(list(agent.tokens), text, not agent.tokens)
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
        return ToTokenize(list(agent.tokens), rendered.text[len(known) :], False)
    return ToTokenize([], rendered.text, rendered.add_bos)


def common_prefix(held: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens ``held`` (what KV holds) and ``tokens`` share."""
    n = min(len(held), len(tokens))
    keep = 0
    while keep < n and held[keep] == tokens[keep]:
        keep += 1
    return keep


async def tokenize(worker: Worker, agent: Agent, job: Job) -> list[int]:
    """The agent's conversation with the job's prompt in, as tokens (before it is seated:
    how many KV cells the job needs decides where it goes)."""
    want = conversation(agent, job)
    tokens = want.prefix + await worker.tokenize(agent.slot.model, want.text, want.add_special)
    if not tokens:
        raise InvalidInput("the prompt is empty and the conversation has nothing to continue")
    if len(tokens) >= agent.n_ctx:
        raise PromptTooLong(
            f"the conversation would be {len(tokens)} tokens; agent {agent.id!r} has n_ctx "
            f"{agent.n_ctx} (RESET it, or register it with a larger n_ctx)",
            tokens=len(tokens),
            n_ctx=agent.n_ctx,
        )
    return tokens


async def begin(worker: Worker, agent: Agent, job: Job) -> None:
    """Keep what KV holds of the job's conversation, and start its reply.

    The agent's conversation continues: the longest prefix of the new conversation that
    KV already holds is kept and only the rest is prefilled (a conversation that diverged,
    or a reply a template renders differently from the tokens generated, loses only its
    tail).
    """
    slot, seq, tokens = agent.slot, agent.seq, job.conversation
    assert slot.context is not None and seq is not None and tokens is not None
    # At least one token to decode: its logits start the reply.
    keep = min(common_prefix(agent.tokens[: agent.kv], tokens), len(tokens) - 1)
    request = job.request
    spec = ReplySpec(
        max_tokens=request.max_tokens,
        sampling=job.sampling,
        stops=job.stops,
        limit=agent.n_ctx,
        history=tuple(tokens) if job.sampling.penalised else (),
        grammar=request.grammar,
        top_logprobs=request.top_logprobs,
        stream=job.events is not None,
    )
    kept = await worker.begin(slot.context, seq, tokens, keep, spec)
    agent.tokens, agent.kv = tokens, kept
    job.started = True
    job.prompt_tokens = len(tokens) - kept
    job.cached_tokens = kept
