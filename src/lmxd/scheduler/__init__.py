"""Scheduling: agents and their states, models and their contexts, and the step loop.

One asyncio task (``Scheduler.run``) owns all of it; the engine executes what it is handed,
through the ``Worker`` protocol. See ``core.py`` for the loop and admission, ``residency.py``
for contexts, parking and KV by use, ``agents.py`` for an agent's two states, ``jobs.py`` and
``steps.py`` for a DECODE's way to the engine, ``endings.py`` for its reply, ``slots.py`` and
``models.py`` for a model's life.
"""

from lmxd.scheduler.agents import Activity, Agent, Memory
from lmxd.scheduler.core import Scheduler, SchedulerConfig
from lmxd.scheduler.jobs import (
    ChatTurn,
    Conversation,
    DecodeRequest,
    Job,
    Prompt,
    TextPrompt,
)

__all__ = [
    "Activity",
    "Agent",
    "ChatTurn",
    "Conversation",
    "DecodeRequest",
    "Job",
    "Memory",
    "Prompt",
    "Scheduler",
    "SchedulerConfig",
    "TextPrompt",
]
