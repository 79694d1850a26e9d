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


def test_a_state_that_grew_a_little_finds_its_buffer_again() -> None:
    """New buffers have room for a quarter more, and a kept buffer serves any state up to it
    (but not one under half its size: that would hold memory a larger state needs)."""
    store = KvStore(budget=64 * MiB)
    a = store.allocate(4 * MiB)
    assert a is not None and len(a) >= 5 * MiB
    store.release(a)
    assert store.allocate(5 * MiB) is a  # the conversation grew by a quarter: same buffer
    store.release(a)
    small = store.allocate(2 * MiB)  # 5 MiB is more than twice 2 MiB: a buffer of its own
    assert small is not None and small is not a
    tight = KvStore(budget=4 * MiB)  # no room for the quarter more: the size asked for
    exact = tight.allocate(4 * MiB)
    assert exact is not None and len(exact) == 4 * MiB


def test_trim_gives_every_kept_buffer_back() -> None:
    store = KvStore(budget=64 * MiB)
    kept = [store.allocate(4 * MiB), store.allocate(8 * MiB)]
    in_use = store.allocate(2 * MiB)
    for buffer in kept:
        assert buffer is not None
        store.release(buffer)
    store.trim()
    assert store.used == len(in_use or b"")
    assert store.allocate(4 * MiB) is not kept[0]  # a new buffer: the kept one is gone


def test_a_discarded_state_is_not_kept_for_reuse() -> None:
    store = KvStore(budget=64 * MiB)
    buffer = store.allocate(4 * MiB)
    assert buffer is not None
    state = ParkedState(buffer, StateLayout(1, 0, (4 * MiB,)), 10)
    store.discard(state)
    assert store.used == 0 and len(state.buffer) == 0
    assert store.allocate(4 * MiB) is not buffer  # nothing was kept: a new buffer
