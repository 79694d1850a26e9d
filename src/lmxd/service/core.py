"""The daemon's operations: the only way into the scheduler, shared by every front.

The JSON-lines front, the text protocol and the HTTP API each translate their wire into these
calls and the calls' typed results into their wire. None of them touches the scheduler's
objects: a DECODE comes back as a :class:`DecodeStream`, whose pieces and final
:class:`~lmxd.results.DecodeResult` are plain values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lmxd import __version__, catalog, protocol
from lmxd.chat.messages import ChatMessage
from lmxd.chat.template import Rendered
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import Forbidden, InvalidInput, LmxdError, PromptTooLong, UnknownAgent
from lmxd.memory.device import probe_device
from lmxd.memory.estimator import estimate
from lmxd.results import DecodeResult
from lmxd.scheduler import (
    AgentState,
    Conversation,
    DecodeRequest,
    Job,
    Piece,
    Scheduler,
)
from lmxd.service.auto import AutoAgents
from lmxd.service.views import AgentView, LoadedModel, Registered

log = logging.getLogger("lmxd.service")


@dataclass(frozen=True)
class Limits:
    max_queue: int
    default_n_ctx: int
    park_budget: int
    auto_agents: int = 8  # auto-agents per model (HTTP requests that name a model)
    auto_agent_ttl_s: float = 600.0


@dataclass(frozen=True)
class Exchange:
    """A request of the stateless HTTP API: the whole conversation (or prompt) every time."""

    model: str  # an agent's name, or a model's (catalog name, synthetic name, .gguf path)
    agent: str | None = None  # an agent named explicitly (the X-Lmxd-Agent header)
    messages: tuple[ChatMessage, ...] | None = None  # chat: the whole conversation
    prompt: str | None = None  # completion: the whole prompt, raw text
    max_tokens: int | None = None  # None: until the reply ends or the context is full
    sampling: Mapping[str, Any] | None = None
    stops: tuple[str, ...] = ()
    stream: bool = False
    grammar: str | None = None
    top_logprobs: int | None = None


class DecodeStream:
    """A DECODE in flight: its pieces if it was streamed, then its result."""

    def __init__(self, scheduler: Scheduler, job: Job) -> None:
        self._scheduler = scheduler
        self._job = job

    @property
    def agent(self) -> str:
        return self._job.agent.id

    @property
    def model(self) -> str:
        """The key of the agent's model."""
        return self._job.agent.slot.key

    async def pieces(self) -> AsyncIterator[Piece]:
        """The reply's pieces as they are generated (a stream that was not asked for has
        none); ends when the reply does. Stops the generation if the caller stops early."""
        events = self._job.events
        if events is None:
            return
        finished = False
        try:
            while (piece := await events.get()) is not None:
                self._scheduler.stream_read(self._job)
                yield piece
            finished = True
        finally:
            if not finished:
                self.cancel()

    async def result(self) -> DecodeResult:
        """The final reply; raises the error that ended the DECODE. Cancelling the awaiting
        task cancels the DECODE."""
        try:
            return await asyncio.shield(self._job.done)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Stop at the next token; :meth:`result` then says ``cancelled``."""
        if not self._job.done.done():
            self._scheduler.cancel(self._job)


class Service:
    def __init__(
        self,
        scheduler: Scheduler,
        limits: Limits,
        on_stop: Callable[[], None],
        device_index: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.limits = limits
        self.on_stop = on_stop
        self.device_index = device_index
        self.started = time.monotonic()
        self.started_at = time.time()
        self.http_url: str | None = None  # set once the HTTP front listens
        self.auto = AutoAgents(scheduler, limits.auto_agents, limits.auto_agent_ttl_s)
        # Counters since the start, by (model, agent): /metrics reads them.
        self.tokens: Counter[tuple[str, str, str]] = Counter()  # (model, agent, kind)
        self.decodes: Counter[tuple[str, str]] = Counter()  # (model, stop_reason or code)

    # -- agents ------------------------------------------------------------------------------

    async def register(
        self,
        agent: str,
        model: str,
        n_ctx: int | None = None,
        sampling: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
    ) -> Registered:
        params = SamplingParams(**(sampling or {}))
        got = await self.scheduler.register(
            agent, model, n_ctx or self.limits.default_n_ctx, params, system_prompt
        )
        return Registered(
            agent=got.id, model=got.slot.key, n_ctx=got.n_ctx, path=str(got.slot.path)
        )

    async def reset(self, agent: str) -> None:
        await self.scheduler.reset(agent)

    async def unregister(self, agent: str) -> None:
        await self.scheduler.unregister(agent)

    def decode(self, request: DecodeRequest) -> DecodeStream:
        """Queue a DECODE of a registered agent (raises UNKNOWN_AGENT, BUSY...)."""
        job = self.scheduler.submit(request)
        job.done.add_done_callback(lambda done: self._count(job, done))
        return DecodeStream(self.scheduler, job)

    # -- the stateless API -------------------------------------------------------------------

    async def exchange(self, ex: Exchange) -> DecodeStream:
        """Serve a whole-conversation request with the agent it names, or one of its model's
        auto-agents; what that agent's KV holds of the conversation is not prefilled again."""
        agent_id = await self._named_agent(ex)
        path = self._model_path(agent_id, ex.model)
        if agent_id is None and path not in self.scheduler.room.slots:
            agent_id = await self._new_auto(ex.model, path)  # loads the model: its template
        slot = self.scheduler.room.slots[path]
        if ex.grammar is not None:
            await self.scheduler.check_grammar(slot, ex.grammar)
        messages: tuple[ChatMessage, ...] = ()
        if ex.messages is not None:
            messages = self._with_system_prompt(agent_id, ex.messages)
            rendered = slot.chat.render(messages)
        else:
            rendered = Rendered(ex.prompt or "", add_bos=True, stops=())
        if agent_id is None:
            agent_id = self.auto.pick(path, rendered.text, rendered.add_bos)
            if agent_id is None:
                agent_id = await self._new_auto(ex.model, path)
        agent = self.scheduler.agents.get(agent_id)
        if agent is None:  # unregistered while this request waited
            raise UnknownAgent(f"no agent {agent_id!r} is registered", agent=agent_id)
        n_ctx = agent.n_ctx
        if ex.max_tokens is not None and ex.max_tokens >= n_ctx:
            raise PromptTooLong(
                f"max_tokens {ex.max_tokens} is past the context of {n_ctx} tokens",
                tokens=ex.max_tokens,
                n_ctx=n_ctx,
                param="max_tokens",
            )
        request = DecodeRequest(
            agent=agent_id,
            prompt=Conversation(rendered, messages),
            max_tokens=ex.max_tokens or n_ctx,
            sampling=ex.sampling,
            stops=ex.stops,
            stream=ex.stream,
            grammar=ex.grammar,
            top_logprobs=ex.top_logprobs,
        )
        return self.decode(request)

    async def _named_agent(self, ex: Exchange) -> str | None:
        """The agent a request names (header first, then ``model``), registering one the
        header names for the first time; None when ``model`` names a model."""
        agents = self.scheduler.agents
        if ex.agent is not None:
            if ex.agent not in agents:
                if not protocol.is_agent_id(ex.agent):
                    raise InvalidInput(f"{ex.agent!r} is not an agent id", agent=ex.agent)
                named = agents.get(ex.model)  # `model` may name an agent: its model, then
                await self.register(ex.agent, named.slot.key if named else ex.model)
                self.auto.adopt_named(ex.agent)
            return ex.agent
        return ex.model if ex.model in agents else None

    def _model_path(self, agent_id: str | None, model: str) -> str:
        if agent_id is not None:
            if agent_id not in self.scheduler.agents:  # unregistered meanwhile
                raise UnknownAgent(f"no agent {agent_id!r} is registered", agent=agent_id)
            return str(self.scheduler.agents[agent_id].slot.path)
        return self.scheduler.model_path(model)

    async def _new_auto(self, model: str, path: str) -> str:
        agent_id = self.auto.new_id(model)
        self.auto.adopt(path, agent_id)
        try:
            await self.register(agent_id, model)
        finally:
            self.auto.registered(agent_id)
        log.info("auto-agent agent=%s model=%s", agent_id, model)
        return agent_id

    def _with_system_prompt(
        self, agent_id: str | None, messages: tuple[ChatMessage, ...]
    ) -> tuple[ChatMessage, ...]:
        """A registered agent's system prompt heads a conversation that brings none."""
        agent = self.scheduler.agents.get(agent_id or "")
        if agent is None or not agent.system_prompt or (messages and messages[0].role == "system"):
            return messages
        return (ChatMessage("system", agent.system_prompt), *messages)

    async def expire_auto_agents(self) -> None:
        """Unregister the auto-agents idle for longer than their TTL (run periodically)."""
        for agent_id in self.auto.expired():
            try:
                await self.scheduler.unregister(agent_id)
            except LmxdError:
                continue  # gone already, or busy again
            log.info("auto-agent expired agent=%s", agent_id)

    # -- the daemon --------------------------------------------------------------------------

    def shutdown(self, peer_uid: int | None) -> None:
        if peer_uid != os.getuid():
            raise Forbidden(
                "only the daemon's own user may shut it down",
                peer_uid=peer_uid,
                daemon_uid=os.getuid(),
            )
        # The caller answers first: the daemon stops once this reply is on its way.
        asyncio.get_running_loop().call_soon(self.on_stop)

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
            "http": self.http_url,
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
        agents = sched.agents.values()
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
                "depth": sched.queue_depth(),
                "max": self.limits.max_queue,
                "running": sum(a.state is AgentState.ACTIVE for a in agents),
            },
            "agents": len(sched.agents),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def available_models(self) -> list[str]:
        """Model names a request may use: the catalog's fetched models, synthetic models in
        the models directory, and whatever else is loaded."""
        directory = self.scheduler.config.models_dir
        names = [n for n, e in catalog.CATALOG.items() if (directory / e.filename).is_file()]
        names += sorted(p.stem for p in directory.glob("synth-*.gguf"))
        names += [m.model for m in self.models() if m.model not in names]
        return names

    def list_agents(self) -> list[AgentView]:
        auto = self.auto.ids()
        return [
            AgentView(
                agent=a.id,
                model=a.slot.key,
                state=a.state.value,
                n_ctx=a.n_ctx,
                tokens=len(a.tokens),
                kv_tokens=a.kv_tokens,
                last_used=round(a.last_used, 3),
                auto=a.id in auto,
            )
            for a in self.scheduler.agents.values()
        ]

    def models(self) -> list[LoadedModel]:
        return [
            LoadedModel(
                model=slot.key,
                path=str(slot.path),
                refcount=len(slot.agents),
                weights_bytes=slot.model.device_weight_bytes,
                context_bytes=slot.context_reservation.bytes if slot.context_reservation else 0,
                n_seq=len(slot.seqs),
                pool_cells=slot.pool_cells,
                used_cells=slot.used_cells(),
            )
            for slot in self.scheduler.room.slots.values()
        ]

    def _count(self, job: Job, done: asyncio.Future[DecodeResult]) -> None:
        model, agent = job.agent.slot.key, job.agent.id
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            code = exc.code if isinstance(exc, LmxdError) else LmxdError.code
            self.decodes[(model, code)] += 1
            return
        result = done.result()
        self.decodes[(model, result.stop_reason.value)] += 1
        self.tokens[(model, agent, "prompt")] += result.prompt_tokens
        self.tokens[(model, agent, "cached")] += result.cached_tokens
        self.tokens[(model, agent, "generated")] += result.generated_tokens
