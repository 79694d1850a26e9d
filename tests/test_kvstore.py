"""The parking store: budget, buffer reuse, and giving idle buffers back under pressure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmxd.engine.context import StateLayout
from lmxd.kvstore import KvStore, ParkedState, size_class

MiB = 1 << 20


@given(st.integers(1, 1 << 40))
def test_size_classes_cover_the_request_with_little_slack(n: int) -> None:
    size = size_class(n)
    assert size >= n and (size <= n * 1.125 or size == MiB)


def test_buffers_are_reused_and_the_budget_holds() -> None:
    store = KvStore(budget=10 * MiB)
    a = store.allocate(3 * MiB)
    assert a is not None and len(a) >= 3 * MiB and store.used == len(a)
    assert store.allocate(8 * MiB) is None  # 3 + 8 > 10
    state = ParkedState(a, StateLayout(1, 0, (3 * MiB,)), 100)
    store.free(state)
    assert store.used == 0
    again = store.allocate(3 * MiB)
    assert again is a  # the same buffer, not a new allocation
    store.free(ParkedState(again, StateLayout(1, 0, (3 * MiB,)), 100))
    big = store.allocate(9 * MiB)  # the idle 3 MiB buffer is given back to make room
    assert big is not None and store.used == len(big)


def test_over_budget_is_a_value_not_an_exception() -> None:
    assert KvStore(budget=MiB).allocate(2 * MiB) is None
