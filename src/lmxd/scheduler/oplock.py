"""The scheduler's lock, which knows whether an operation waits for it.

Everything that touches the engine holds it (lmxd.scheduler.core); a turn of the step loop,
which may run several slices per device, ends early when REGISTER, RESET, UNREGISTER or an
unload waits, so that they wait for one slice at most.
"""

from __future__ import annotations

import asyncio


class OpLock:
    """An asyncio lock counting the tasks waiting to acquire it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.waiting = 0

    async def __aenter__(self) -> None:
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *_: object) -> None:
        self._lock.release()
