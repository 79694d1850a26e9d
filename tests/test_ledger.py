"""The VRAM ledger: admission under the cap, all-or-nothing, shared weights charged once."""

from __future__ import annotations

import threading

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from lmxd.errors import InvalidInput, LedgerDenied
from lmxd.memory.ledger import Denial, Ledger, Request, Reservation
from lmxd.units import GiB, MiB


def test_denial_carries_the_numbers_and_reserves_nothing() -> None:
    ledger = Ledger(cap=8 * GiB)
    granted = ledger.try_reserve(Request("agent:a", {"kv": 6 * GiB}))
    assert isinstance(granted, tuple)
    denial = ledger.try_reserve(
        Request("model:m", {"weights": 1 * GiB}, key="m"),
        Request("agent:b", {"kv": 1 * GiB, "compute": 100 * MiB}),
    )
    assert isinstance(denial, Denial)
    assert (denial.cap, denial.reserved, denial.requested) == (
        8 * GiB,
        6 * GiB,
        2 * GiB + 100 * MiB,
    )
    assert denial.parts == {"weights": 1 * GiB, "kv": 1 * GiB, "compute": 100 * MiB}
    assert denial.owners == ("model:m", "agent:b")
    assert ledger.reserved == 6 * GiB  # the model's part was not kept
    assert "8.00 GiB cap" in denial.message() and "weights 1.00 GiB" in denial.message()
    err = denial.error()
    assert isinstance(err, LedgerDenied) and err.code == "VRAM_LEDGER_DENY"
    assert err.details["requested_bytes"] == denial.requested


def test_shared_weights_are_charged_once() -> None:
    ledger = Ledger(cap=10 * GiB)
    weights = {"weights": 3 * GiB}
    a = ledger.try_reserve(Request("model:m", weights, key="m"), Request("agent:a", {"kv": GiB}))
    b = ledger.try_reserve(Request("model:m", weights, key="m"), Request("agent:b", {"kv": GiB}))
    assert isinstance(a, tuple) and isinstance(b, tuple)
    assert ledger.reserved == 5 * GiB
    for r in a:
        ledger.release(r)
    assert ledger.reserved == 4 * GiB  # b still holds the weights
    for r in b:
        ledger.release(r)
        ledger.release(r)  # twice is harmless
    assert ledger.reserved == 0 and ledger.snapshot() == {}


def test_another_ledgers_reservation_frees_nothing_here() -> None:
    """A model split over two devices holds a reservation in each ledger; one of them, passed
    to the other ledger's ``fits(ignoring=...)``, must not stand for a charge there."""
    here, there = Ledger(100), Ledger(100)
    here.try_reserve(Request("model:a", {"weights": 80}))
    elsewhere = there.try_reserve(Request("context:b", {"kv": 10}))
    assert not isinstance(elsewhere, Denial)
    denial = here.fits(Request("model:c", {"weights": 90}), ignoring=elsewhere)
    assert denial is not None and denial.reclaimable == 0


def test_exactly_the_cap_fits() -> None:
    ledger = Ledger(cap=100)
    assert isinstance(ledger.try_reserve(Request("a", {"kv": 100})), tuple)
    assert isinstance(ledger.try_reserve(Request("b", {"kv": 1})), Denial)


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5])
def test_bad_sizes_are_refused(bad: int) -> None:
    with pytest.raises(InvalidInput):
        Ledger(cap=100).try_reserve(Request("a", {"kv": bad}))


def test_bad_cap() -> None:
    with pytest.raises(InvalidInput):
        Ledger(cap=0)


def test_concurrent_reserves_never_cross_the_cap() -> None:
    ledger = Ledger(cap=1000)
    granted: list[Reservation] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            got = ledger.try_reserve(Request("w", {"kv": 7}))
            if isinstance(got, tuple):
                assert ledger.reserved <= 1000
                with lock:
                    granted.extend(got)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 1000 // 7
    assert ledger.reserved == 7 * len(granted)


