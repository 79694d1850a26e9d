"""A model's life in the daemon: resolved, loaded under the ledger, kept alive, unloaded.

The first REGISTER that names a model loads it: its weights are reserved in the ledger first
(closing other models' idle contexts if that makes room), then llama.cpp loads the file once,
with as many layers on its device(s) as its placement gives it (lmxd.scheduler.devices). A model
placed partially is reloaded with more layers when room frees up and its agents are idle.
Each agent holds a weights handle of its own, so the charge goes with the last of them; then
a keep-alive handle holds it for ``keep_alive_s`` (a REGISTER meanwhile cancels the unload),
and the model is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from lmxd import catalog
from lmxd.chat.template import ChatTemplate
from lmxd.engine.context import KV_PAD
from lmxd.engine.worker import ModelHandle, Worker
from lmxd.errors import Forbidden, LmxdError, ModelFileError, UnknownModel
from lmxd.memory.ledger import Request, Reservation
from lmxd.modelfile import ModelInfo
from lmxd.scheduler.devices import Charge, Placement, Short, release, reserve
from lmxd.scheduler.oplock import OpLock
from lmxd.scheduler.residency import Residency
from lmxd.scheduler.slots import KEEPALIVE_HOLDER, ModelSlot

log = logging.getLogger("lmxd.scheduler")


_PATH_MAX, _NAME_MAX = 4096, 255  # bytes: Linux's limits for a path and one of its parts


def _check_name(model: str) -> None:
    """UNKNOWN_MODEL for a name or path the file system would refuse."""
    data = model.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise UnknownModel("a model name or path cannot hold a NUL character")
    if len(data) >= _PATH_MAX or any(len(part) > _NAME_MAX for part in data.split(b"/")):
        raise UnknownModel(
            f"{model[:200]!r}... is no model name or path: a path is under {_PATH_MAX} bytes "
            f"and each of its parts at most {_NAME_MAX}",
            bytes=len(data),
        )


def _same_file(slot: ModelSlot) -> bool:
    """Whether ``slot``'s file is still the one it loaded (same size and modification time)."""
    try:
        stat = slot.path.stat()
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (slot.info.file_size, slot.info.mtime_ns)


