"""The VRAM ledger: admission control under a cap, before anything is allocated.

Every byte lmxd puts on the device is reserved here first; a reservation that would cross the
cap is denied with the numbers (cap, reserved, requested, each part), and the caller allocates
nothing. Release returns the bytes; releasing twice is harmless. Requests are granted all
together or not at all, so a registration that needs a model's weights and an agent's KV
cannot end half-charged.

Weights shared by several agents are charged once: a request with a ``key`` (the model's) that
is already live adds a reference instead of bytes, and the bytes go when the last reference
does. "Does not fit" is a value (:class:`Denial`), not an exception: the scheduler's
park-and-retry loop reads better that way; :meth:`Denial.error` makes the exception for the
boundary.

What the device holds beyond every reservation (the CUDA backend's memory pools, cuBLAS
workspaces: real memory no buffer size reports) is charged to the owner ``unaccounted`` by
:class:`lmxd.memory.reconcile.Reconciler`, from the device's own figure; admission counts it
like any other charge.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lmxd.errors import InvalidInput, LedgerDenied
from lmxd.units import format_bytes

_MAX_BYTES = 2**62  # far above any card; rejects overflowed or corrupted sizes
UNACCOUNTED = "unaccounted"  # the owner of the bytes the device holds beyond every reservation
# Reservation ids, unique across every ledger: a model split over devices holds one on each,
# and a set of them passed to another ledger's ``fits(ignoring=...)`` must not name its own.
_ids = itertools.count(1)


@dataclass(frozen=True)
class Request:
    owner: str  # who the bytes are for: "model:smollm2-135m", "agent:coder"...
    parts: Mapping[str, int]  # bytes by part: {"weights": ..., "kv": ..., "compute": ...}
    key: str | None = None  # share one charge among all live requests with this key

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Reservation:
    """A handle on reserved bytes; give it back with :meth:`Ledger.release`."""

    id: int
    owner: str
    bytes: int
    key: str | None = None


@dataclass(frozen=True)
class Denial:
    """Why a request was refused, with every number needed to see it."""

    cap: int
    reserved: int
    requested: int
    parts: dict[str, int]
    owners: tuple[str, ...]
    reclaimable: int = 0  # of ``reserved``, what releasing the ignored reservations would free
    ledger: str = "VRAM ledger"  # which ledger denies, for the message
    reason: str = "CAP"  # the error's ``reason``: CAP for a device, HOST for host RAM

    @property
    def free(self) -> int:
        """What could be had: the free bytes plus the reclaimable ones."""
        return self.cap - self.reserved + self.reclaimable

    def message(self) -> str:
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v)
        reclaim = f", {format_bytes(self.reclaimable)} of it idle" if self.reclaimable else ""
        return (
            f"{self.ledger} denies {' + '.join(self.owners)}: needs {format_bytes(self.requested)} "
            f"({detail}) but at most {format_bytes(self.free)} of the {format_bytes(self.cap)} "
            f"cap can be had ({format_bytes(self.reserved)} reserved{reclaim})"
        )

    def error(self) -> LedgerDenied:
        return LedgerDenied(
            self.message(),
            reason=self.reason,
            cap_bytes=self.cap,
            reserved_bytes=self.reserved,
            requested_bytes=self.requested,
            reclaimable_bytes=self.reclaimable,
            parts=dict(self.parts),
        )


@dataclass
class _Charge:
    owner: str
    bytes: int
    holders: set[int] = field(default_factory=set)


class Ledger:
    """Thread-safe reserve/release of device bytes under ``cap``. A device's ledger by
    default; ``host=True`` makes the host-RAM ledger of what CUDA models keep there (its
    denials say so, with reason HOST)."""

    def __init__(self, cap: int, host: bool = False) -> None:
        if not 0 < cap < _MAX_BYTES:
            raise InvalidInput(f"ledger cap must be positive, got {cap}")
        self.cap = cap
        self._names = ("host RAM ledger", "HOST") if host else ("VRAM ledger", "CAP")
        self._lock = threading.Lock()
        self._charges: dict[str | int, _Charge] = {}  # by key, or by reservation id if unkeyed
        self._holder_charge: dict[int, str | int] = {}  # reservation id -> charge
        self._unaccounted = 0

    @property
    def reserved(self) -> int:
        with self._lock:
            return self._reserved()

    def _reserved(self) -> int:
        return sum(c.bytes for c in self._charges.values()) + self._unaccounted

    @property
    def unaccounted(self) -> int:
        """Bytes the device holds beyond every reservation, as last reconciled."""
        with self._lock:
            return self._unaccounted

    def set_unaccounted(self, nbytes: int) -> None:
        """Charge ``nbytes`` to ``unaccounted`` (replacing the last figure). It may take the
        total past the cap: the device already holds it, and admission then refuses until
        enough is released."""
        if not 0 <= nbytes < _MAX_BYTES:
            raise InvalidInput(f"bad unaccounted byte count: {nbytes}")
        with self._lock:
            self._unaccounted = nbytes

    def try_reserve(self, *requests: Request) -> tuple[Reservation, ...] | Denial:
        """Reserve all ``requests`` or none; a keyed request already live costs nothing new."""
        with self._lock:
            denial = self._check(requests, ignoring=())
            if denial is not None:
                return denial
            granted = []
            for r in requests:
                rid = next(_ids)
                slot: str | int = r.key if r.key is not None else rid
                charge = self._charges.setdefault(slot, _Charge(r.owner, r.bytes))
                charge.holders.add(rid)
                self._holder_charge[rid] = slot
                granted.append(Reservation(rid, r.owner, charge.bytes, r.key))
            return tuple(granted)

    def fits(self, *requests: Request, ignoring: Iterable[Reservation] = ()) -> Denial | None:
        """Would ``requests`` be granted if the reservations in ``ignoring`` were released?

        Nothing changes. The scheduler asks this before deciding to park idle agents: the
        answer tells whether parking them could make room at all.
        """
        with self._lock:
            return self._check(requests, ignoring)

    def _check(self, requests: Iterable[Request], ignoring: Iterable[Reservation]) -> Denial | None:
        requests = tuple(requests)
        for r in requests:
            if any(not isinstance(v, int) or not 0 <= v < _MAX_BYTES for v in r.parts.values()):
                raise InvalidInput(f"bad byte counts in request for {r.owner}: {dict(r.parts)}")
        # Charges that would go: those whose every holder is among the ignored reservations.
        ignored = {r.id for r in ignoring}
        freed = {slot for slot, c in self._charges.items() if c.holders and c.holders <= ignored}
        new: list[Request] = []  # the requests that bring new bytes
        new_keys: set[str] = set()
        for r in requests:
            if r.key is not None:
                if (r.key in self._charges and r.key not in freed) or r.key in new_keys:
                    continue
                new_keys.add(r.key)
            new.append(r)
        requested = sum(r.bytes for r in new)
        reserved = self._reserved()
        reclaimable = sum(self._charges[slot].bytes for slot in freed)
        # Requests that bring no new bytes (a live shared charge) take nothing: they are
        # granted even while what the device holds beyond the reservations is over the cap.
        if requested == 0 or reserved - reclaimable + requested <= self.cap:
            return None
        parts: dict[str, int] = {}
        for r in new:
            for name, size in r.parts.items():
                parts[name] = parts.get(name, 0) + size
        owners = tuple(r.owner for r in requests)
        return Denial(self.cap, reserved, requested, parts, owners, reclaimable, *self._names)

    def release(self, reservation: Reservation) -> None:
        """Give the bytes back (for a shared charge, when its last holder releases)."""
        with self._lock:
            slot = self._holder_charge.pop(reservation.id, None)
            if slot is None:
                return  # already released
            charge = self._charges[slot]
            charge.holders.discard(reservation.id)
            if not charge.holders:
                del self._charges[slot]

    def snapshot(self) -> dict[str, int]:
        """Reserved bytes by owner."""
        with self._lock:
            out: dict[str, int] = {}
            for c in self._charges.values():
                out[c.owner] = out.get(c.owner, 0) + c.bytes
            if self._unaccounted:
                out[UNACCOUNTED] = self._unaccounted
            return out
