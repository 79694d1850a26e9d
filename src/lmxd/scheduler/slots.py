"""A model's life in the daemon: weights loaded once, one context shared by its agents.

A slot is created by the first REGISTER of its model (weights charged to the ledger, one
handle per agent, so the charge goes with the last of them), gets a context when one of its
agents first needs to be resident, loses the context when every agent is idle and its room is
needed (or all are parked), and is unloaded after a keep-alive once no agent refers to it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmxd.chat.template import ChatTemplate
from lmxd.engine.stepper import SliceControl
from lmxd.engine.worker import ContextHandle, ModelHandle
from lmxd.memory.ledger import Reservation
from lmxd.modelfile import ModelInfo
from lmxd.results import DecodeResult
from lmxd.scheduler.agents import Activity, Agent, Memory
from lmxd.scheduler.devices import Charge, Device, Placement
from lmxd.scheduler.jobs import Job

KEEPALIVE_HOLDER = "\0keepalive"  # the weights handle held while no agent refers to the model


@dataclass
class ModelSlot:
    key: str  # the name agents gave (catalog name or file stem)
    path: Path
    info: ModelInfo
    model: ModelHandle
    chat: ChatTemplate
    placement: Placement  # where its weights, KV and compute live
    agents: dict[str, Agent] = field(default_factory=dict)
    weights: dict[str, Charge] = field(default_factory=dict)  # holder -> handle
    context: ContextHandle | None = None
    context_reservation: Charge | None = None
    host_weights: Reservation | None = None  # host RAM of a CUDA model (its host ledger)
    may_grow: bool = True  # partially placed: reloaded with more layers when room frees up
    context_host: Reservation | None = None
    control: SliceControl | None = None  # while a slice of this model runs
    to_park: list[Agent] = field(default_factory=list)  # forced parks, one per turn
    held: list[tuple[Job, DecodeResult]] = field(default_factory=list)  # replies until then
    seqs: list[str | None] = field(default_factory=list)  # agent id per sequence id
    unload_timer: asyncio.TimerHandle | None = None
    last_used: float = field(default_factory=time.monotonic)
    generated: int = 0  # tokens its agents generated since it loaded (after every slice)
    # Its decode speed, measured: tokens generated and its slices' wall time, since it was
    # loaded or reloaded with more layers.
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def device(self) -> Device:
        """Its first device: the one whose lane runs its steps."""
        return self.placement.device

    @property
    def n_gpu_layers(self) -> int:
        """Of its n_layer + 1, on its device(s): all but for partially placed models."""
        return self.placement.n_gpu_layers

    def on(self, device: Device) -> bool:
        """Whether some of its layers are on ``device``."""
        return any(share.device is device for share in self.placement.shares)

    def context_on(self, device: Device) -> Reservation | None:
        """Its context's reservation in ``device``'s ledger, if it has one there."""
        shares, charge = self.placement.shares, self.context_reservation or ()
        return next((r for s, r in zip(shares, charge, strict=False) if s.device is device), None)

    @property
    def partial(self) -> bool:
        """Some of its layers are in host RAM (lmxd.scheduler.devices)."""
        return self.n_gpu_layers <= self.info.n_layer

    @property
    def pool_cells(self) -> int:
        return self.context.n_ctx if self.context is not None else 0

    @property
    def stream_cells(self) -> int:
        """Cells of one sequence's KV stream: the most one resident agent can hold."""
        return self.context.n_ctx_seq if self.context is not None else 0

    def used_cells(self) -> int:
        return sum(a.kv for a in self.residents())

    def free_seq(self) -> int | None:
        return next((i for i, owner in enumerate(self.seqs) if owner is None), None)

    def residents(self) -> list[Agent]:
        return [a for a in self.agents.values() if a.seq is not None]

    def idle_residents(self) -> list[Agent]:
        """Resident agents that may be parked, least recently used first."""
        idle = [a for a in self.residents() if a.idle and a.memory is Memory.RESIDENT]
        return sorted(idle, key=lambda a: a.last_used)

    def waiting_for_context(self) -> float | None:
        """When the oldest queued job was submitted, if this model has no context: its
        agents wait for memory (or for their turn to open one)."""
        if self.context is not None:
            return None
        queued = [a for a in self.agents.values() if a.activity is Activity.QUEUED]
        return min((a.jobs[0].timings.submitted for a in queued), default=None)

    @property
    def all_idle(self) -> bool:
        return all(a.idle for a in self.agents.values())

    @property
    def has_work(self) -> bool:
        """Agents waiting for their turn, or decoding with their stream read (or cancelled):
        an agent whose client stopped reading waits without taking turns; or parks owed."""
        return bool(self.to_park) or any(
            a.activity is Activity.QUEUED
            or (
                a.activity is Activity.RUNNING
                and (not a.jobs[0].stream_full or a.jobs[0].cancelled)
            )
            for a in self.agents.values()
        )
