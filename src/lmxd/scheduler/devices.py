"""The devices models are placed on, each with a ledger under its own cap, and where a model goes.

Placement: a model already loaded stays where it is, and a new agent of it joins it there. A
new model goes to the device where it fits (its weights and one agent's context, counting the
room that closing idle contexts there would give back) with the most room left after it, the
lowest index first on a tie; where it fits on none, its REGISTER is refused with each device's
numbers. A model lives on one device: its weights, its KV and its compute buffers (llama.cpp's
split mode "none", ``main_gpu`` the device), so that each device's ledger charges exactly what
that device holds, and its agents' parked states come back onto it.

Partial placement (issue #12): a model whose weights and one agent's context fit whole on no
device, even with its idle contexts closed, is placed with as many of its layers as fit on the
device where the most fit (llama.cpp's ``n_gpu_layers``; it offloads the output layer first,
then the blocks from the last), the rest in host RAM, charged to the host's ledger. Only a
model the host cannot hold the rest of either is refused, with both ledgers' numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmxd.errors import LedgerDenied
from lmxd.memory.device import DeviceInfo
from lmxd.memory.ledger import Denial, Ledger
from lmxd.memory.reconcile import Reconciler
from lmxd.units import format_bytes


@dataclass
class Device:
    """One device in use: what it is, its ledger, and (on a GPU) what reads its own figure."""

    index: int
    info: DeviceInfo  # as probed at the start: kind, name, total
    ledger: Ledger
    reconciler: Reconciler | None = None

    def reconcile(self) -> None:
        if self.reconciler is not None:
            self.reconciler.reconcile()


@dataclass(frozen=True)
class Placement:
    """Where a model's layers go: ``n_gpu_layers`` of its ``layers`` (its blocks and its
    output layer) on ``device``, the rest in host RAM."""

    device: Device
    n_gpu_layers: int
    layers: int


def most_layers(layers: int, denial_with: Callable[[int], Denial | None]) -> int | None:
    """The largest n_gpu_layers below ``layers`` for which ``denial_with`` gives no denial
    (the device's bytes grow with every layer, so a bisection finds it); None if not even 0."""
    if denial_with(0) is not None:
        return None
    fits, refused = 0, layers
    while refused - fits > 1:
        middle = (fits + refused) // 2
        if denial_with(middle) is None:
            fits = middle
        else:
            refused = middle
    return fits


def place(devices: Sequence[Device], denial_on: Callable[[Device], Denial | None]) -> Device:
    """The device for a new model: of those where ``denial_on`` gives no denial, the one with
    the most room left (the lowest index on a tie). LedgerDenied with every device's numbers
    where it fits on none."""
    refused: list[tuple[Device, Denial]] = []
    fits: list[Device] = []
    for device in devices:
        denial = denial_on(device)
        if denial is None:
            fits.append(device)
        else:
            refused.append((device, denial))
    if fits:
        return max(fits, key=lambda d: (d.ledger.cap - d.ledger.reserved, -d.index))
    if len(refused) == 1:
        raise refused[0][1].error()
    raise _refusal(refused)


def _refusal(refused: list[tuple[Device, Denial]]) -> LedgerDenied:
    """A model that fits on no device: the numbers of each, and at the top level those of the
    device that came closest."""
    best = max((denial for _, denial in refused), key=lambda denial: denial.free)
    detail = "; ".join(
        f"device {device.index}: at most {format_bytes(denial.free)} of its "
        f"{format_bytes(denial.cap)} cap"
        for device, denial in refused
    )
    per_device = [
        {"device": device.index}
        | {k: v for k, v in denial.error().details.items() if k.endswith("_bytes")}
        for device, denial in refused
    ]
    return LedgerDenied(
        f"VRAM ledger denies {' + '.join(best.owners)} on every device: needs "
        f"{format_bytes(best.requested)}; {detail}",
        **best.error().details,
        devices=per_device,
    )