class Models:
    """Loads and unloads models for the scheduler (its asyncio task only)."""

    def __init__(
        self,
        worker: Worker,
        room: Residency,
        models_dir: Path,
        allowed_dirs: tuple[Path, ...],
        keep_alive_s: float,
        lock: OpLock,  # the scheduler's: an expired keep-alive unloads under it
        freed: Callable[[], None],  # wakes the scheduler: a job may wait for this memory
    ) -> None:
        self.worker = worker
        self.room = room
        self.models_dir = models_dir
        self.allowed_dirs = allowed_dirs
        self.keep_alive_s = keep_alive_s
        self._lock = lock
        self._freed = freed

    def resolve(self, model: str) -> Path:
        """The file a model name or path stands for: a regular file inside the allowed
        directories once symlinks are followed (UNKNOWN_MODEL, FORBIDDEN, BAD_MODEL_FILE).
        A name no file system call could take is refused before any is made."""
        _check_name(model)
        try:
            path = catalog.resolve_model(model, self.models_dir).resolve()
        except OSError as exc:  # a loop of symlinks, a directory we may not search...
            raise UnknownModel(f"{model[:200]!r} cannot name a model file: {exc}") from exc
        if not any(path.is_relative_to(d.resolve()) for d in self.allowed_dirs):
            raise Forbidden(
                f"{path} is outside the allowed model directories "
                f"({', '.join(str(d) for d in self.allowed_dirs)})",
                path=str(path),
            )
        if path.exists() and not path.is_file():  # a directory, a FIFO, a device
            raise ModelFileError(f"{path} is not a regular file", path=str(path))
        return path

    async def load(self, key: str, path: Path, info: ModelInfo, where: Placement) -> ModelSlot:
        """Load the model as ``where`` places it, under the ledgers (:meth:`_place`)."""
        model, got = await self._place(key, path, info, where)
        chat = ChatTemplate(key, model.chat_template, model.bos_text, model.eos_text)
        slot = ModelSlot(key, path, model.info, model, chat, where)
        slot.weights[KEEPALIVE_HOLDER], slot.host_weights = got
        self.room.slots[str(path)] = slot
        log.info(
            "load model=%s device=%s layers=%s/%d bytes=%d",
            key,
            ",".join(str(share.device.index) for share in where.shares),
            ",".join(str(len(share.span)) for share in where.shares),
            where.layers,
            sum(r.bytes for r in got[0]),
        )
        return slot

    async def _place(
        self, key: str, path: Path, info: ModelInfo, where: Placement
    ) -> tuple[ModelHandle, tuple[Charge, Reservation | None]]:
        """Reserve the weights on the placement's devices (closing idle contexts there if
        need be) and in host RAM, then load the model with its layers placed so; the charges
        go back if the load fails."""
        got = await self._reserve(key, info, where)
        split = tuple((s.device.index, len(s.span)) for s in where.shares) if where.split else ()
        try:
            model = await self.worker.load(path, where.device.index, where.n_gpu_layers, split)
        except LmxdError:
            self._release(where, got)
            raise
        return model, got

    async def _reserve(
        self, key: str, info: ModelInfo, where: Placement
    ) -> tuple[Charge, Reservation | None]:
        """The weights' charges: on the devices (closing idle contexts there until they fit)
        and, on CUDA, in host RAM."""
        requests = self.room.weights_requests(key, info, where)
        while isinstance(got := reserve(requests), Short):
            victims = self.room.evictable(got.device)
            if not victims:
                raise got.denial.error()
            await self.room.close_context(victims[0])
        if self.room.host is None:
            return got, None
        request, _ = self.room.host_requests(key, info, KV_PAD, 1, where.n_gpu_layers)
        try:
            held = await self.room.reserve_host(request)
        except LmxdError:
            release(where.devices, got)
            raise
        return got, held

    def _release(self, where: Placement, got: tuple[Charge, Reservation | None]) -> None:
        release(where.devices, got[0])
        if got[1] is not None and self.room.host is not None:
            self.room.host.release(got[1])

    @staticmethod
    def handle(slot: ModelSlot) -> Charge:
        """Another handle on the model's weights charge, on each of its devices: nothing new
        while the charge is live, nothing at all where it is not (a model that could not be
        loaded back)."""
        nothing = Request(f"model:{slot.key}", {}, key=f"weights:{slot.path}")
        got = reserve([(device, nothing) for device in slot.placement.devices])
        assert not isinstance(got, Short)  # no new bytes
        return got

    async def grow_one(self) -> bool:
        """:meth:`grow` the first partially placed model that can be; True if one was."""
        for slot in [s for s in self.room.slots.values() if s.partial and s.may_grow]:
            if await self.grow(slot):
                return True
        return False

    async def grow(self, slot: ModelSlot) -> bool:
        """Reload a partially placed model whose agents are all idle with more layers on its
        device, if they fit now (its agents' KV parked first; the file's pages are in the OS
        cache, so the load is cheap). True if it was reloaded."""
        if not slot.all_idle or (layers := self.room.more_layers(slot)) is None:
            return False
        if not _same_file(slot):  # replaced or gone: it could not be loaded back
            slot.may_grow = False
            log.warning("reload of model=%s skipped: its file changed since it loaded", slot.key)
            return False
        before = slot.n_gpu_layers
        t0 = time.perf_counter()
        try:
            await self.room.close_context(slot)
        except LmxdError as exc:  # a park that found no room: stay as it is
            log.warning("reload of model=%s with more layers skipped: %s", slot.key, exc)
            return False
        await self.worker.unload(slot.model)
        holders = list(slot.weights)
        self._release(slot.placement, (slot.weights.pop(holders[0]), slot.host_weights))
        for holder in holders[1:]:
            release(slot.placement.devices, slot.weights.pop(holder))
        where = Placement.single(slot.device, layers, slot.info.n_layer + 1)
        try:
            slot.model, got = await self._place(slot.key, slot.path, slot.info, where)
        except LmxdError as exc:  # back as it was (that placement loaded before), for good
            log.error("reload of model=%s with %d layers failed: %s", slot.key, layers, exc)
            slot.may_grow = False
            where = slot.placement
            try:
                slot.model, got = await self._place(slot.key, slot.path, slot.info, where)
            except LmxdError as again:
                # Not even that: its agents keep weights handles that charge nothing, and
                # every use of the model fails (EngineError) until they go and it unloads.
                log.error("model=%s could not be loaded back: %s", slot.key, again)
                got = self.handle(slot), None
        if where.n_gpu_layers > slot.n_gpu_layers:
            slot.decode_tokens, slot.decode_s = 0, 0.0  # its speed measured anew
        slot.placement = where
        slot.weights[holders[0]], slot.host_weights = got
        for holder in holders[1:]:
            slot.weights[holder] = self.handle(slot)
        log.info(
            "reload model=%s layers=%d->%d/%d ms=%.1f",
            slot.key,
            before,
            slot.n_gpu_layers,
            where.layers,
            (time.perf_counter() - t0) * 1000,
        )
        return slot.n_gpu_layers > before

    def cancel_unload(self, slot: ModelSlot) -> None:
        """An agent holds ``slot`` again: no unload, and no keep-alive handle."""
        if slot.unload_timer is not None:
            slot.unload_timer.cancel()
            slot.unload_timer = None
        keepalive = slot.weights.pop(KEEPALIVE_HOLDER, None)
        if keepalive is not None:
            release(slot.placement.devices, keepalive)

    async def keep_alive(self, slot: ModelSlot) -> None:
        """No agent refers to ``slot`` any more: unload it after the keep-alive."""
        slot.weights[KEEPALIVE_HOLDER] = self.handle(slot)
        if self.keep_alive_s <= 0:
            await self.unload(slot)
            return
        slot.unload_timer = asyncio.get_running_loop().call_later(
            self.keep_alive_s, lambda: asyncio.ensure_future(self._unload_expired(slot))
        )

    async def _unload_expired(self, slot: ModelSlot) -> None:
        async with self._lock:
            if not slot.agents and self.room.slots.get(str(slot.path)) is slot:
                await self.unload(slot)
                self._freed()

    async def unload(self, slot: ModelSlot) -> None:
        if slot.unload_timer is not None:
            slot.unload_timer.cancel()
        if slot.context is not None:
            for agent in slot.residents():
                await self.room.drop(agent)
            await self.room.close_context(slot)
        await self.worker.unload(slot.model)
        for handle in slot.weights.values():
            release(slot.placement.devices, handle)
        slot.weights.clear()
        if slot.host_weights is not None and self.room.host is not None:
            self.room.host.release(slot.host_weights)
        slot.host_weights = None
        del self.room.slots[str(slot.path)]
        log.info("unload model=%s", slot.key)
