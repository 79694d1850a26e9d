"""Scheduling: agents and their states, models and their contexts, and the step loop.

One asyncio task (``Scheduler.run``) owns all of it; the engine thread only executes the steps
it is handed. See ``core.py`` for the loop, ``agents.py`` for an agent's life, ``jobs.py`` for
a DECODE's, ``slots.py`` for a model's.
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
