"""The daemon's operations, as plain calls returning JSON-ready values.

Both wire front-ends (JSON lines in ``server.py``, the article's text protocol in
``textproto.py``) call these; neither touches the scheduler's tables directly.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmxd import __version__, protocol
from lmxd.engine.model import ChatMessage
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import Forbidden
from lmxd.memory.device import probe_device
from lmxd.memory.estimator import estimate
from lmxd.scheduler import Job, Scheduler
from lmxd.scheduler.agents import JobResult


@dataclass(frozen=True)
class Limits:
    max_queue: int
    default_n_ctx: int
    park_budget: int


def sampling_params(base: SamplingParams, spec: protocol.Sampling | None) -> SamplingParams:
    """``base`` with the fields ``spec`` sets (validated by SamplingParams)."""
    if spec is None:
        return base
    overrides = {k: v for k, v in protocol.to_builtins(spec).items() if v is not None}
    return SamplingParams(**{**base.__dict__, **overrides})


def result_fields(result: JobResult) -> dict[str, Any]:
    return {
        "agent": result.agent,
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": result.generated_tokens,
        "stop_reason": result.stop_reason.value,
        "timings_ms": result.timings_ms,
        "restored": result.restored,
        "parked": result.parked,
        "tokens_per_s": result.tokens_per_s,
    }


class Service:
    def __init__(
        self, scheduler: Scheduler, limits: Limits, on_stop: Callable[[], None],
        device_index: int = 0,
    ) -> None:  # fmt: skip
        self.scheduler = scheduler
        self.limits = limits
        self.on_stop = on_stop
        self.device_index = device_index
        self.started = time.monotonic()

    async def register(self, req: protocol.Register) -> dict[str, Any]:
        sampling = sampling_params(SamplingParams(), req.sampling)
        return await self.scheduler.register(
            req.agent, req.model, req.n_ctx, sampling, req.system_prompt
        )

    def decode(self, req: protocol.Decode) -> Job:
        agent = self.scheduler.agents.get(req.agent)
        base = agent.sampling if agent is not None else SamplingParams()
        messages = [ChatMessage(m.role, m.content) for m in req.messages] if req.messages else None
        return self.scheduler.submit(
            req.agent, req.prompt, messages, req.max_tokens,
            sampling_params(base, req.sampling), req.stop, req.stream,
        )  # fmt: skip

    def shutdown(self, peer_uid: int | None) -> dict[str, Any]:
        if peer_uid != os.getuid():
            raise Forbidden(
                "only the daemon's own user may shut it down",
                peer_uid=peer_uid, daemon_uid=os.getuid(),
            )  # fmt: skip
        # Answer first: the daemon stops once this reply is on its way.
        asyncio.get_running_loop().call_soon(self.on_stop)
        return {"stopping": True}

    def hello(self) -> dict[str, Any]:
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "version": __version__,
            "limits": {
                "max_line_bytes": protocol.MAX_LINE_BYTES,
                "max_queue": self.limits.max_queue,
                "default_n_ctx": self.limits.default_n_ctx,
                "park_budget": self.limits.park_budget,
            },
            "device": protocol.to_builtins(probe_device(self.device_index)),
        }

    def status(self) -> dict[str, Any]:
        sched = self.scheduler
        ledger = sched.ledger
        by_model: dict[str, dict[str, int]] = {}
        by_agent: dict[str, int] = {}
        for slot in sched.room.slots.values():
            weights = next(iter(slot.weights.values())).bytes if slot.weights else 0
            context = slot.context_reservation.bytes if slot.context_reservation else 0
            by_model[slot.key] = {"weights": weights, "context": context}
            per_token = estimate(slot.info, 1).kv_per_token
            for agent in slot.agents.values():
                by_agent[agent.id] = agent.kv_tokens * per_token if agent.seq is not None else 0
        return {
            "device": protocol.to_builtins(probe_device(self.device_index)),
            "ledger": {
                "cap": ledger.cap,
                "reserved": ledger.reserved,
                "by_owner": ledger.snapshot(),
                "by_model": by_model,
                "by_agent": by_agent,
            },
            "parked_host_bytes": sched.room.store.used,
            "transfers": protocol.to_builtins(sched.room.transfers),
            "park_budget": sched.room.store.budget,
            "queue": {
                "depth": sum(len(a.jobs) for a in sched.agents.values()),
                "max": self.limits.max_queue,
            },
            "agents": len(sched.agents),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def list_agents(self) -> dict[str, Any]:
        return {
            "agents": [
                {
                    "agent": a.id,
                    "model": a.slot.key,
                    "state": a.state.value,
                    "n_ctx": a.n_ctx,
                    "tokens": len(a.tokens),
                    "kv_tokens": a.kv_tokens,
                    "last_used": round(a.last_used, 3),
                }
                for a in self.scheduler.agents.values()
            ]
        }

    def models(self) -> dict[str, Any]:
        out = []
        for slot in self.scheduler.room.slots.values():
            out.append({
                "model": slot.key,
                "path": str(slot.path),
                "refcount": len(slot.agents),
                "weights_bytes": slot.model.device_weight_bytes,
                "context_bytes": slot.context_reservation.bytes if slot.context_reservation else 0,
                "n_seq": len(slot.seqs),
                "pool_cells": slot.pool_cells,
                "used_cells": slot.used_cells(),
            })  # fmt: skip
        return {"models": out}