class LedgerMachine(RuleBasedStateMachine):
    """Any sequence of reserves and releases keeps reserved == sum of live charges <= cap."""

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.cap = 1000
        self.ledger = Ledger(self.cap)
        self.live: dict[int, Reservation] = {}

    @rule(
        target=reservations,
        sizes=st.lists(st.integers(0, 600), min_size=1, max_size=3),
        key=st.sampled_from([None, None, "m1", "m2"]),
    )
    def reserve(self, sizes: list[int], key: str | None) -> tuple[Reservation, ...]:
        before = self.ledger.reserved
        shared_live = key is not None and any(r.key == key for r in self.live.values())
        requests = [
            Request(f"o{i}", {"kv": s}, key=key if i == 0 else None) for i, s in enumerate(sizes)
        ]
        new_bytes = sum(sizes[1:]) + (0 if shared_live else sizes[0])
        got = self.ledger.try_reserve(*requests)
        if before + new_bytes <= self.cap:
            assert isinstance(got, tuple)
            assert self.ledger.reserved == before + new_bytes
            self.live.update((r.id, r) for r in got)
            return got
        assert isinstance(got, Denial) and got.requested == new_bytes
        assert self.ledger.reserved == before
        return ()

    @rule(group=consumes(reservations))
    def release(self, group: tuple[Reservation, ...]) -> None:
        for r in group:
            self.ledger.release(r)
            self.live.pop(r.id, None)

    @invariant()
    def reserved_is_the_sum_of_live_charges(self) -> None:
        charges: dict[object, int] = {}
        for r in self.live.values():
            charges[r.key if r.key is not None else r.id] = r.bytes
        assert self.ledger.reserved == sum(charges.values()) <= self.cap
        assert sum(self.ledger.snapshot().values()) == self.ledger.reserved


TestLedgerMachine = LedgerMachine.TestCase


def test_fits_answers_as_if_the_ignored_were_released() -> None:
    ledger = Ledger(cap=10 * GiB)
    got = ledger.try_reserve(Request("context:a", {"kv": 6 * GiB}))
    assert isinstance(got, tuple)
    big = Request("context:b", {"kv": 8 * GiB})
    assert isinstance(ledger.fits(big), Denial)
    assert ledger.fits(big, ignoring=got) is None
    assert ledger.reserved == 6 * GiB  # nothing changed
    shared = ledger.try_reserve(Request("model:m", {"weights": GiB}, key="m"))
    other = ledger.try_reserve(Request("model:m", {"weights": GiB}, key="m"))
    assert isinstance(shared, tuple) and isinstance(other, tuple)
    # a shared charge goes only when every holder is ignored
    denial = ledger.fits(Request("x", {"kv": 4 * GiB}), ignoring=shared)
    assert isinstance(denial, Denial) and denial.reserved == 7 * GiB
    assert denial.reclaimable == 0 and denial.free == 3 * GiB
    denial = ledger.fits(Request("x", {"kv": 10 * GiB}), ignoring=got)
    assert isinstance(denial, Denial) and denial.reclaimable == 6 * GiB
    assert denial.free == 9 * GiB and "6.00 GiB of it idle" in denial.message()
    assert ledger.fits(Request("x", {"kv": 4 * GiB}), ignoring=(*shared, *other)) is None


def test_unaccounted_bytes_count_for_admission_and_show_by_owner() -> None:
    ledger = Ledger(cap=8 * GiB)
    assert ledger.try_reserve(Request("model:m", {"weights": 5 * GiB})) is not None
    ledger.set_unaccounted(2 * GiB)
    assert ledger.reserved == 7 * GiB and ledger.snapshot()["unaccounted"] == 2 * GiB
    denial = ledger.try_reserve(Request("context:m", {"kv": 2 * GiB}))
    assert isinstance(denial, Denial) and denial.reserved == 7 * GiB
    ledger.set_unaccounted(0)  # the device gave it back
    assert not isinstance(ledger.try_reserve(Request("context:m", {"kv": 2 * GiB})), Denial)
    assert "unaccounted" not in ledger.snapshot()


def test_a_live_shared_charge_is_granted_even_over_the_cap() -> None:
    """What the device holds beyond the reservations may take the total past the cap; a
    second holder of a live shared charge brings no new bytes and is still granted (the last
    UNREGISTER of a model hands its weights to the keep-alive that way)."""
    ledger = Ledger(100)
    weights = Request("model:m", {"weights": 60}, key="weights:m")
    got = ledger.try_reserve(weights)
    assert not isinstance(got, Denial)
    ledger.set_unaccounted(50)  # 110 of a 100-byte cap
    again = ledger.try_reserve(weights)
    assert not isinstance(again, Denial) and ledger.reserved == 110
    assert isinstance(ledger.try_reserve(Request("agent:a", {"kv": 1})), Denial)


def test_a_host_ledger_says_so() -> None:
    denial = Ledger(10, host=True).try_reserve(Request("model:m", {"weights": 11}))
    assert isinstance(denial, Denial)
    error = denial.error()
    assert error.details["reason"] == "HOST" and str(error).startswith("host RAM ledger denies")
