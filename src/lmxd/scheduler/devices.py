"""The devices models are placed on, each with a ledger under its own cap, and where a model goes.

Placement: a model already loaded stays where it is, and a new agent of it joins it there. A
new model goes to the device where it fits (its weights and one agent's context, counting the
room that closing idle contexts there would give back) with the most room left after it, the
lowest index first on a tie. A model that fits on one device lives there: its weights, its KV
and its compute buffers (llama.cpp's split mode "none", ``main_gpu`` the device), so that each
device's ledger charges exactly what that device holds, and its agents' parked states come
back onto it.

Split by layer: a model that fits whole on no device, even with idle contexts closed, is split
over several when they hold it together: in index order (llama.cpp gives lower layers to lower
indices), each device takes the most of the next layers that fit (:func:`split_by_layer`).
Each device's ledger is charged for its share (a :data:`Charge` holds a reservation on each).

Partial placement (issue #12): a model that fits neither whole nor split is placed with as many
of its layers as fit on the device where the most fit (llama.cpp's ``n_gpu_layers``; it
offloads the output layer first, then the blocks from the last), the rest in host RAM, charged
to the host's ledger. Only a model the host cannot hold the rest of either is refused, with
both ledgers' numbers; with partial placement off, one that fits neither whole nor split is
refused with each device's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmxd.errors import LedgerDenied
from lmxd.memory.device import DeviceInfo
from lmxd.memory.ledger import Denial, Ledger, Request, Reservation
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
class Share:
    """The layers of a model one device holds: ``span`` of its n_layer + 1 (the output layer
    is the last), with their weights, KV and compute buffer."""

    device: Device
    span: range


@dataclass(frozen=True)
class Placement:
    """Where a model's layers go, of its ``layers`` (its blocks and its output layer): the
    last ``n_gpu_layers`` on one device and the rest in host RAM, or all of them split over
    several devices by layer, lower layers on lower device indices."""

    shares: tuple[Share, ...]
    layers: int

    @classmethod
    def single(cls, device: Device, n_gpu_layers: int, layers: int) -> Placement:
        """The last ``n_gpu_layers`` of ``layers`` on ``device``."""
        return cls((Share(device, range(layers - n_gpu_layers, layers)),), layers)

    @property
    def device(self) -> Device:
        """The first device: its lane drives the model's steps, its chain its turns."""
        return self.shares[0].device

    @property
    def n_gpu_layers(self) -> int:
        return sum(len(share.span) for share in self.shares)

    @property
    def devices(self) -> list[Device]:
        return [share.device for share in self.shares]

    @property
    def split(self) -> bool:
        return len(self.shares) > 1


# What one charge holds for a model: a reservation on each of its devices' ledgers, in the
# order of its placement's shares.
Charge = tuple[Reservation, ...]


@dataclass(frozen=True)
class Short:
    """A charge refused: the device whose ledger refused it, and why."""

    device: Device
    denial: Denial


def reserve(requests: Sequence[tuple[Device, Request]]) -> Charge | Short:
    """Each request in its device's ledger, all of them or none."""
    got: list[Reservation] = []
    for device, request in requests:
        granted = device.ledger.try_reserve(request)
        if isinstance(granted, Denial):
            release([d for d, _ in requests], tuple(got))
            return Short(device, granted)
        got.append(granted[0])
    return tuple(got)


def release(devices: Sequence[Device], charge: Charge) -> None:
    """Give back a charge's reservations, each to its device's ledger."""
    for device, reservation in zip(devices, charge, strict=False):
        device.ledger.release(reservation)


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


def split_by_layer(
    devices: Sequence[Device], layers: int, denial_with: Callable[[Device, range], Denial | None]
) -> Placement | None:
    """All ``layers`` split over ``devices`` by layer, or None where they do not fit: in
    index order (llama.cpp gives lower layers to lower device indices), each device takes
    the most layers that fit from where the one before it stopped; a device that takes none
    is left out. ``denial_with(device, span)``: would ``span`` fit on ``device``."""
    shares: list[Share] = []
    start = 0
    for device in devices:
        if start == layers:
            break

        def denial_of(k: int, device: Device = device, start: int = start) -> Denial | None:
            return denial_with(device, range(start, start + k))

        most = most_layers(layers - start + 1, denial_of)
        if not most:
            continue
        shares.append(Share(device, range(start, start + most)))
        start += most
    return Placement(tuple(shares), layers) if start == layers and len(shares) > 1 else None


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
