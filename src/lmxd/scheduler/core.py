"""The scheduler: owns agents, models and the queue, and decides every step.

One asyncio task runs :meth:`Scheduler.run`. Each turn, on each device, it picks the next model
with work (round robin among that device's models), admits its queued jobs whose agents can be
made resident, and runs a slice of steps of it on the device's engine lane: one
``llama_decode`` per step over one batch in which every active agent of the model has one entry
(a prompt chunk, or its last sampled token); then the device's next model, up to a few slices
per turn. Models of a device take turns a slice at a time, so agents of one model never starve
the others; devices run their slices at the same time, each at its own pace. The engine's
stepper executes the slice with plain values in and out (sequence ids in; per sequence, the
tokens it gained and its reply once ended); this module applies what comes back. Nothing here
blocks on llama.cpp.

Everything that touches the engine (steps, REGISTER, RESET, UNREGISTER) holds ``self._lock``,
so none of it interleaves with a step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from lmxd.chat.messages import ChatMessage
from lmxd.engine.sampling import SamplingParams
from lmxd.engine.stepper import SeqReport, SliceControl
from lmxd.engine.worker import Worker
from lmxd.errors import (
    AgentExists,
    Busy,
    Cancelled,
    Forbidden,
    InvalidInput,
    LmxdError,
    ParkBudgetExceeded,
    UnknownAgent,
)
from lmxd.memory.estimator import check_n_ctx
from lmxd.modelfile import read_model_info
from lmxd.results import Piece, StopReason
from lmxd.scheduler.agents import Activity, Agent, Memory
from lmxd.scheduler.devices import release
from lmxd.scheduler.endings import Endings
from lmxd.scheduler.jobs import DecodeRequest, Job
from lmxd.scheduler.models import Models
from lmxd.scheduler.oplock import OpLock
from lmxd.scheduler.residency import Residency
from lmxd.scheduler.slots import ModelSlot
from lmxd.scheduler.steps import begin, tokenize

log = logging.getLogger("lmxd.scheduler")
_GATHER_YIELDS = 4  # loop turns; each costs microseconds
# Idle this long, the engine copies idle agents' KV ahead of need. Not at once: an agent's
# client often sends its next request within milliseconds of a reply (a tool call, the next
# step of a plan), and that request would wait for the copy.
_WRITE_AHEAD_AFTER_S = 0.05
# Slices of steps one device may run in a turn while no operation waits for the lock.
_SLICES_PER_TURN = 8


@dataclass(frozen=True)
class SchedulerConfig:
    models_dir: Path
    allowed_dirs: tuple[Path, ...]  # model files outside these are refused
    max_queue: int = 64  # DECODE jobs one agent may have waiting or running
    slice_steps: int = 16  # steps one model runs (in one engine call) before the next's turn
    keep_alive_s: float = 300.0  # unload a model this long after its last agent goes
    park_after_decode: bool = False  # testing: park every agent as soon as its job ends
    stream_timeout_s: float = 30.0  # a stream left full and unread this long is cancelled


class Scheduler:
    def __init__(
        self,
        worker: Worker,
        room: Residency,
        config: SchedulerConfig,
    ) -> None:
        self.worker = worker
        self.room = room
        self.config = config
        self.agents: dict[str, Agent] = {}
        self._lock = OpLock()
        self._preparing = asyncio.Lock()  # one slice's preparation at a time (_chain)
        self._wake = asyncio.Event()
        self.models = Models(
            worker,
            room,
            config.models_dir,
            config.allowed_dirs,
            config.keep_alive_s,
            self._lock,
            self._wake.set,
        )
        self._turns: dict[int, int] = {}  # round-robin position over each device's models
        self.endings = Endings(worker, self._wake.set)

    # -- operations (called by the service) --------------------------------------------------

    async def register(
        self,
        agent_id: str,
        model: str,
        n_ctx: int,
        sampling: SamplingParams,
        system_prompt: str | None,
        owner: int,
    ) -> Agent:
        async with self._lock:
            if agent_id in self.agents:
                raise AgentExists(f"agent {agent_id!r} is already registered", agent=agent_id)
            self.reconcile()
            path = self.models.resolve(model)
            info = read_model_info(path)
            check_n_ctx(info, n_ctx)
            slot = self.room.slots.get(str(path))
            # Admission: would the model and this agent's context fit on its device if every
            # context there whose agents are all idle were closed? If not, no amount of
            # parking helps: refuse now. A model already loaded is admitted where it is, with
            # the layers it has there; a new one is placed (lmxd.scheduler.devices).
            if slot is None:
                slot = await self.models.load(
                    model, path, info, self.room.placement(model, info, n_ctx)
                )
            elif (denial := self.room.denial_in(slot.placement, slot.key, info, n_ctx)) is not None:
                raise denial.error()
            slot.weights[agent_id] = self.models.handle(slot)  # the charge is live: free
            self.models.cancel_unload(slot)
            agent = Agent(agent_id, slot, n_ctx, sampling, system_prompt, owner)
            slot.agents[agent_id] = self.agents[agent_id] = agent
            log.info("register agent=%s model=%s n_ctx=%d", agent_id, slot.key, n_ctx)
            return agent

    def resume(
        self,
        agent_id: str,
        tokens: list[int],
        text: str | None,
        text_bos: bool,
        reply_at: int,
        history: list[ChatMessage],
    ) -> int:
        """Give an agent just registered again (after a restart) the conversation it had, and
        the KV of it that its state file holds, if one matches (it is then spilled, and its
        next DECODE restores from the file; else that DECODE prefills the conversation).
        Returns the cells of KV found."""
        agent = self._agent(agent_id)
        agent.tokens, agent.text, agent.text_bos = list(tokens), text, text_bos
        agent.reply_at, agent.history = reply_at, list(history)
        self.room.found_on_disk(agent)
        return agent.kv_tokens

    async def keep_states(self, skip: set[str]) -> None:
        """At a clean stop, before anything is freed: every idle agent's KV (but ``skip``'s)
        to its state file, written before this returns. An agent decoding now keeps its
        conversation only, and prefills it after the restart."""
        async with self._lock:
            for agent in self.agents.values():
                if agent.idle and agent.kv_tokens and agent.id not in skip:
                    await self.room.keep(agent)

    def reconcile(self) -> None:
        """Read the device's figure and charge what it holds beyond the ledger (GPU only):
        before every slice (so after the one before), before a REGISTER's admission, and
        after an UNREGISTER (so that STATUS shows what it freed); the residency also does
        after every context it closes."""
        self.room.reconcile()

    def submit(self, request: DecodeRequest) -> Job:
        """Queue a DECODE; the job's ``done`` future carries the reply."""
        agent = self._agent(request.agent)
        # Bounded per agent, not in all: one client that floods its agent is refused at once,
        # and does not take the places of other agents' single turns.
        if len(agent.jobs) >= self.config.max_queue:
            raise Busy(
                f"agent {agent.id!r} has {self.config.max_queue} DECODE jobs waiting or "
                "running already; try again shortly",
                agent=agent.id,
                max_queue=self.config.max_queue,
            )
        if request.max_tokens <= 0:
            raise InvalidInput("max_tokens must be > 0", max_tokens=request.max_tokens)
        sampling = SamplingParams(**{**agent.sampling.__dict__, **(request.sampling or {})})
        job = Job(
            agent=agent,
            request=request,
            sampling=sampling,
            done=asyncio.get_running_loop().create_future(),
            events=asyncio.Queue() if request.stream else None,
        )
        agent.jobs.append(job)
        if agent.slot.control is not None:
            # It joins the batch at the next step instead of after the slice: requests
            # arriving a few milliseconds apart, as HTTP requests on several connections do,
            # share their prefill.
            agent.slot.control.stop = True
        if agent.idle:
            agent.do(Activity.QUEUED)
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Stop ``job`` at its next step; its reply says ``cancelled``."""
        job.cancelled = True
        control = job.agent.slot.control
        if control is not None:
            control.stop = True
        self._wake.set()

    def stream_read(self, job: Job) -> None:
        """A streamed job's client took a piece: if that unblocked its agent, step it again."""
        if job.stalled_since is not None and not job.stream_full:
            job.stalled_since = None
            self._wake.set()

    def model_path(self, model: str) -> str:
        """The resolved file a model name or path stands for (UNKNOWN_MODEL, FORBIDDEN)."""
        return str(self.models.resolve(model))

    async def check_grammar(self, slot: ModelSlot, grammar: str) -> None:
        """INVALID_INPUT unless llama.cpp takes ``grammar`` for ``slot``'s vocabulary."""
        await self.worker.check_grammar(slot.model, grammar)

    def queue_depth(self) -> int:
        """DECODE jobs waiting or running, all agents together."""
        return sum(len(a.jobs) for a in self.agents.values())

    async def reset(self, agent_id: str, caller: int) -> None:
        async with self._lock:
            agent = self.owned(agent_id, caller)
            if not agent.idle:
                raise InvalidInput(
                    f"agent {agent_id!r} is decoding; cancel it or wait", agent=agent_id
                )
            await self.room.drop(agent)
            agent.tokens, agent.history, agent.text = [], [], None
            self._wake.set()  # what it held may be what another job waits for
            log.info("reset agent=%s model=%s", agent.id, agent.slot.key)

    async def unregister(self, agent_id: str, caller: int) -> None:
        async with self._lock:
            await self._unregister(self.owned(agent_id, caller))

    async def unregister_idle(self, agent_id: str, used_before: float) -> bool:
        """Unregister ``agent_id`` if it is still idle and unused since ``used_before`` (Unix
        time), checked under the lock: a DECODE submitted meanwhile keeps it registered."""
        async with self._lock:
            agent = self.agents.get(agent_id)
            if agent is None or agent.jobs or agent.last_used > used_before:
                return False
            await self._unregister(agent)
            return True

    async def _unregister(self, agent: Agent) -> None:
        slot = agent.slot
        # Gone from the tables before the first await: a DECODE arriving meanwhile gets
        # UNKNOWN_AGENT instead of a place in a queue nobody will serve.
        del slot.agents[agent.id], self.agents[agent.id]
        for job in agent.jobs:
            if job.started and slot.context is not None and agent.seq is not None:
                self.worker.drop(slot.context, agent.seq)
            job.fail(Cancelled(f"agent {agent.id!r} was unregistered", agent=agent.id))
        agent.jobs.clear()
        await self.room.drop(agent)
        handle = slot.weights.pop(agent.id)
        if not slot.agents:
            slot.to_park.clear()
            self.endings.release_held(slot)
            self.endings.send()
            await self.models.keep_alive(slot)  # holds the weights before this agent lets go
        release(slot.placement.devices, handle)
        if not slot.agents and slot.context is not None:  # no agent is left to use it
            await self.room.close_context(slot)
        if not self.agents:
            self.room.store.trim()
        self.reconcile()
        self._wake.set()  # what it held may be what another job waits for
        log.info("unregister agent=%s model=%s", agent.id, slot.key)

    async def shutdown(self) -> None:
        """Fail every job and free every context and model."""
        async with self._lock:
            for agent in self.agents.values():
                for job in agent.jobs:
                    job.fail(Cancelled("the daemon is shutting down", agent=agent.id))
                agent.jobs.clear()
            for slot in list(self.room.slots.values()):
                self.endings.release_held(slot)  # ended before their forced parks
                await self.models.unload(slot)
            self.endings.send()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.reconcile()  # the backend's own use, before any model: STATUS shows it at once
        while True:
            await self._idle()
            self._wake.clear()
            # Woken from idle by a DECODE: let the requests already in the loop's ready queue
            # (a burst on several HTTP connections arrives a few callbacks apart) be submitted
            # too, so that they share the first batch instead of waiting for its prefill.
            for _ in range(_GATHER_YIELDS):
                await asyncio.sleep(0)
            still = 0  # turns in a row in which no model could do anything
            while devices := self._devices_with_work():
                async with self._lock:
                    try:
                        moved = await self._turn(devices)
                    finally:
                        self.endings.send()
                # Every model waits (for a stream to be read, for room): nothing moves until
                # something happens, and whatever happens sets _wake. Wait for it, not spin.
                still = 0 if moved else still + 1
                if still > len(self.room.slots):
                    break
                await asyncio.sleep(0)  # REGISTER / UNREGISTER / RESET get in between slices

    async def _idle(self) -> None:
        """Wait for work; meanwhile, once idle for a moment, reload partially placed models
        with more layers where room has freed up, spill parked agents to disk while their
        states take more than three quarters of the park budget, then write idle agents' KV
        ahead of need: one at a time, stopping as soon as work arrives (it then waits for one
        copy or reload at most)."""
        try:
            await asyncio.wait_for(self._wake.wait(), _WRITE_AHEAD_AFTER_S)
            return
        except TimeoutError:
            pass
        while not self._wake.is_set():
            async with self._lock:
                try:
                    if await self.models.grow_one():
                        continue
                except Exception:  # a bug must not take the daemon down with it
                    log.exception("reload of a partially placed model failed")
                if (agent := self.room.next_to_spill(idle=True)) is not None:
                    if await self.room.spill(agent):
                        continue
                    break  # the disk refused: try again when next idle
                agent = self.room.next_to_copy()
                if agent is None or not await self.room.write_ahead(agent):
                    break
        await self._wake.wait()

    def _devices_with_work(self) -> list[int]:
        return sorted({s.device.index for s in self.room.slots.values() if s.has_work})

    def _next_slot(self, device: int) -> ModelSlot | None:
        """The next model with work on ``device``, round robin among its models."""
        models = [s for s in self.room.slots.values() if s.has_work and s.device.index == device]
        if not models:
            return None
        self._turns[device] = self._turns.get(device, 0) + 1
        return models[self._turns[device] % len(models)]

    async def _turn(self, devices: list[int]) -> bool:
        """One turn: on each of ``devices``, up to _SLICES_PER_TURN slices of its models,
        round robin. The devices' chains of slices run at once, each on its device's engine
        lane, and a device starts its next slice as soon as its own last one ends, not when
        the other devices' do (with one slice per device per turn, each waited for the
        slowest). A chain ends early once an operation waits for the lock, so REGISTER, RESET
        and UNREGISTER still wait for one slice at most. A model split over devices takes its
        turns on its first device. False if nothing could be done."""
        return any(await asyncio.gather(*(self._chain(device) for device in devices)))

    async def _chain(self, device: int) -> bool:
        moved = False
        for _ in range(_SLICES_PER_TURN):
            slot = self._next_slot(device)
            if slot is None:
                break
            # Admissions, parks and restores one at a time, whichever device they are for:
            # they share the park budget, the disk tier and the host ledger; another
            # device's slice of steps may run meanwhile.
            async with self._preparing:
                for held in slot.placement.devices:
                    held.reconcile()  # admission counts what the devices hold
                try:
                    admitted, active = await self._prepare(slot)
                except Exception as exc:  # a bug must not take the daemon down with it
                    self._failed(slot, exc)
                    admitted, active = True, []
            if active:
                await self._step_guarded(slot, active)
            self.endings.send()
            if not (admitted or active):
                break
            moved = True
            if self._lock.waiting:
                break
        return moved

    async def _step_guarded(self, slot: ModelSlot, active: list[Agent]) -> None:
        try:
            await self._step(slot, active)
        except Exception as exc:  # a bug must not take the daemon down with it
            self._failed(slot, exc)

    def _failed(self, slot: ModelSlot, exc: Exception) -> None:
        log.exception("scheduler error on model %s", slot.key, exc_info=exc)
        for agent in list(slot.agents.values()):
            for job in list(agent.jobs):
                self.endings.fail(agent, job, LmxdError(f"internal error: {exc!r}"))

    async def _prepare(self, slot: ModelSlot) -> tuple[bool, list[Agent]]:
        """``slot``'s part of a turn before its steps: a park it owes; or admit its queued
        jobs and end the cancelled ones. Whether anything moved, and the agents to step.

        Copies of sequence state get turns of their own when other models have work: a
        16,000-token agent of a 1B model takes 11-13 ms to restore and as long to park, and
        the agents of other models decode between its restore, its step and its park, not
        after all three.
        """
        if slot.to_park:
            agent = slot.to_park.pop(0)
            try:
                if (
                    agent.idle
                    and agent.memory is Memory.RESIDENT
                    and slot.agents.get(agent.id) is agent
                    and not await self.room.park(agent)
                ):
                    store = self.room.store
                    log.warning(
                        "forced park of agent=%s skipped: parked state uses %d of its %d-byte "
                        "budget (--park-budget)",
                        agent.id,
                        store.used,
                        store.budget,
                    )
            finally:
                if not slot.to_park:
                    self.endings.release_held(slot)
            return True, []
        transfers = self.room.transfers
        copies = transfers.parks + transfers.restores
        moved = await self._admit(slot)
        copied = transfers.parks + transfers.restores != copies
        if copied and any(s.has_work for s in self.room.slots.values() if s is not slot):
            return True, []
        active = [a for a in slot.agents.values() if a.activity is Activity.RUNNING]
        for agent in [a for a in active if a.jobs[0].cancelled]:
            job = agent.jobs[0]
            assert slot.context is not None and agent.seq is not None
            job.reply = await self.worker.cancel(slot.context, agent.seq)
            if job.reply is not None and job.reply.unsent and job.events is not None:
                job.events.put_nowait(Piece(job.reply.unsent))
            self.endings.finish(agent, job, StopReason.CANCELLED)
            active.remove(agent)
            moved = True
        return moved, [a for a in active if not self._stalled(a.jobs[0])]

    def _stalled(self, job: Job) -> bool:
        """True while ``job``'s stream buffer is full: its client is not reading, so its agent
        sits out (holding its KV) instead of generating text nobody takes. A stream that
        stays full for stream_timeout_s is cancelled."""
        if not job.stream_full:
            job.stalled_since = None
            return False
        if job.stalled_since is None:
            since = job.stalled_since = time.monotonic()
            log.debug("stream full agent=%s: pausing it until its client reads", job.agent.id)
            asyncio.get_running_loop().call_later(
                self.config.stream_timeout_s, self._stall_expired, job, since
            )
        return True

    def _stall_expired(self, job: Job, since: float) -> None:
        if job.stalled_since == since and job.stream_full and not job.done.done():
            log.info(
                "stream unread for %.0f s agent=%s: cancelled",
                self.config.stream_timeout_s,
                job.agent.id,
            )
            self.cancel(job)

    async def _admit(self, slot: ModelSlot) -> bool:
        """Start the queued jobs of ``slot`` whose agents can be made resident now, first
        come first served; True if any job started, ended or failed.

        An agent that cannot be seated waits for one that is decoding to finish, or for
        another model's queued job to go first; if neither exists, waiting would be forever
        (say, the park budget is spent), so its job fails with the reason instead. A job
        that needs the model's streams to grow stops the jobs after it: the context can be
        reopened larger only once none of the model's agents is decoding.
        """
        moved = False
        queued = [a for a in slot.agents.values() if a.activity is Activity.QUEUED]
        candidates: list[Agent] = []
        unseated: list[Agent] = []
        # Aging: while another model's job waits for a context (memory this model's context
        # may hold), this model admits nothing that came after it, so that its context can
        # go idle and be closed for that one.
        waiting = [s.waiting_for_context() for s in self.room.slots.values() if s is not slot]
        first_waiting = min((w for w in waiting if w is not None), default=None)
        for agent in sorted(queued, key=lambda a: a.jobs[0].timings.submitted):
            job = agent.jobs[0]
            if job.cancelled:
                self.endings.finish(agent, job, StopReason.CANCELLED)
                moved = True
            elif first_waiting is None or job.timings.submitted <= first_waiting:
                candidates.append(agent)
        # Tokenizing, then starting the replies, are each one batch of engine calls run back
        # to back: one round trip to the engine thread per job costs a few hundred
        # microseconds, tens of milliseconds for a burst of 64 requests.
        tokenized = await self._each(candidates, self._tokenize)
        moved = moved or len(tokenized) < len(candidates)
        seated: list[Agent] = []
        for agent in tokenized:
            job = agent.jobs[0]
            try:
                if await self.room.make_resident(agent, job):
                    # Running from here: the agents seated after it cannot take its sequence.
                    agent.do(Activity.RUNNING)
                    seated.append(agent)
                    continue
            except LmxdError as exc:
                self.endings.fail(agent, job, exc)
                moved = True
                continue
            unseated.append(agent)
            if slot.stream_cells and slot.stream_cells < self.room.need(agent, job):
                break  # it waits for the streams to grow: so do the jobs after it
        for agent in await self._each(seated, lambda a: begin(self.worker, a, a.jobs[0])):
            agent.jobs[0].timings.admitted = time.perf_counter()
            slot.last_used = time.monotonic()
        moved = moved or bool(seated)
        running = any(a.activity is Activity.RUNNING for a in self.agents.values())
        others = any(
            a.activity is Activity.QUEUED
            for s in self.room.slots.values()
            if s is not slot
            for a in s.agents.values()
        )
        if unseated and not running and not others:
            for agent in unseated:
                self.endings.fail(agent, agent.jobs[0], self._no_room(slot))
            moved = True
        return moved

    async def _tokenize(self, agent: Agent) -> None:
        job = agent.jobs[0]
        if job.conversation is None:
            job.conversation = await tokenize(self.worker, agent, job)

    async def _each(
        self, agents: list[Agent], call: Callable[[Agent], Awaitable[None]]
    ) -> list[Agent]:
        """``call`` for every agent at once (the engine runs them in order, back to back);
        the agents it succeeded for. One that raised an LmxdError has its job failed."""
        outcomes = await asyncio.gather(*(call(a) for a in agents), return_exceptions=True)
        done = []
        for agent, outcome in zip(agents, outcomes, strict=True):
            if isinstance(outcome, LmxdError):
                self.endings.fail(agent, agent.jobs[0], outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                done.append(agent)
        return done

    async def _step(self, slot: ModelSlot, active: list[Agent]) -> None:
        """One slice of steps for ``active`` on the engine thread, then its outcome applied."""
        assert slot.context is not None
        loop = asyncio.get_running_loop()
        control = slot.control = SliceControl()
        by_seq = {agent.seq: agent for agent in active}

        def deliver(pieces: list[tuple[int, Piece]]) -> None:  # on the event loop
            for seq, piece in pieces:
                job = by_seq[seq].jobs[0]
                if job.events is not None:
                    job.events.put_nowait(piece)
                    if job.stream_full:  # its client is not reading: it sits out
                        control.paused.add(seq)

        def emit(pieces: list[tuple[int, Piece]]) -> None:  # on the engine thread
            loop.call_soon_threadsafe(deliver, pieces)

        seqs = [agent.seq for agent in active if agent.seq is not None]
        t0 = time.perf_counter()
        try:
            reports = await self.worker.run(
                slot.context, seqs, self.config.slice_steps, control, emit
            )
        except LmxdError as exc:
            for agent in active:
                self.endings.fail(agent, agent.jobs[0], exc)
            return
        finally:
            slot.control = None
            slot.decode_s += time.perf_counter() - t0
        for seq, report in reports.items():
            self._apply(by_seq[seq], report)
        slot.last_used = time.monotonic()
        if self.config.park_after_decode:
            # Forced parks (testing): the replies wait for them, so that a client asking
            # right after its reply finds its agent parked.
            slot.to_park += [a for a in slot.idle_residents() if a not in slot.to_park]
            if slot.to_park:
                self.endings.hold(slot)

    def _apply(self, agent: Agent, report: SeqReport) -> None:
        """What a slice did to one agent: its conversation grew; its reply may have ended."""
        job = agent.jobs[0]
        agent.tokens.extend(report.generated)
        agent.generated += len(report.generated)
        agent.slot.generated += len(report.generated)
        agent.slot.decode_tokens += len(report.generated)
        agent.kv = report.kv_tokens
        job.timings.prefill += report.prefill_s
        job.timings.decode += report.decode_s
        if report.reply is not None:
            job.reply = report.reply
            self.endings.finish(agent, job, report.reply.stop_reason)
        else:
            self._stalled(job)  # a full stream starts its timeout now

    def _no_room(self, slot: ModelSlot) -> LmxdError:
        """Nothing is decoding, yet no room could be made: say why instead of waiting."""
        store = self.room.store
        return ParkBudgetExceeded(
            f"no room for another agent of {slot.key}: every other agent is busy or cannot be "
            f"parked (parked state uses {store.used} of its {store.budget}-byte budget)",
            budget_bytes=store.budget,
            used_bytes=store.used,
        )

    def _agent(self, agent_id: str) -> Agent:
        agent = self.agents.get(agent_id)
        if agent is None:
            raise UnknownAgent(f"no agent {agent_id!r} is registered", agent=agent_id)
        return agent

    def owned(self, agent_id: str, caller: int) -> Agent:
        """The agent, if ``caller`` (a uid) registered it (UNKNOWN_AGENT, FORBIDDEN). RESET and
        UNREGISTER check under the lock, where no UNREGISTER and REGISTER of the same name can
        come in between; a DECODE checks as it is submitted, with no await in between."""
        agent = self._agent(agent_id)
        if agent.owner != caller:
            raise Forbidden(
                f"agent {agent_id!r} belongs to another user (uid {agent.owner})",
                agent=agent_id,
                owner_uid=agent.owner,
                peer_uid=caller,
            )
        return agent
