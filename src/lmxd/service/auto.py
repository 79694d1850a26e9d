"""Auto-agents: how the stateless HTTP API keeps stateful conversations.

The OpenAI API resends the whole conversation with every request. When a request names a
model rather than an agent, lmxd serves it with one of that model's auto-agents, chosen so that
as much of the conversation as possible is already in KV:

1. an idle auto-agent whose last prompt the request holds whole (the request continues that
   conversation, or retries its last turn): only what follows is prefilled;
2. else a new auto-agent, while the model has fewer than ``limit`` agents the API made:
   other conversations keep their KV;
3. else the idle auto-agent sharing the longest prefix with the request (least recently used
   on a tie): its KV keeps the common prefix and the rest is prefilled;
4. else (all busy) the one with the fewest jobs waiting: the request queues behind them.

Choosing and submitting happen under one lock per model, so two requests never take the same
idle agent for two conversations, and an expiring agent is never taken as it goes.
Auto-agents are ordinary agents to the scheduler (admitted by the ledger, parked, restored);
one idle for ``ttl_s`` is unregistered. So is an agent that the X-Lmxd-Agent header named into
existence (:meth:`AutoAgents.adopt_named`), which counts against ``limit`` but is never chosen
for another conversation.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from dataclasses import dataclass, field

from lmxd.scheduler import Agent, Scheduler


def _slug(model: str) -> str:
    """A model's name as it can appear in an agent id."""
    stem = os.path.basename(model).removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", stem).strip("-._")[:40] or "model"


def shared(a: str, b: str) -> int:
    """The length of the common prefix of two texts (a binary search over C-level slice
    compares: conversations are thousands of characters and this runs on the event loop)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class AutoAgents:
    scheduler: Scheduler
    limit: int  # agents the API makes, per model
    ttl_s: float  # idle time after which one is unregistered
    _pools: dict[str, list[str]] = field(default_factory=dict)  # model path -> auto-agent ids
    _named: dict[str, str] = field(default_factory=dict)  # header-named agent id -> model path
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def lock(self, path: str) -> asyncio.Lock:
        """Held while a request for the model at ``path`` chooses its agent and submits."""
        return self._locks.setdefault(path, asyncio.Lock())

    def ids(self) -> set[str]:
        """Every agent the API made that is still registered (a client may unregister one)."""
        agents = self.scheduler.agents
        made = {a for pool in self._pools.values() for a in pool} | set(self._named)
        return {a for a in made if a in agents}

    def pool(self, path: str) -> list[Agent]:
        """``path``'s auto-agents (forgetting those that went away)."""
        agents = self.scheduler.agents
        self._pools[path] = [a for a in self._pools.get(path, []) if a in agents]
        return [agents[a] for a in self._pools[path]]

    def count(self, path: str) -> int:
        """Agents the API made for the model at ``path``."""
        named = [a for a, p in self._named.items() if p == path and a in self.scheduler.agents]
        return len(self.pool(path)) + len(named)

    def new_id(self, model: str) -> str:
        while True:
            candidate = f"auto-{_slug(model)}-{next(self._serial)}"
            if candidate not in self.scheduler.agents:
                return candidate

    def adopt(self, path: str, agent_id: str) -> None:
        self._pools.setdefault(path, []).append(agent_id)

    def adopt_named(self, path: str, agent_id: str) -> None:
        """An agent the header named: the TTL and the limit apply, choice does not."""
        self._named[agent_id] = path

    def pick(self, path: str, text: str, add_bos: bool) -> str | None:
        """The auto-agent to serve a conversation of this text; None: register a new one."""
        agents = self.pool(path)
        idle = [a for a in agents if not a.jobs]
        held = {a.id: shared(a.text, text) for a in agents if a.text is not None}
        continued = [
            a for a in idle if a.id in held and a.text_bos == add_bos and held[a.id] >= a.reply_at
        ]
        if continued:
            return max(continued, key=lambda a: held[a.id]).id
        if self.count(path) < self.limit or not agents:
            return None
        if idle:
            return max(idle, key=lambda a: (held.get(a.id, 0), -a.last_used)).id
        return max(agents, key=lambda a: (-len(a.jobs), held.get(a.id, 0))).id

    def expired(self, now: float | None = None) -> list[tuple[str, str, float]]:
        """(agent id, model path, idle since) of the agents the API made that have been idle
        for longer than the TTL."""
        now = time.time() if now is None else now
        agents = self.scheduler.agents
        self._named = {a: p for a, p in self._named.items() if a in agents}
        made = [(a.id, path) for path in list(self._pools) for a in self.pool(path)]
        made += list(self._named.items())
        cutoff = now - self.ttl_s
        return [
            (a, path, agents[a].last_used)
            for a, path in made
            if not agents[a].jobs and agents[a].last_used < cutoff
        ]
