"""Reconciling the ledger with the device: what the card holds for us that no estimate said.

The estimator predicts the buffers llama.cpp reports (weights, KV, compute graphs, outputs), and
the ledger admits work by those predictions. The CUDA backend also allocates memory no buffer
report names: pools of scratch buffers that grow to the largest a kernel asked for, cuBLAS
workspaces. On the H200 that put the process 14.7 MB past a cap the ledger kept (issue #9).
So, after every slice of steps, the :class:`Reconciler` reads the device's own figure for this
process (NVML) and charges what it holds beyond the ledger's reservations to the ledger's
``unaccounted`` owner; admission counts it, so that what comes next is admitted against what
the card really holds. Where no device figure exists (a CPU build: host memory, where a
process's resident size says nothing of its buffers), there is nothing to reconcile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lmxd.memory.ledger import Ledger
from lmxd.units import format_bytes

log = logging.getLogger("lmxd.memory")


class Reconciler:
    """Charges the device's figure beyond the ledger's reservations to ``unaccounted``."""

    def __init__(self, ledger: Ledger, measure: Callable[[], int]) -> None:
        self.ledger = ledger
        self.measure = measure  # bytes this process holds on the device, now
        self.measured = 0  # the last figure read

    def reconcile(self) -> None:
        """Charge the device's figure now; if it cannot be read, keep the last one (a driver
        that does not answer must not stop the scheduler)."""
        try:
            self.measured = self.measure()
        except Exception:
            log.exception("reading the device's memory failed; the last figure stands")
            return
        ledger = self.ledger
        accounted = ledger.reserved - ledger.unaccounted
        excess = max(0, self.measured - accounted)
        if excess != ledger.unaccounted:
            log.debug(
                "reconcile: device %s, ledger %s: unaccounted %s",
                format_bytes(self.measured),
                format_bytes(accounted),
                format_bytes(excess),
            )
        ledger.set_unaccounted(excess)
