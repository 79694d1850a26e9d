from __future__ import annotations

import pytest

from lmxd.errors import BudgetParseError, InvalidInput
from lmxd.memory.device import DeviceInfo, ledger_cap, probe_device
from lmxd.units import GiB


def test_probe_without_gpu_reports_host_memory() -> None:
    info = probe_device()
    if info.kind == "cuda":
        pytest.skip("this machine has a GPU: covered by the gpu tests")
    assert info.kind == "cpu"
    assert 0 < info.free <= info.total
    assert 0 < info.process_used < info.total  # our own RSS


def test_cap_is_a_percentage_of_the_device_or_the_limit() -> None:
    card = DeviceInfo("cuda", "H200", 0, 140 * GiB, 139 * GiB, 0)
    assert ledger_cap(card) == int(140 * GiB * 0.9)
    assert ledger_cap(card, 50) == 70 * GiB
    assert ledger_cap(card, limit="8GiB") == int(8 * GiB * 0.9)
    small = DeviceInfo("cuda", "small", 0, 4 * GiB, 4 * GiB, 0)
    assert ledger_cap(small, limit="8GiB") == int(4 * GiB * 0.9)  # a limit never adds memory


@pytest.mark.parametrize("percent", [0, -5, 101])
def test_bad_percent(percent: float) -> None:
    with pytest.raises(InvalidInput):
        ledger_cap(probe_device(), percent)


def test_bad_limit() -> None:
    with pytest.raises(BudgetParseError):
        ledger_cap(probe_device(), limit="eight gigs")
