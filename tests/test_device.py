from __future__ import annotations

import pytest

from lmxd.errors import BudgetParseError, InvalidInput
from lmxd.memory.device import DeviceInfo, ledger_cap, per_device, probe_device, probe_devices
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


def test_one_value_for_every_device_or_one_per_device() -> None:
    assert per_device(None, [0, 1], "--vram-limit") == {0: None, 1: None}
    assert per_device("8GiB", [0, 1], "--vram-limit") == {0: "8GiB", 1: "8GiB"}
    both = per_device("0=8GiB,1=16GiB", [0, 1], "--vram-limit")
    assert both == {0: "8GiB", 1: "16GiB"}
    assert per_device("1=80", [0, 1], "--vram-cap-percent") == {0: None, 1: "80"}


@pytest.mark.parametrize("spec", ["2=4GiB", "x=4GiB", "0=", "0=1GiB,,1=2GiB"])
def test_a_per_device_value_for_no_device_in_use_is_refused(spec: str) -> None:
    with pytest.raises(InvalidInput, match="--vram-limit") as refused:
        per_device(spec, [0, 1], "--vram-limit")
    assert "0, 1" in str(refused.value)


def test_without_a_gpu_the_one_device_is_host_memory() -> None:
    if probe_device().kind == "cuda":
        pytest.skip("this machine has a GPU: covered by the gpu tests")
    [host] = probe_devices()
    assert (host.kind, host.index) == ("cpu", 0)
    assert [d.kind for d in probe_devices([0])] == ["cpu"]
    with pytest.raises(InvalidInput, match="no GPU"):
        probe_devices([1])
