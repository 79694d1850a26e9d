"""What a job hands the engine: the conversation to tokenize, and what KV holds of it.

:func:`conversation` renders the job's prompt and says which text still has to be tokenized
after which tokens; :func:`common_prefix` finds how much of the result KV holds already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmxd.chat.messages import ChatMessage
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
