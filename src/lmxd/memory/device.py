"""The device probe: what the card (or, without one, the host) has and what we use of it.

GPUs are read through NVML (``nvidia-ml-py``), imported only when asked for, so a machine
without an NVIDIA driver needs no NVIDIA library: there the probe reports host memory, which is
where llama.cpp's buffers land on a CPU build.
"""

from __future__ import annotations

import os
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
    return gpu if gpu is not None else _probe_host()


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


def _probe_host() -> DeviceInfo:
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
