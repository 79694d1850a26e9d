"""Scheduling: agents and their states, models and their contexts, and the step loop.

One asyncio task (``Scheduler.run``) owns all of it; the engine thread only executes the steps
it is handed. See ``core.py`` for the loop, ``agents.py`` for an agent's life, ``slots.py`` for
a model's.
"""

from lmxd.scheduler.agents import Agent, AgentState, Job
from lmxd.scheduler.core import Scheduler, SchedulerConfig

__all__ = ["Agent", "AgentState", "Job", "Scheduler", "SchedulerConfig"]
