"""Memory: predicting bytes from GGUF metadata, the VRAM ledger, and the device probe."""

from lmxd.memory.device import DeviceInfo, probe_device
from lmxd.memory.estimator import MemoryEstimate, estimate
from lmxd.memory.ledger import Denial, Ledger, Reservation

__all__ = [
    "Denial",
    "DeviceInfo",
    "Ledger",
    "MemoryEstimate",
    "Reservation",
    "estimate",
    "probe_device",
]
