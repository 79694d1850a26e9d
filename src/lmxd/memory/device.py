"""The device probe: what each card (or, without one, the host) has and what we use of it.

GPUs are read through NVML (``nvidia-ml-py``), imported only when asked for, so a machine
without an NVIDIA driver needs no NVIDIA library: there the probe reports host memory, which is
where llama.cpp's buffers land on a CPU build, as the one device. GPU indices are NVML's, which
follow the PCI bus order; the daemon sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA (and
llama.cpp's ``main_gpu``) numbers the cards the same way.

Each device has its own ledger cap: ``--vram-limit`` and ``--vram-cap-percent`` take one value
for every device (``8GiB``) or one per device (``0=8GiB,1=16GiB``; a device not named keeps the
default).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmxd.errors import InvalidInput
from lmxd.units import parse_bytes

DEFAULT_CAP_PERCENT = 90.0


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    index: int
    total: int  # bytes on the device (host RAM for "cpu")
    free: int
    process_used: int  # bytes this process holds there (NVML per-process, or RSS)


def probe_device(index: int = 0, pid: int | None = None) -> DeviceInfo:
    """GPU ``index`` through NVML when there is one, else the host's memory.

    ``process_used`` is process ``pid``'s (default: this process).
    """
    gpu = _probe_nvml(index, pid or os.getpid())
    return gpu if gpu is not None else probe_host()


def probe_devices(selected: Sequence[int] | None = None) -> list[DeviceInfo]:
    """Every GPU NVML lists, or those ``selected`` (``--devices``); on a machine without one,
    the host's memory as the one device (index 0). INVALID_INPUT for an index with no GPU."""
    count = _gpu_count()
    if count == 0:
        if selected is not None and list(selected) != [0]:
            raise InvalidInput(
                f"--devices {','.join(map(str, selected))}: this machine has no GPU "
                "(its one device is host memory, 0)"
            )
        return [probe_host()]
    indices = list(range(count)) if selected is None else list(selected)
    missing = [i for i in indices if not 0 <= i < count]
    if missing or not indices or len(set(indices)) != len(indices):
        raise InvalidInput(
            f"--devices {','.join(map(str, indices))}: this machine has GPUs 0 to {count - 1}, "
            "each named once"
        )
    return [probe_device(i) for i in sorted(indices)]


def per_device(spec: str | None, indices: Sequence[int], option: str) -> dict[int, str | None]:
    """``spec`` for each device: one value for all (``8GiB``), or ``INDEX=VALUE`` pairs
    separated by commas (a device not named gets None: the default)."""
    if spec is None or "=" not in spec:
        return {i: spec for i in indices}
    values: dict[int, str | None] = dict.fromkeys(indices)
    for pair in spec.split(","):
        index, _, value = pair.partition("=")
        try:
            device = int(index)
        except ValueError:
            device = -1
        if device not in values or not value:
            raise InvalidInput(
                f"{option} {spec!r}: expected VALUE or INDEX=VALUE,... with INDEX one of "
                f"the devices in use ({', '.join(map(str, indices))})"
            )
        values[device] = value
    return values


def _gpu_count() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _probe_nvml(index: int, pid: int) -> DeviceInfo | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver, no library, or no device
    try:
        if index >= pynvml.nvmlDeviceGetCount():
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        used = sum(
            p.usedGpuMemory or 0
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == pid
        )
        return DeviceInfo(
            "cuda",
            name if isinstance(name, str) else name.decode(),
            index,
            int(mem.total),
            int(mem.free),
            int(used),
        )
    finally:
        pynvml.nvmlShutdown()


class NvmlMeter:
    """This process's bytes on GPU ``index``, as NVML counts them: NVML initialised once, so
    that a reading costs one driver query (the scheduler reads it after every slice)."""

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._pid = os.getpid()

    def __call__(self) -> int:
        processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        return sum(p.usedGpuMemory or 0 for p in processes if p.pid == self._pid)


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def resident_bytes(pid: int | None = None) -> int:
    """Process ``pid``'s resident memory (VmRSS; default: this process)."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def probe_host() -> DeviceInfo:
    """Host memory as a device: MemTotal, MemAvailable, this process's resident bytes."""
    mem = _meminfo()
    free, used = mem["MemAvailable"], resident_bytes()
    return DeviceInfo("cpu", "host memory", 0, mem["MemTotal"], free, used)


def ledger_cap(
    device: DeviceInfo, cap_percent: float = DEFAULT_CAP_PERCENT, limit: str | None = None
) -> int:
    """The ledger's cap: ``cap_percent`` of the device, or of ``limit`` if that is smaller.

    ``limit`` ("8GiB") makes any device behave as a card of that size: the article's 8 GB
    card on an H200, or on a CPU machine the same budget applied to host memory.
    """
    if not 0 < cap_percent <= 100:
        raise InvalidInput(f"--vram-cap-percent must be in (0, 100], got {cap_percent}")
    total = device.total if limit is None else min(device.total, parse_bytes(limit))
    return int(total * cap_percent / 100)
