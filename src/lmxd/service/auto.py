"""Auto-agents: how the stateless HTTP API keeps stateful conversations.

The OpenAI API resends the whole conversation with every request. When a request names a
model rather than an agent, lmxd serves it with one of that model's auto-agents, chosen so that
as much of the conversation as possible is already in KV:

1. an idle auto-agent whose conversation the request continues (its text is a prefix of the
   request's): only the new messages are prefilled;
2. else a new auto-agent, while the model has fewer than ``limit``: other conversations keep
   their KV;
3. else the idle auto-agent sharing the longest prefix with the request (least recently used
   on a tie): its KV keeps the common prefix and the rest is prefilled;
4. else (all busy) the one with the fewest jobs waiting: the request queues behind them.

Auto-agents are ordinary agents to the scheduler (admitted by the ledger, parked, restored);
an auto-agent idle for ``ttl_s`` is unregistered. So is an agent that the X-Lmxd-Agent
header named into existence (:meth:`AutoAgents.adopt_named`), which is never picked for
another conversation.
"""

from __future__ import annotations

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


@dataclass
class AutoAgents:
    scheduler: Scheduler
    limit: int  # auto-agents per model
    ttl_s: float  # idle time after which an auto-agent is unregistered
    _pools: dict[str, list[str]] = field(default_factory=dict)  # model path -> agent ids
    _pending: set[str] = field(default_factory=set)  # adopted, their REGISTER not done yet
    _named: set[str] = field(default_factory=set)  # created for the X-Lmxd-Agent header
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def ids(self) -> set[str]:
        """Every auto-agent still registered (a client may unregister one itself)."""
        agents = self.scheduler.agents
        pooled = {a for pool in self._pools.values() for a in pool}
        return {a for a in pooled | self._named if a in agents}

    def pool(self, path: str) -> list[Agent]:
        """``path``'s auto-agents that are registered (forgetting those that went away)."""
        agents = self.scheduler.agents
        self._pools[path] = [
            a for a in self._pools.get(path, []) if a in agents or a in self._pending
        ]
        return [agents[a] for a in self._pools[path] if a in agents]

    def count(self, path: str) -> int:
        """``path``'s auto-agents, those being registered included."""
        self.pool(path)
        return len(self._pools[path])

    def new_id(self, model: str) -> str:
        while True:
            candidate = f"auto-{_slug(model)}-{next(self._serial)}"
            if candidate not in self.scheduler.agents:
                return candidate

    def adopt(self, path: str, agent_id: str) -> None:
        """Count ``agent_id`` among ``path``'s auto-agents (TTL and choice apply to it) from
        now, while its REGISTER runs: requests arriving meanwhile see the pool's true size."""
        self._pools.setdefault(path, []).append(agent_id)
        self._pending.add(agent_id)

    def adopt_named(self, agent_id: str) -> None:
        """An agent the header named: TTL applies, choice does not."""
        self._named.add(agent_id)

    def registered(self, agent_id: str) -> None:
        """Its REGISTER ended (if it failed, the agent is forgotten at the next look)."""
        self._pending.discard(agent_id)

    def pick(self, path: str, text: str, add_bos: bool) -> str | None:
        """The auto-agent to serve a conversation of this text; None: register a new one."""
        agents = self.pool(path)
        idle = [a for a in agents if not a.jobs]
        continued = [
            a
            for a in idle
            if a.text is not None and a.text_bos == add_bos and text.startswith(a.text)
        ]
        if continued:
            return max(continued, key=lambda a: len(a.text or "")).id
        if self.count(path) < self.limit:
            return None
        if idle:
            return max(idle, key=lambda a: (_shared(a, text), -a.last_used)).id
        return max(agents, key=lambda a: (-len(a.jobs), _shared(a, text))).id

    def expired(self, now: float | None = None) -> list[str]:
        """Auto-agents idle for longer than the TTL."""
        now = time.time() if now is None else now
        agents = self.scheduler.agents
        self._named &= set(agents)
        candidates = [a for path in list(self._pools) for a in self.pool(path)]
        candidates += [agents[a] for a in self._named]
        return [a.id for a in candidates if not a.jobs and now - a.last_used > self.ttl_s]


def _shared(agent: Agent, text: str) -> int:
    """Characters of ``text`` that ``agent``'s conversation starts with too."""
    known = agent.text or ""
    n = 0
    for a, b in zip(known, text, strict=False):
        if a != b:
            break
        n += 1
    return n
