"""Making room: contexts opened under the ledger, idle agents parked, parked agents restored.

Every way of getting memory for an agent is here, in the order the scheduler tries them:
a free sequence of its model's context; else park that model's least recently used idle
agent (its state goes to host RAM and its cells are freed); for a context that does not exist
yet, reserve it in its device's ledger, closing other models' contexts on that device whose
agents are all idle (least recently used first) until it fits. Each park is one structured log
line. Each device has a ledger of its own (lmxd.scheduler.devices): a model's weights and
context are charged to the device it was placed on (to each of its devices, for its share, when
it is split by layer), and only contexts there make room for it.

A context stays open when its agents are all parked (its streams empty, its memory still
reserved) until another model needs the room, its streams must grow, or its model unloads:
opening one takes tens of milliseconds (36 ms for the Llama-3.2-1B shape on the H200), which
an agent coming back would otherwise wait for on top of its restore.

Write-ahead: while the engine has nothing to do, idle agents that may be parked soon have
their KV copied to host RAM ahead of need (:meth:`Residency.write_ahead`); parking one of them
later is only freeing its cells, so the job that needs its sequence does not wait for a copy.
The copy goes when the agent's next job starts, and copies make way when a park needs the
budget.

Spilling, with a park directory (lmxd.kvdisk): when a park finds the host-RAM budget spent,
the least recently used parked agents are written to their state files and their RAM goes to
the park; while the engine has nothing to do, parked agents are spilled the same way until
their states take three quarters of the budget or less, so that the next parks find room in
RAM and go at memory speed, not at the disk's (copies written ahead do not count: they make
way by themselves). A spilled agent's next job reads its file back before its restore. A write
that fails leaves the state in RAM: nothing is lost, the park that needed the room waits or
fails as without a disk.

KV by use, not by promise: each sequence has a KV stream of its own, sized for what the
model's agents need now (a job needs its conversation and its max_tokens, at most its n_ctx)
and a quarter more, rounded up to a power of two; the ledger charges that. 96 agents at n_ctx
4,096 would need about 12 GiB of KV for the Llama-3.2-1B shape if each were charged its n_ctx;
turns of 128 tokens need 256-cell streams, 1/16 of it. A job that needs more than the stream
waits until no agent of the model is decoding, and the context is reopened larger (the others
parked and restored as they come back); an agent that reaches its n_ctx still gets it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from lmxd.engine.context import KV_PAD, ContextParams
from lmxd.engine.worker import Worker
from lmxd.errors import LedgerDenied, LmxdError, ParkBudgetExceeded
from lmxd.kvdisk import DiskTier, StateOwner
from lmxd.kvstore import KvStore, ParkedState
from lmxd.memory.estimator import Backend, MemoryEstimate, estimate, weight_bytes
from lmxd.memory.ledger import Denial, Ledger, Request, Reservation
from lmxd.modelfile import ModelInfo
from lmxd.scheduler.agents import Activity, Agent, Memory
from lmxd.scheduler.devices import (
    Charge,
    Device,
    Placement,
    Short,
    most_layers,
    place,
    release,
    reserve,
    split_by_layer,
)
from lmxd.scheduler.jobs import Job
from lmxd.scheduler.slots import ModelSlot
from lmxd.units import format_bytes

log = logging.getLogger("lmxd.scheduler")


@dataclass
class Transfers:
    """Parks, restores and copies written ahead so far: how many, bytes, seconds (STATUS).

    ``park_bytes`` and ``park_s`` count the copies parks made when they happened; a park of
    an agent whose KV was written ahead (``parks_ahead`` of the ``parks``) only freed cells.
    """

    parks: int = 0
    park_bytes: int = 0
    park_s: float = 0.0
    parks_ahead: int = 0
    copies_ahead: int = 0
    copy_ahead_bytes: int = 0
    copy_ahead_s: float = 0.0
    restores: int = 0
    restore_bytes: int = 0
    restore_s: float = 0.0
    spills: int = 0
    spill_bytes: int = 0
    spill_s: float = 0.0
    disk_reads: int = 0  # restores whose state came back from its file first
    disk_read_bytes: int = 0
    disk_read_s: float = 0.0


@dataclass(frozen=True)
class ResidencyConfig:
    backend: Backend
    n_batch: int = 512
    n_threads: int = 0
    max_seqs: int = 16  # sequences per context: agents of one model resident at once
    partial: bool = True  # a model too large for every device gets as many layers as fit
    op_offload: bool = True  # host layers' matrix products of large batches run on the GPU


class Residency:
    """Contexts, parking and restoring for the scheduler (its asyncio task only)."""

    def __init__(
        self,
        worker: Worker,
        devices: list[Device],  # in index order
        store: KvStore,
        config: ResidencyConfig,
        disk: DiskTier | None = None,  # state files under the park directory, if any
        host: Ledger | None = None,  # host RAM for what CUDA models keep there; None on CPU
    ) -> None:
        self.worker = worker
        self.devices = devices
        self.host = host
        self.store = store
        self.disk = disk
        self.config = config
        self.slots: dict[str, ModelSlot] = {}
        self.transfers = Transfers()

    # -- contexts ----------------------------------------------------------------------------

    def weights_request(
        self, key: str, info: ModelInfo, n_gpu_layers: int = -1, span: range | None = None
    ) -> Request:
        """The model's weights on its device (those of ``span``'s layers, for one device of
        a split), keyed by file: charged once however many agents share them."""
        device, _ = weight_bytes(info, self.config.backend, n_gpu_layers, span)
        return Request(f"model:{key}", {"weights": device}, key=f"weights:{info.path}")

    def context_request(
        self,
        key: str,
        info: ModelInfo,
        n_ctx: int,
        n_seq: int,
        n_gpu_layers: int = -1,
        span: range | None = None,
    ) -> Request:
        """``n_seq`` sequences with a stream of ``n_ctx`` cells each, on the model's device
        (``span``'s layers' KV and a compute buffer, for one device of a split)."""
        est = self._estimate(info, n_ctx, n_seq, n_gpu_layers, span)
        parts = {"kv": est.kv, "compute": est.compute}
        if self.config.backend is Backend.CPU:
            parts["output"] = est.output
        return Request(f"context:{key}", parts)

    def weights_requests(
        self, key: str, info: ModelInfo, where: Placement
    ) -> list[tuple[Device, Request]]:
        """The weights' request on each device of ``where``, in the order of its shares (a
        device's own layers: all of the offloaded ones for a model on one device)."""
        return [
            (
                share.device,
                self.weights_request(key, info, where.n_gpu_layers, share.span),
            )
            for share in where.shares
        ]

    def context_requests(
        self, key: str, info: ModelInfo, n_ctx: int, n_seq: int, where: Placement
    ) -> list[tuple[Device, Request]]:
        """A context's request on each device of ``where``, in the order of its shares."""
        return [
            (
                share.device,
                self.context_request(key, info, n_ctx, n_seq, where.n_gpu_layers, share.span),
            )
            for share in where.shares
        ]

    def host_requests(
        self, key: str, info: ModelInfo, n_ctx: int, n_seq: int, n_gpu_layers: int
    ) -> tuple[Request, Request]:
        """What a CUDA model keeps in host RAM: its weights off the device, and the context's
        logits, and the KV and compute buffer of its layers off the device."""
        est = self._estimate(info, n_ctx, n_seq, n_gpu_layers)
        weights = Request(f"model:{key}", {"weights": est.weights_host})
        parts = {"kv": est.kv_host, "compute": est.compute_host, "output": est.output}
        return weights, Request(f"context:{key}", parts)

    def _estimate(
        self, info: ModelInfo, n_ctx: int, n_seq: int, n_gpu_layers: int, span: range | None = None
    ) -> MemoryEstimate:
        return estimate(
            info,
            n_ctx,
            n_seq,
            backend=self.config.backend,
            n_gpu_layers=n_gpu_layers,
            n_ubatch=self.config.n_batch,
            op_offload=self.config.op_offload,
            span=span,
        )

    # -- placement ---------------------------------------------------------------------------

    def denial_on(
        self,
        device: Device,
        key: str,
        info: ModelInfo,
        n_ctx: int,
        n_gpu_layers: int,
        span: range | None = None,
    ) -> Denial | None:
        """Would the model (with ``n_gpu_layers`` on ``device``, or ``span``'s layers of a
        split) and one agent's context fit there if every context there whose agents are all
        idle were closed? If not, no amount of parking helps."""
        evictable = [r for s in self.evictable(device) if (r := s.context_on(device))]
        weights = self.weights_request(key, info, n_gpu_layers, span)
        alone = self.context_request(key, info, n_ctx, 1, n_gpu_layers, span)
        return device.ledger.fits(weights, alone, ignoring=evictable)

    def denial_in(self, where: Placement, key: str, info: ModelInfo, n_ctx: int) -> Denial | None:
        """:meth:`denial_on` each device of ``where``: the first denial, if any."""
        for share in where.shares:
            n_gpu_layers = where.n_gpu_layers
            denial = self.denial_on(share.device, key, info, n_ctx, n_gpu_layers, share.span)
            if denial is not None:
                return denial
        return None

    def placement(self, key: str, info: ModelInfo, n_ctx: int) -> Placement:
        """Where a new model goes (lmxd.scheduler.devices): whole on the device with the most
        room left; else split by layer over several devices; else, unless partial placement
        is off, with the most layers that fit on any device. LedgerDenied with each device's
        numbers, or the host's, where none works."""
        layers = info.n_layer + 1
        try:
            device = place(self.devices, lambda d: self.denial_on(d, key, info, n_ctx, layers))
            where = Placement.single(device, layers, layers)
        except LedgerDenied:
            if self.config.backend is Backend.CPU:
                raise
            split = split_by_layer(
                self.devices,
                layers,
                lambda d, span: self.denial_on(d, key, info, n_ctx, layers, span),
            )
            if split is not None:
                self._check_host(key, info, n_ctx, split)
                return split
            if not self.config.partial:
                raise
            # Not even the compute buffer fits anywhere: refused with each device's numbers
            # at 0 layers.
            place(self.devices, lambda d: self.denial_on(d, key, info, n_ctx, 0))
            candidates: list[tuple[int, int, Device]] = []
            for device in self.devices:

                def denial_with(k: int, device: Device = device) -> Denial | None:
                    return self.denial_on(device, key, info, n_ctx, k)

                most = most_layers(layers, denial_with)
                if most is not None:
                    candidates.append((most, device.ledger.cap - device.ledger.reserved, device))
            most, _, device = max(candidates, key=lambda c: c[:2])
            where = Placement.single(device, most, layers)
        self._check_host(key, info, n_ctx, where)
        return where

    def _check_host(self, key: str, info: ModelInfo, n_ctx: int, where: Placement) -> None:
        """LedgerDenied (reason HOST) if host RAM cannot hold what ``where`` leaves there."""
        if self.host is None:
            return
        requests = self.host_requests(key, info, n_ctx, 1, where.n_gpu_layers)
        idle = [s.context_host for s in self._idle_host_contexts()]
        denial = self.host.fits(*requests, ignoring=[r for r in idle if r is not None])
        if denial is None:
            return
        # The first device's part: a split's other devices hold theirs in their own ledgers.
        (_, weights), *_ = self.weights_requests(key, info, where)
        (_, context), *_ = self.context_requests(key, info, n_ctx, 1, where)
        on_device = weights.bytes + context.bytes
        n_gpu_layers = len(where.shares[0].span)
        raise LedgerDenied(
            f"host RAM ledger denies {' + '.join(denial.owners)}: with "
            f"{n_gpu_layers} of {where.layers} layers on device {where.device.index} "
            f"(needing {format_bytes(on_device)} of it), the rest needs "
            f"{format_bytes(denial.requested)} of host RAM but at most "
            f"{format_bytes(denial.free)} of its {format_bytes(denial.cap)} cap can be had",
            reason="HOST",
            cap_bytes=denial.cap,
            reserved_bytes=denial.reserved,
            requested_bytes=denial.requested,
            reclaimable_bytes=denial.reclaimable,
            parts=dict(denial.parts),
            device={
                "device": where.device.index,
                "n_gpu_layers": n_gpu_layers,
                "layers": where.layers,
                "requested_bytes": on_device,
                "cap_bytes": where.device.ledger.cap,
                "reserved_bytes": where.device.ledger.reserved,
            },
        )

    def more_layers(self, slot: ModelSlot) -> int | None:
        """For a partially placed model: the most layers that would fit on its device now,
        its own weights and context given back (nobody else's closed), if more than it has."""
        layers = slot.info.n_layer + 1
        own = [r for charge in slot.weights.values() for r in charge]
        own += slot.context_reservation or ()
        n_ctx = max((a.n_ctx for a in slot.agents.values()), default=KV_PAD)
        key, info = slot.key, slot.info

        def denial_with(k: int) -> Denial | None:
            weights = self.weights_request(key, info, k)
            alone = self.context_request(key, info, n_ctx, 1, k)
            return slot.device.ledger.fits(weights, alone, ignoring=own)

        most = layers if denial_with(layers) is None else most_layers(layers, denial_with)
        return most if most is not None and most > slot.n_gpu_layers else None

    def evictable(
        self, device: Device, exclude: ModelSlot | None = None, for_job: Job | None = None
    ) -> list[ModelSlot]:
        """Other models' contexts on ``device`` that may be closed, least recently used first:
        those whose agents are all idle, and, for ``for_job``, those whose agents only wait
        for jobs submitted after it (first come, first served between models: a model whose
        agents always have work must not keep the memory from a job that came first)."""

        def closable(s: ModelSlot) -> bool:
            if s is exclude or s.context is None or not s.on(device):
                return False
            if s.all_idle:
                return True
            return for_job is not None and all(
                a.idle
                or (
                    a.activity is Activity.QUEUED
                    and a.jobs[0].timings.submitted > for_job.timings.submitted
                )
                for a in s.agents.values()
            )

        return sorted(filter(closable, self.slots.values()), key=lambda s: s.last_used)

    async def open_context(self, slot: ModelSlot, agent: Agent, job: Job) -> bool:
        """Give ``slot`` a context: room for all its agents if the cap allows, else for one.

        False when the room is held by other models' busy contexts: the job waits its turn.
        Raises the ledger's denial when nothing will ever make room.
        """
        n_seq = max(1, min(len(slot.agents), self.config.max_seqs))
        need = self.need(agent, job)
        shapes = [(self._stream(slot, need), n_seq), (need, 1)]
        short: Short | None = None
        for n_ctx, seqs in dict.fromkeys(shapes):
            requests = self.context_requests(slot.key, slot.info, n_ctx, seqs, slot.placement)
            while True:
                got = reserve(requests)
                if not isinstance(got, Short):
                    await self._create_context(slot, n_ctx, seqs, got)
                    return True
                short = got
                victims = self.evictable(short.device, exclude=slot, for_job=job)
                if not victims:
                    break
                await self.close_context(victims[0], job)
        assert short is not None
        others = [s for s in self.slots.values() if s is not slot and s.on(short.device)]
        if any(s.context is not None for s in others):
            # Busy contexts on the device that lacks the room will go idle, and then be
            # closed for this one; meanwhile their models admit no job that came after it
            # (Scheduler._admit).
            return False
        raise short.denial.error()

    async def _create_context(self, slot: ModelSlot, n_ctx: int, n_seq: int, res: Charge) -> None:
        """Open the context ``res`` reserved on the device, after reserving what it keeps in
        host RAM (LedgerDenied, reason HOST, if the host cannot hold it)."""
        host: Reservation | None = None
        if self.host is not None:
            _, request = self.host_requests(slot.key, slot.info, n_ctx, n_seq, slot.n_gpu_layers)
            try:
                host = await self.reserve_host(request, exclude=slot)
            except LmxdError:
                release(slot.placement.devices, res)
                raise
        params = ContextParams(
            n_ctx=n_ctx,
            n_seq_max=n_seq,
            n_batch=self.config.n_batch,
            n_ubatch=self.config.n_batch,
            n_threads=self.config.n_threads,
            op_offload=self.config.op_offload,
        )
        t0 = time.perf_counter()
        try:
            slot.context = await self.worker.open_context(slot.model, params)
        except LmxdError:
            release(slot.placement.devices, res)
            if host is not None and self.host is not None:
                self.host.release(host)
            raise
        slot.context_reservation, slot.context_host = res, host
        slot.seqs = [None] * n_seq
        log.info(
            "context open model=%s cells=%d seqs=%d bytes=%d ms=%.1f",
            slot.key,
            slot.context.n_ctx,
            n_seq,
            sum(r.bytes for r in res),
            (time.perf_counter() - t0) * 1000,
        )

    async def reserve_host(self, request: Request, exclude: ModelSlot | None = None) -> Reservation:
        """Reserve ``request`` in the host ledger, closing contexts whose agents are all idle
        (on any device: host RAM is one) until it fits; LedgerDenied (reason HOST) if it does
        not fit even then."""
        assert self.host is not None
        while isinstance(got := self.host.try_reserve(request), Denial):
            victims = [s for s in self._idle_host_contexts() if s is not exclude]
            if not victims:
                raise got.error()
            await self.close_context(victims[0])
        return got[0]

    def _idle_host_contexts(self) -> list[ModelSlot]:
        """Open contexts holding host RAM whose agents are all idle, least recently used first."""
        idle = [s for s in self.slots.values() if s.context_host is not None and s.all_idle]
        return sorted(idle, key=lambda s: s.last_used)

    async def close_context(self, slot: ModelSlot, job: Job | None = None) -> None:
        """Park every resident agent of ``slot`` (all idle), then free its context."""
        for agent in slot.residents():
            if not await self.park(agent, job):
                raise ParkBudgetExceeded(
                    f"cannot park {agent.id}: the host-RAM budget for parked state "
                    f"({self.store.budget} bytes) is used up ({self.store.used} in use)",
                    budget_bytes=self.store.budget,
                    used_bytes=self.store.used,
                )
        ctx, slot.context, slot.seqs = slot.context, None, []
        t0 = time.perf_counter()
        if ctx is not None:
            await self.worker.close_context(ctx)
        if slot.context_reservation is not None:
            release(slot.placement.devices, slot.context_reservation)
            slot.context_reservation = None
        if slot.context_host is not None and self.host is not None:
            self.host.release(slot.context_host)
        slot.context_host = None
        log.info("context closed model=%s ms=%.1f", slot.key, (time.perf_counter() - t0) * 1000)
        # What the devices held for it beyond the ledger (its scratch pools) went with it:
        # admission retried in this same round of making room must not count it still.
        for device in slot.placement.devices:
            device.reconcile()

    def reconcile(self) -> None:
        """Charge what each device holds beyond its ledger to it (GPU only: memory/reconcile)."""
        for device in self.devices:
            device.reconcile()

    # -- agents ------------------------------------------------------------------------------

    async def park(self, agent: Agent, job: Job | None = None) -> bool:
        """Move a resident agent's KV to host RAM and free its sequence. False if the park
        budget is spent. An agent whose sequence holds nothing only gives the sequence up: it
        has no KV anywhere, and is not counted or reported as parked. An agent whose KV was
        written ahead (:meth:`write_ahead`) only has its cells freed: the copy becomes its
        parked state.

        ``job`` is the job this park makes room for: it is charged the time and told who left.
        """
        slot, ctx, seq = agent.slot, agent.slot.context, agent.seq
        assert ctx is not None and seq is not None
        if agent.kv == 0:
            await self.worker.clear(ctx, seq)  # after a failed step it may hold a chunk
            slot.seqs[seq], agent.seq = None, None
            agent.place(Memory.NONE)
            return True
        agent.place(Memory.PARKING)
        ahead = agent.copy is not None
        t0 = time.perf_counter()
        try:
            if agent.copy is None:
                agent.copy = await self._save(agent, job)
            if agent.copy is not None:
                await self.worker.clear(ctx, seq)
        except LmxdError:
            agent.place(Memory.RESIDENT)
            raise
        state = agent.copy
        if state is None:
            agent.place(Memory.RESIDENT)
            return False
        slot.seqs[seq] = None
        agent.seq, agent.parked, agent.copy, agent.kv = None, state, None, 0
        agent.place(Memory.PARKED)
        elapsed = time.perf_counter() - t0
        agent.parks += 1
        self.transfers.parks += 1
        if ahead:
            self.transfers.parks_ahead += 1
        else:
            self.transfers.park_bytes += state.nbytes
            self.transfers.park_s += elapsed
        if job is not None:
            job.timings.park += elapsed
            job.parked.append(agent.id)
        log.info(
            "park agent=%s model=%s tokens=%d bytes=%d ms=%.2f written_ahead=%s",
            agent.id,
            slot.key,
            state.n_tokens,
            state.nbytes,
            elapsed * 1000,
            ahead,
        )
        return True

    async def _save(self, agent: Agent, job: Job | None) -> ParkedState | None:
        """A copy of ``agent``'s KV in the store. When the budget is spent, copies written
        ahead for other agents make way (they are only there to make parks faster), then
        parked agents are spilled to disk, least recently used first, the one ``job`` is for
        last (its state is read back from disk then)."""
        assert agent.slot.context is not None and agent.seq is not None
        state = await self.worker.save(agent.slot.context, agent.seq, self.store)
        if state is None and self._discard_copies():
            state = await self.worker.save(agent.slot.context, agent.seq, self.store)
        last = job.agent if job is not None else None
        while state is None and (spilled := self.next_to_spill(last)) is not None:
            if not await self.spill(spilled):
                break
            state = await self.worker.save(agent.slot.context, agent.seq, self.store)
        return state

    def _discard_copies(self) -> bool:
        """Free every copy written ahead; True if there was one."""
        copies = [a for s in self.slots.values() for a in s.agents.values() if a.copy]
        for agent in copies:
            self.discard_copy(agent)
        return bool(copies)

    def discard_copy(self, agent: Agent) -> None:
        """Forget ``agent``'s copy written ahead, if any (a job is about to change its KV)."""
        if agent.copy is not None:
            self.store.free(agent.copy)
            agent.copy = None

    # -- copies ahead of need ----------------------------------------------------------------

    def next_to_copy(self) -> Agent | None:
        """The idle resident agent whose KV to copy ahead of need, least recently used first
        (the first to be parked), where a park can come: its model has more agents than
        sequences, or another model's agents have no context (their next job may need this
        one's memory). Copies cost host RAM and bandwidth; elsewhere they would be waste."""
        starved = {s.key for s in self.slots.values() if s.agents and s.context is None}
        candidates = [
            a
            for s in self.slots.values()
            if s.context is not None and (len(s.agents) > len(s.seqs) or starved - {s.key})
            for a in s.idle_residents()
            if a.kv > 0 and a.copy is None
        ]
        return min(candidates, key=lambda a: a.last_used, default=None)

    async def write_ahead(self, agent: Agent) -> bool:
        """Copy an idle resident agent's KV to host RAM now, while the engine has nothing else
        to do; it stays resident. False if the park budget has no room for it."""
        assert agent.slot.context is not None and agent.seq is not None
        t0 = time.perf_counter()
        state = await self.worker.save(agent.slot.context, agent.seq, self.store)
        if state is None:
            return False
        agent.copy = state
        self.transfers.copies_ahead += 1
        self.transfers.copy_ahead_bytes += state.nbytes
        self.transfers.copy_ahead_s += time.perf_counter() - t0
        return True

    # -- the disk tier -----------------------------------------------------------------------

    def next_to_spill(self, last: Agent | None = None, idle: bool = False) -> Agent | None:
        """The parked agent to spill to disk: idle ones before queued ones (whose restore is
        near), least recently used first, and ``last`` (the agent a park makes room for)
        only when no other is left; None without a disk tier. ``idle``: for spills while the
        engine has nothing to do, only while parked states take more than three quarters of
        the budget."""
        if self.disk is None:
            return None
        parked = [
            a for s in self.slots.values() for a in s.agents.values() if a.memory is Memory.PARKED
        ]
        held = sum(len(a.parked.buffer) for a in parked if a.parked is not None)
        if idle and held <= self.store.budget * 3 // 4:
            return None
        return min(parked, key=lambda a: (a is last, not a.idle, a.last_used), default=None)

    async def spill(self, agent: Agent) -> bool:
        """Write a parked agent's state to its file and give its RAM back to the store.
        False if the write failed: the state stays parked in RAM."""
        assert self.disk is not None and agent.parked is not None
        agent.place(Memory.SPILLING)
        state, t0 = agent.parked, time.perf_counter()
        spilled = await self.disk.write(self._owner(agent), state)
        if spilled is None:
            agent.place(Memory.PARKED)
            return False
        self.store.free(state)
        agent.parked, agent.spilled = None, spilled
        agent.place(Memory.SPILLED)
        elapsed = time.perf_counter() - t0
        self.transfers.spills += 1
        self.transfers.spill_bytes += spilled.nbytes
        self.transfers.spill_s += elapsed
        log.info(
            "spill agent=%s model=%s tokens=%d bytes=%d ms=%.1f",
            agent.id,
            agent.slot.key,
            spilled.n_tokens,
            spilled.nbytes,
            elapsed * 1000,
        )
        return True

    async def keep(self, agent: Agent) -> None:
        """At a clean stop: an idle agent's KV to its state file, wherever it is now (a
        resident one's copied to host RAM first, if the budget allows)."""
        if self.disk is None or agent.memory is Memory.SPILLED:
            return
        if agent.memory is Memory.RESIDENT and agent.kv > 0 and agent.copy is None:
            await self.write_ahead(agent)
        state = agent.parked if agent.memory is Memory.PARKED else agent.copy
        if state is not None:
            await self.disk.write(self._owner(agent), state)

    def found_on_disk(self, agent: Agent) -> None:
        """An agent registered again after a restart takes its state file, if one matches
        its conversation: it is spilled, and its next job restores from it."""
        spilled = self.disk.find(self._owner(agent)) if self.disk is not None else None
        if spilled is not None:
            agent.spilled = spilled
            agent.place(Memory.SPILLED)

    async def _read_back(self, agent: Agent) -> ParkedState | None:
        """A spilled agent's state from its file (None if it does not verify)."""
        assert self.disk is not None and agent.spilled is not None
        t0 = time.perf_counter()
        state = await self.disk.read(self._owner(agent), agent.spilled)
        agent.spilled = None
        if state is not None:
            self.transfers.disk_reads += 1
            self.transfers.disk_read_bytes += state.nbytes
            self.transfers.disk_read_s += time.perf_counter() - t0
        return state

    @staticmethod
    def _owner(agent: Agent) -> StateOwner:
        return StateOwner(agent.id, agent.slot.info, agent.tokens)

    async def drop(self, agent: Agent) -> None:
        """Forget an agent's KV wherever it is (RESET, UNREGISTER)."""
        slot = agent.slot
        if agent.seq is not None and slot.context is not None:
            await self.worker.clear(slot.context, agent.seq)
            slot.seqs[agent.seq] = None
        if agent.parked is not None:
            self.store.discard(agent.parked)
        if agent.copy is not None:
            self.store.discard(agent.copy)
            agent.copy = None
        if agent.spilled is not None:
            assert self.disk is not None
            self.disk.remove(agent.id)
            agent.spilled = None
        agent.seq, agent.parked, agent.kv = None, None, 0
        if agent.memory is not Memory.NONE:
            agent.place(Memory.NONE)

    @staticmethod
    def need(agent: Agent, job: Job) -> int:
        """KV cells ``agent`` needs for ``job``: its conversation and longest reply, and at
        least what its KV holds now (a conversation sent again shorter still comes back
        whole before it is cut)."""
        return max(job.need(agent.n_ctx), agent.kv_tokens)

    @staticmethod
    def _stream(slot: ModelSlot, need: int) -> int:
        """Cells per stream for a context opened now: what the neediest agent needs (``need``
        for the job at hand, others' tokenized jobs, the KV of the rest) and a quarter more,
        rounded up to a power of two, so that growing conversations reopen the context
        rarely (a conversation just under a power of two would otherwise reopen it within a
        few turns); at most the largest n_ctx among the model's agents."""
        for a in slot.agents.values():
            job = a.jobs[0] if a.jobs else None
            held = job.need(a.n_ctx) if job is not None and job.conversation else a.kv_tokens
            need = max(need, held)
        stream = KV_PAD
        while stream < need + need // 4:
            stream *= 2
        return min(stream, max(a.n_ctx for a in slot.agents.values()))

    def _outgrown(self, slot: ModelSlot, need: int) -> bool:
        """The context's streams are shorter than ``need``, or it has fewer sequences than
        agents and none free."""
        wanted = min(len(slot.agents), self.config.max_seqs)
        short = len(slot.seqs) < wanted and slot.free_seq() is None
        return short or slot.stream_cells < need

    @staticmethod
    def _victim(slot: ModelSlot, job: Job) -> Agent | None:
        """Whose sequence ``job``'s agent takes: the least recently used idle resident, else
        the resident that waits for the most recently submitted job, if that came after
        ``job``. First come, first served: an agent whose client sends its next request the
        moment a reply ends must not keep its sequence from one that was waiting before."""
        idle = slot.idle_residents()
        if idle:
            return idle[0]
        later = [
            a
            for a in slot.residents()
            if a.activity is Activity.QUEUED and a.jobs[0].timings.submitted > job.timings.submitted
        ]
        return max(later, key=lambda a: a.jobs[0].timings.submitted, default=None)

    @staticmethod
    def _none_busy(slot: ModelSlot) -> bool:
        """Every agent idle or waiting: the context can be closed (every resident parked)
        and reopened in another shape without stalling anyone."""
        return all(a.activity is not Activity.RUNNING for a in slot.agents.values())

    async def make_resident(self, agent: Agent, job: Job) -> bool:
        """Give ``agent`` a sequence with room for ``job``, restoring its parked state.
        False: wait and try again. Its copy written ahead, if any, goes: the job changes its
        KV."""
        if not await self._seat(agent, job):
            return False
        self.discard_copy(agent)
        return True

    async def _seat(self, agent: Agent, job: Job) -> bool:
        slot = agent.slot
        need = self.need(agent, job)
        if agent.seq is not None and slot.stream_cells >= need:
            return True
        if slot.context is not None and self._outgrown(slot, need):
            if self._none_busy(slot):
                await self.close_context(slot, job)  # reopened below, with room for every agent
            elif slot.stream_cells < need:
                return False  # the job waits until the context can be reopened larger
        if agent.seq is not None:
            return True
        if slot.context is None and not await self.open_context(slot, agent, job):
            return False
        seq = slot.free_seq()
        if seq is None:
            victim = self._victim(slot, job)
            if victim is None or not await self.park(victim, job):
                return False
            seq = slot.free_seq()
            assert seq is not None
        assert slot.context is not None
        slot.seqs[seq], agent.seq = agent.id, seq
        if agent.memory is Memory.NONE:
            agent.place(Memory.RESIDENT)
        else:
            from_disk = agent.memory is Memory.SPILLED
            agent.place(Memory.RESTORING)
            t0 = time.perf_counter()
            state = await self._read_back(agent) if from_disk else agent.parked
            try:
                if state is not None:
                    await self.worker.restore(slot.context, seq, state)
            except LmxdError as exc:
                log.warning("restore agent=%s failed, prefilling instead: %s", agent.id, exc)
                if state is not None and not from_disk:
                    self.store.discard(state)
                state = None
            if state is None:
                # A state file that did not verify, or a state llama.cpp would not take (one
                # from before a restart, say): it is gone, and the job prefills the
                # conversation instead, rather than failing every DECODE of the agent.
                agent.parked, agent.kv = None, 0
                agent.place(Memory.NONE)
                agent.place(Memory.RESIDENT)
                return True
            elapsed = time.perf_counter() - t0
            job.timings.restore += elapsed
            job.restored = True
            agent.restores += 1
            self.transfers.restores += 1
            self.transfers.restore_bytes += state.nbytes
            self.transfers.restore_s += elapsed
            if not from_disk:  # a state read from disk is in ordinary memory, not the store's
                self.store.free(state)
            agent.parked, agent.kv = None, state.n_tokens
            agent.place(Memory.RESIDENT)
            log.info(
                "restore agent=%s model=%s tokens=%d bytes=%d ms=%.2f from_disk=%s",
                agent.id,
                slot.key,
                state.n_tokens,
                state.nbytes,
                job.timings.restore * 1000,
                from_disk,
            )
        return True
