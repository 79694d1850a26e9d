"""The daemon's operations: the only way into the scheduler, shared by every front.

The JSON-lines front, the text protocol and the HTTP API each translate their wire into these
calls and the calls' typed results into their wire. None of them touches the scheduler's
objects: a DECODE comes back as a :class:`DecodeStream`, whose pieces and final
:class:`~lmxd.results.DecodeResult` are plain values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmxd import __version__, catalog, logs, protocol
from lmxd.chat.messages import ChatMessage
from lmxd.chat.template import Rendered
from lmxd.chat.tools import ToolUse, with_tool_prompt
from lmxd.config import DeclaredAgent
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import (
    Busy,
    Forbidden,
    InvalidInput,
    LedgerDenied,
    LmxdError,
    ParkBudgetExceeded,
    PromptTooLong,
    ShuttingDown,
    UnknownAgent,
)
from lmxd.memory.device import probe_device
from lmxd.memory.estimator import decode_speed_share, kv_bytes_per_token
from lmxd.registry import FORMAT as REGISTRY_FORMAT
from lmxd.registry import AgentRecord, AgentRegistry
from lmxd.results import DecodeResult, Piece
from lmxd.scheduler import Activity, Agent, Conversation, DecodeRequest, Job, Scheduler
from lmxd.scheduler.devices import Device
from lmxd.scheduler.slots import ModelSlot
from lmxd.service.auto import AutoAgents
from lmxd.service.declared import Declared, register_declared
from lmxd.service.views import AgentView, DeviceLayers, LoadedModel, Refusal, Registered

log = logging.getLogger("lmxd.service")
GONE = "(unregistered)"  # the agent label of counts of agents since unregistered
# Requests refused for lack of room or of a place in the queue: the latest are in STATUS.
REFUSAL_CODES = frozenset({LedgerDenied.code, ParkBudgetExceeded.code, Busy.code})
REFUSALS_KEPT = 10


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
    tools: ToolUse | None = None  # chat: described in the system message (grammar: below)
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
        registry: AgentRegistry | None = None,  # agents on disk, for a restart
    ) -> None:
        self.scheduler = scheduler
        self.limits = limits
        self.on_stop = on_stop
        self.registry = registry
        self.restored = 0  # agents registered again from the registry at the start
        self.from_disk = 0  # of those, agents whose KV state came back from its file
        self.not_restored = 0  # agent files found whose agent could not be registered
        self.declared = Declared()  # the config file's agents (declare_agents)
        self.started = time.monotonic()
        self.started_at = time.time()
        self.http_url: str | None = None  # set once the HTTP front listens
        self.uid = os.getuid()  # the daemon's user: the HTTP API acts as it
        self.stopping = False
        self.auto = AutoAgents(scheduler, limits.auto_agents, limits.auto_agent_ttl_s)
        # Counters since the start, by (model, agent): /metrics reads them.
        self.tokens: Counter[tuple[str, str, str]] = Counter()  # (model, agent, kind)
        self.decodes: Counter[tuple[str, str]] = Counter()  # (model, stop_reason or code)
        self.refusals: deque[Refusal] = deque(maxlen=REFUSALS_KEPT)  # the latest, for STATUS

    # -- agents ------------------------------------------------------------------------------

    async def register(
        self,
        agent: str,
        model: str,
        n_ctx: int | None = None,
        sampling: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
        caller: int | None = None,
        kept: bool = True,
    ) -> Registered:
        """Register ``agent``, owned by ``caller`` (a uid; None: the daemon's own user, as
        for the HTTP API, whose key is that user's); ``kept``: on disk, for a restart (the
        HTTP API's auto-agents are not)."""
        with self._logged("REGISTER", agent=agent, model=model):
            return await self._register(agent, model, n_ctx, sampling, system_prompt, caller, kept)

    async def _register(
        self,
        agent: str,
        model: str,
        n_ctx: int | None = None,
        sampling: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
        caller: int | None = None,
        kept: bool = True,
    ) -> Registered:
        self._check_open()
        params = SamplingParams(**(sampling or {}))
        got = await self.scheduler.register(
            agent,
            model,
            n_ctx or self.limits.default_n_ctx,
            params,
            system_prompt,
            self.uid if caller is None else caller,
        )
        if kept:
            self._persist(agent)
        slot = got.slot
        return Registered(
            agent=got.id,
            model=slot.key,
            n_ctx=got.n_ctx,
            path=str(slot.path),
            device=slot.device.index,
            n_gpu_layers=slot.n_gpu_layers,
            layers=slot.info.n_layer + 1,
            estimated_speed=self._estimated_speed(slot),
            devices=_device_layers(slot),
        )

    def _estimated_speed(self, slot: ModelSlot) -> float:
        """``slot``'s decode speed estimated as a share of all its layers on its device."""
        return round(decode_speed_share(slot.info, slot.n_gpu_layers), 3) if slot.partial else 1.0

    async def reset(self, agent: str, caller: int | None = None) -> None:
        with self._logged("RESET", agent=agent):
            await self.scheduler.reset(agent, self.uid if caller is None else caller)
        self._persist(agent)

    async def unregister(self, agent: str, caller: int | None = None) -> None:
        with self._logged("UNREGISTER", agent=agent):
            await self.scheduler.unregister(agent, self.uid if caller is None else caller)
        self._forget(agent)
        if self.registry is not None:
            self.registry.remove(agent)

    async def restore_agents(self) -> None:
        """Register again every agent the registry kept (at the start, before any client),
        with its conversation when its model file is the one it was tokenized for."""
        if self.registry is None:
            return
        for record in self.registry.load():
            try:
                await self.scheduler.register(
                    record.agent,
                    record.model,
                    record.n_ctx,
                    SamplingParams(**record.sampling),
                    record.system_prompt,
                    record.owner,
                )
            except (LmxdError, TypeError) as exc:  # TypeError: sampling from another version
                self.not_restored += 1
                log.warning("agent %s not registered again: %s", record.agent, exc)
                continue
            self.restored += 1
            info = self.scheduler.agents[record.agent].slot.info
            now = (str(info.path), info.file_size, info.mtime_ns)
            if now != (record.path, record.model_size, record.model_mtime_ns):
                log.warning(
                    "agent %s: %s is not the file its conversation was kept for; it starts anew",
                    record.agent,
                    info.path,
                )
                self._persist(record.agent)
                continue
            kv = self.scheduler.resume(
                record.agent,
                record.tokens,
                record.text,
                record.text_bos,
                record.reply_at,
                record.history,
            )
            self.from_disk += kv > 0
            log.info(
                "agent %s registered again, %d tokens, %d of them in KV from its state file",
                record.agent,
                len(record.tokens),
                kv,
            )
        disk = self.scheduler.room.disk
        if disk is not None:
            disk.remove_unclaimed()

    async def declare_agents(self, agents: Sequence[DeclaredAgent], file: Path | None) -> None:
        """Register the config file's agents that are not registered yet (at the start, after
        :meth:`restore_agents`): lmxd.service.declared."""
        self.declared = await register_declared(self, agents, file)

    async def keep_states(self) -> None:
        """At a clean stop, before anything is freed: every idle agent's KV to its state file
        (the HTTP API's auto-agents, which are not kept, aside)."""
        if self.registry is not None:
            await self.scheduler.keep_states(skip=self.auto.ids())

    def _persist(self, agent_id: str) -> None:
        """Keep the agent on disk as it is now (not the HTTP API's auto-agents)."""
        record = self._record(agent_id)
        if self.registry is not None and record is not None:
            self.registry.save(record)

    def _record(self, agent_id: str) -> AgentRecord | None:
        """The agent as kept on disk; None where no registry keeps it."""
        agent = self.scheduler.agents.get(agent_id)
        if self.registry is None or agent is None or agent_id in self.auto.ids():
            return None
        info = agent.slot.info  # the model file as it was read, with its size and time
        return AgentRecord(
            format=REGISTRY_FORMAT,
            agent=agent.id,
            owner=agent.owner,
            model=agent.slot.key,
            path=str(info.path),
            model_size=info.file_size,
            model_mtime_ns=info.mtime_ns,
            n_ctx=agent.n_ctx,
            sampling=dataclasses.asdict(agent.sampling),
            system_prompt=agent.system_prompt,
            tokens=list(agent.tokens),
            text=agent.text,
            text_bos=agent.text_bos,
            reply_at=agent.reply_at,
            history=list(agent.history),
        )

    def decode(self, request: DecodeRequest, caller: int | None = None) -> DecodeStream:
        """Queue a DECODE of a registered agent (raises UNKNOWN_AGENT, FORBIDDEN, BUSY...)."""
        with self._logged("DECODE", agent=request.agent):
            return self._decode(request, caller)

    def _decode(self, request: DecodeRequest, caller: int | None = None) -> DecodeStream:
        self._check_open()
        self.scheduler.owned(request.agent, self.uid if caller is None else caller)
        job = self.scheduler.submit(request)
        job.done.add_done_callback(lambda done: self._count(job, done))
        job.done.add_done_callback(lambda _: self._persist(request.agent))
        return DecodeStream(self.scheduler, job)

    # -- the stateless API -------------------------------------------------------------------

    async def exchange(self, ex: Exchange) -> DecodeStream:
        """Serve a whole-conversation request with the agent it names, or one of its model's
        auto-agents; what that agent's KV holds of the conversation is not prefilled again."""
        with self._logged("HTTP", model=ex.model, agent=ex.agent):
            return await self._exchange(ex)

    async def _exchange(self, ex: Exchange) -> DecodeStream:
        self._check_open()
        agents = self.scheduler.agents
        if ex.agent is not None and ex.agent not in agents:
            await self._register_named(ex)
        named = ex.agent or (ex.model if ex.model in agents else None)
        if named is not None:
            slot = self._agent(named).slot
            if ex.grammar is not None:
                await self.scheduler.check_grammar(slot, ex.grammar)
            rendered, messages = self._render(slot, self._agent(named).system_prompt, ex)
            return self._submit(named, ex, rendered, messages)
        path = self.scheduler.model_path(ex.model)
        # One request of a model at a time chooses its agent and submits: two never take the
        # same idle agent for two conversations, and one that expires is not taken as it goes.
        async with self.auto.lock(path):
            first = None
            if path not in self.scheduler.room.slots:  # the first agent loads the model
                first = await self._new_auto(ex.model, path)
            slot = self.scheduler.room.slots[path]
            if ex.grammar is not None:
                await self.scheduler.check_grammar(slot, ex.grammar)
            rendered, messages = self._render(slot, None, ex)
            agent_id = first or self.auto.pick(path, rendered.text, rendered.add_bos)
            if agent_id is None:
                agent_id = await self._new_auto(ex.model, path)
            return self._submit(agent_id, ex, rendered, messages)

    def _render(
        self, slot: ModelSlot, system_prompt: str | None, ex: Exchange
    ) -> tuple[Rendered, tuple[ChatMessage, ...]]:
        """The request's conversation as the model sees it: an agent's system prompt heads a
        conversation that brings none, and offered tools are described after it."""
        if ex.messages is None:
            return Rendered(ex.prompt or "", add_bos=True, stops=()), ()
        messages = list(ex.messages)
        if system_prompt and not (messages and messages[0].role == "system"):
            messages.insert(0, ChatMessage("system", system_prompt))
        if ex.tools is not None:
            messages = with_tool_prompt(messages, ex.tools)
        return slot.chat.render(messages), tuple(messages)

    def _submit(
        self, agent_id: str, ex: Exchange, rendered: Rendered, messages: tuple[ChatMessage, ...]
    ) -> DecodeStream:
        n_ctx = self._agent(agent_id).n_ctx
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
        return self._decode(request)

    async def _register_named(self, ex: Exchange) -> None:
        """Register the agent the X-Lmxd-Agent header names for the first time, on the model
        ``model`` names (or on the model of the agent ``model`` names)."""
        assert ex.agent is not None
        if not protocol.is_agent_id(ex.agent):
            raise InvalidInput(f"{ex.agent!r} is not an agent id", agent=ex.agent)
        owner = self.scheduler.agents.get(ex.model)
        model = owner.slot.key if owner is not None else ex.model
        path = self.scheduler.model_path(model)
        async with self.auto.lock(path):
            if ex.agent in self.scheduler.agents:
                return  # a request naming it too got here first
            if self.auto.count(path) >= self.limits.auto_agents and not await self._evict(path):
                raise Busy(
                    f"{model} has {self.limits.auto_agents} agents the HTTP API made "
                    "(--auto-agents), all busy or named: reuse a name, or wait for one to expire",
                    max_agents=self.limits.auto_agents,
                )
            await self._register(ex.agent, model, kept=False)
            self.auto.adopt_named(path, ex.agent)

    async def _evict(self, path: str) -> bool:
        """Unregister the least recently used idle auto-agent of the model at ``path`` (an
        explicitly named agent outranks a cache of some conversation). False: none is idle."""
        for agent in sorted(self.auto.pool(path), key=lambda a: a.last_used):
            if not agent.jobs and await self.scheduler.unregister_idle(agent.id, time.time()):
                self._forget(agent.id)
                log.info("auto-agent evicted agent=%s for a named one", agent.id)
                return True
        return False

    async def _new_auto(self, model: str, path: str) -> str:
        agent_id = self.auto.new_id(model)
        await self._register(agent_id, model, kept=False)
        self.auto.adopt(path, agent_id)
        log.info("auto-agent agent=%s model=%s", agent_id, model)
        return agent_id

    def _agent(self, agent_id: str) -> Agent:
        agent = self.scheduler.agents.get(agent_id)
        if agent is None:  # never registered, or unregistered while this request waited
            raise UnknownAgent(f"no agent {agent_id!r} is registered", agent=agent_id)
        return agent

    async def expire_auto_agents(self) -> None:
        """Unregister the agents the API made that have been idle past their TTL (run
        periodically); one that a request takes meanwhile stays."""
        for agent_id, path, idle_since in self.auto.expired():
            async with self.auto.lock(path):
                if await self.scheduler.unregister_idle(agent_id, used_before=idle_since):
                    self._forget(agent_id)
                    log.info("auto-agent expired agent=%s", agent_id)

    # -- the daemon --------------------------------------------------------------------------

    def close(self) -> None:
        """The daemon is stopping: every new operation gets SHUTTING_DOWN from now on."""
        self.stopping = True

    def _check_open(self) -> None:
        if self.stopping:
            raise ShuttingDown("the daemon is stopping")

    @contextlib.contextmanager
    def _logged(self, op: str, **facts: object) -> Iterator[None]:
        """One log line for an operation a client asked for that failed (lmxd.logs.failed),
        and a refusal kept for STATUS: the public operations log, the private ones they
        share do not, so that a refusal is logged and kept once whichever front asked."""
        try:
            yield
        except LmxdError as exc:
            logs.failed(log, op, exc, **facts)
            self._refused(op, str(facts.get("agent") or facts.get("model") or ""), exc)
            raise

    def shutdown(self, peer_uid: int) -> None:
        with self._logged("SHUTDOWN", uid=peer_uid):
            if peer_uid != self.uid:
                raise Forbidden(
                    "only the daemon's own user may shut it down",
                    peer_uid=peer_uid,
                    daemon_uid=self.uid,
                )
        log.info("shutdown asked uid=%d", peer_uid)
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
            "device": protocol.to_builtins(probe_device(self.scheduler.room.devices[0].index)),
            "http": self.http_url,
        }

    def status(self) -> dict[str, Any]:
        sched = self.scheduler
        disk = sched.room.disk
        devices = [self._device_status(device) for device in sched.room.devices]
        agents = sched.agents.values()
        return {
            "device": devices[0]["device"],
            "ledger": devices[0]["ledger"],
            "devices": devices,
            "host": self._host_status(),
            "parked_host_bytes": sched.room.store.used,
            "transfers": protocol.to_builtins(sched.room.transfers),
            "park_budget": sched.room.store.budget,
            "queue": {
                "depth": sched.queue_depth(),
                "max": self.limits.max_queue,
                "running": sum(a.activity is Activity.RUNNING for a in agents),
            },
            "agents": len(sched.agents),
            "refusals": [protocol.to_builtins(r) for r in self.refusals],
            "disk": None
            if disk is None
            else {
                "dir": str(disk.dir),
                "files": disk.files,
                "bytes": disk.file_bytes,
                "rejected": disk.rejected,
                "errors": disk.errors,
                "last_error": disk.last_error,
            },
            "registry": {
                "dir": None if self.registry is None else str(self.registry.dir),
                "restored": self.restored,
                "states_restored": self.from_disk,
                "not_restored": self.not_restored,
                "unreadable": 0 if self.registry is None else self.registry.unreadable,
                "errors": 0 if self.registry is None else self.registry.errors,
                "last_error": None if self.registry is None else self.registry.last_error,
            },
            "config": self.declared.status(),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def _host_status(self) -> dict[str, Any] | None:
        """The host-RAM ledger of a GPU daemon for STATUS (None on a CPU build)."""
        host = self.scheduler.room.host
        if host is None:
            return None
        return {"cap": host.cap, "reserved": host.reserved, "by_owner": host.snapshot()}

    def _device_status(self, device: Device) -> dict[str, Any]:
        """One device for STATUS: what the probe reads now, and its ledger."""
        ledger, meter = device.ledger, device.reconciler
        by_model: dict[str, dict[str, int]] = {}
        by_agent: dict[str, int] = {}
        for slot in self.scheduler.room.slots.values():
            for i, share in enumerate(slot.placement.shares):
                if share.device is not device:
                    continue
                weights = next(iter(slot.weights.values()))[i].bytes if slot.weights else 0
                context = slot.context_reservation[i].bytes if slot.context_reservation else 0
                by_model[slot.key] = {
                    "weights": weights,
                    "context": context,
                    "n_gpu_layers": len(share.span),
                    "layers": slot.info.n_layer + 1,
                }
                per_token = kv_bytes_per_token(slot.info, share.span)  # of its layers here
                for agent in slot.agents.values():
                    by_agent[agent.id] = agent.kv_tokens * per_token if agent.seq is not None else 0
        return {
            "index": device.index,
            "device": protocol.to_builtins(probe_device(device.index)),
            "ledger": {
                "cap": ledger.cap,
                "reserved": ledger.reserved,
                "unaccounted": ledger.unaccounted,
                "device_measured": None if meter is None else meter.measured,
                "by_owner": ledger.snapshot(),
                "by_model": by_model,
                "by_agent": by_agent,
            },
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
                state=a.state,
                n_ctx=a.n_ctx,
                tokens=len(a.tokens),
                kv_tokens=a.kv_tokens,
                last_used=round(a.last_used, 3),
                auto=a.id in auto,
                owner=a.owner,
                device=a.slot.device.index,
                generated_tokens=a.generated,
                parks=a.parks,
                restores=a.restores,
            )
            for a in self.scheduler.agents.values()
        ]

    def models(self) -> list[LoadedModel]:
        now = asyncio.get_running_loop().time()
        return [
            LoadedModel(
                model=slot.key,
                path=str(slot.path),
                refcount=len(slot.agents),
                weights_bytes=sum(r.bytes for r in next(iter(slot.weights.values()), ())),
                context_bytes=sum(r.bytes for r in slot.context_reservation or ()),
                n_seq=len(slot.seqs),
                pool_cells=slot.pool_cells,
                used_cells=slot.used_cells(),
                device=slot.device.index,
                resident=len(slot.residents()),
                generated_tokens=slot.generated,
                unload_in_s=None if timer is None else round(max(0.0, timer.when() - now), 1),
                n_gpu_layers=slot.n_gpu_layers,
                layers=slot.info.n_layer + 1,
                estimated_speed=self._estimated_speed(slot),
                decode_tokens_per_s=(
                    round(slot.decode_tokens / slot.decode_s, 1) if slot.decode_s > 0 else None
                ),
                devices=_device_layers(slot),
            )
            for slot in self.scheduler.room.slots.values()
            for timer in [slot.unload_timer]
        ]

    def _refused(self, op: str, agent: str, exc: LmxdError) -> None:
        """Keep ``exc`` among the latest refusals if it is one: no room, or no place in the
        queue (not a malformed or unknown request)."""
        if exc.code in REFUSAL_CODES:
            self.refusals.append(
                Refusal(
                    time.time(), op, agent, exc.code, str(exc), protocol.to_builtins(exc.details)
                )
            )

    def _forget(self, agent: str) -> None:
        """An agent went: its counts move to the ``(unregistered)`` series of its model, so
        that totals stay monotonic and the series do not grow with every auto-agent."""
        for key in [k for k in self.tokens if k[1] == agent]:
            model, _, kind = key
            self.tokens[(model, GONE, kind)] += self.tokens.pop(key)

    def _count(self, job: Job, done: asyncio.Future[DecodeResult]) -> None:
        model, agent = job.agent.slot.key, job.agent.id
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            code = exc.code if isinstance(exc, LmxdError) else LmxdError.code
            self.decodes[(model, code)] += 1
            if isinstance(exc, LmxdError):
                self._refused("DECODE", agent, exc)
            return
        result = done.result()
        self.decodes[(model, result.stop_reason.value)] += 1
        self.tokens[(model, agent, "prompt")] += result.prompt_tokens
        self.tokens[(model, agent, "cached")] += result.cached_tokens
        self.tokens[(model, agent, "generated")] += result.generated_tokens


def _device_layers(slot: ModelSlot) -> list[DeviceLayers]:
    """Each of ``slot``'s devices with the layers it holds, lower layers first."""
    return [DeviceLayers(share.device.index, len(share.span)) for share in slot.placement.shares]
