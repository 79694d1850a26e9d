"""`lmxd serve`: wiring the daemon together, owning its socket, and stopping cleanly.

One process, one backend init, one engine thread, one asyncio loop: the Unix socket's two
fronts and the HTTP front all run in it and call the same Service. The socket is created with
mode 0600; a live daemon's socket is never taken over, a stale one (nobody answers) is removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmxd.config import DeclaredAgent
from lmxd.engine.runtime import Engine
from lmxd.engine.worker import LlamaWorker
from lmxd.errors import DaemonRunning, InvalidInput
from lmxd.fronts import jsonl, text
from lmxd.fronts.http import HttpConfig, check_exposure
from lmxd.fronts.http.app import HttpFront
from lmxd.fronts.unix import Connection, Front, UnixServer
from lmxd.kvdisk import DiskTier
from lmxd.kvstore import KvStore
from lmxd.memory.device import (
    DEFAULT_CAP_PERCENT,
    DeviceInfo,
    NvmlMeter,
    ledger_cap,
    per_device,
    probe_devices,
    probe_host,
)
from lmxd.memory.estimator import CUDA_OVERHEAD, Backend
from lmxd.memory.host import map_large_blocks
from lmxd.memory.ledger import Denial, Ledger, Request
from lmxd.memory.reconcile import Reconciler
from lmxd.registry import AgentRegistry
from lmxd.scheduler import Scheduler, SchedulerConfig
from lmxd.scheduler.devices import Device
from lmxd.scheduler.residency import Residency, ResidencyConfig
from lmxd.service import Limits, Service
from lmxd.units import format_bytes

log = logging.getLogger("lmxd.daemon")


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path
    models_dir: Path
    allowed_dirs: tuple[Path, ...]
    socket_mode: int = 0o600  # who may connect: only the daemon's user, unless shared on purpose
    socket_group: int | None = None  # the socket's group (a gid), for a mode such as 0o660
    devices: tuple[int, ...] | None = None  # the GPUs to use (--devices); None: every one
    # Each device's cap, for all ("90", "8GiB") or per device ("0=90,1=80"): memory.device.
    vram_cap_percent: str | None = None  # None: 90
    vram_limit: str | None = None  # "8GiB": behave as a card of that size
    partial: bool = True  # too large for every device: as many layers as fit on one
    host_limit: int | None = None  # host RAM for CUDA models' host parts; None: available
    op_offload: bool = True  # host layers' matrix products of prompts run on the GPU
    park_budget: int = 8 << 30  # host RAM for parked state
    keep_alive_s: float = 300.0
    max_queue: int = 64
    default_n_ctx: int = 4096
    park_after_decode: bool = False
    deterministic: bool = False  # one sequence per decode step: output independent of others
    n_threads: int = 0
    max_seqs: int = 16
    http: HttpConfig | None = field(default_factory=HttpConfig)  # None: no HTTP front
    auto_agents: int = 8  # auto-agents per model for HTTP requests that name a model
    auto_agent_ttl_s: float = 600.0
    # A client that reads nothing this long: its stream is cancelled, its socket closed.
    stream_timeout_s: float = 30.0
    # Agents (lmxd.registry) and parked state past the budget (lmxd.kvdisk); None: neither.
    park_dir: Path | None = None
    # The config file's [[agent]] tables, registered at the start (lmxd.service.declared).
    agents: tuple[DeclaredAgent, ...] = ()
    config_file: Path | None = None  # the config file read, for the log and STATUS


def claim_socket(path: Path) -> None:
    """Refuse a live daemon's socket; remove a stale one."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        log.info("removing stale socket %s", path)
        path.unlink()
    else:
        raise DaemonRunning(f"a daemon is already listening at {path}", socket=str(path))
    finally:
        probe.close()


def _fronts(service: Service) -> Callable[[bytes], Front]:
    """The socket front a connection's first byte names."""

    async def json_lines(conn: Connection, first: bytes) -> None:
        await jsonl.serve(service, conn, first)

    async def text_protocol(conn: Connection, first: bytes) -> None:
        await text.serve(service, conn, first)

    return lambda first: json_lines if first == b"{" else text_protocol


async def _expire_auto_agents(service: Service) -> None:
    period = max(1.0, min(30.0, service.limits.auto_agent_ttl_s / 4))
    while True:
        await asyncio.sleep(period)
        await service.expire_auto_agents()


def _devices(infos: list[DeviceInfo], config: DaemonConfig, backend: Backend) -> list[Device]:
    """A ledger for each device under its own cap; on a GPU, the CUDA context charged to it
    and a reconciler that reads its own figure after every slice and charges what it holds
    beyond the ledger (lmxd.memory.reconcile)."""
    indices = [info.index for info in infos]
    limits = per_device(config.vram_limit, indices, "--vram-limit")
    percents = per_device(config.vram_cap_percent, indices, "--vram-cap-percent")
    devices = []
    for info in infos:
        percent = percents[info.index]
        try:
            share = DEFAULT_CAP_PERCENT if percent is None else float(percent)
        except ValueError:
            raise InvalidInput(f"--vram-cap-percent {percent!r} is not a number") from None
        ledger = Ledger(ledger_cap(info, share, limits[info.index]))
        reconciler = None
        if backend is Backend.CUDA:
            # The CUDA context and cuBLAS: charged once, for the life of the process.
            got = ledger.try_reserve(Request("backend", {"overhead": CUDA_OVERHEAD}))
            if isinstance(got, Denial):
                raise got.error()
            reconciler = Reconciler(ledger, NvmlMeter(info.index))
        devices.append(Device(info.index, info, ledger, reconciler))
    return devices


def host_ledger(limit: int | None) -> Ledger:
    """The host-RAM ledger of a GPU daemon: what its models keep in host memory (the input
    embeddings, the logits, and all of partially placed models' layers off the device), up
    to 90% of ``limit`` or of the memory available at the start, the smaller. Parked state
    has its own budget (--park-budget)."""
    available = probe_host().free
    cap = int(min(available, limit or available) * DEFAULT_CAP_PERCENT / 100)
    if cap <= 0:
        raise InvalidInput(f"--host-limit {limit} B leaves no host RAM for models", limit=limit)
    return Ledger(cap, host=True)


def assemble(config: DaemonConfig, on_stop: Callable[[], None]) -> Service:
    """The daemon without its fronts: engine, memory, scheduler, and the Service over them."""
    # CUDA numbers the cards as NVML does (by PCI bus), so that a model's main_gpu is the
    # device whose ledger charges it. Then llama.cpp's backends, before NVML: on the H200
    # machine, a process that touched NVML before llama.cpp set up CUDA died in its first
    # model load (seen 2026-11-29).
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    engine = Engine.get()
    infos = probe_devices(config.devices)
    backend = Backend.CUDA if engine.gpu_offload and infos[0].kind == "cuda" else Backend.CPU
    devices = _devices(infos, config, backend)
    # Page-locked parking buffers on a GPU: copies then run at PCIe speed.
    store = KvStore(config.park_budget, pinned=backend is Backend.CUDA)
    worker = LlamaWorker(engine, config.deterministic)
    room = Residency(
        worker,
        devices,
        store,
        ResidencyConfig(
            backend,
            n_threads=config.n_threads,
            max_seqs=config.max_seqs,
            partial=config.partial,
            op_offload=config.op_offload,
        ),
        # Parked state past the --park-budget goes to disk (lmxd.kvdisk), as does every idle
        # agent's KV at a clean stop.
        DiskTier(config.park_dir / "states") if config.park_dir is not None else None,
        host_ledger(config.host_limit) if backend is Backend.CUDA else None,
    )
    scheduler = Scheduler(
        worker,
        room,
        SchedulerConfig(
            models_dir=config.models_dir,
            allowed_dirs=config.allowed_dirs,
            max_queue=config.max_queue,
            keep_alive_s=config.keep_alive_s,
            park_after_decode=config.park_after_decode,
            stream_timeout_s=config.stream_timeout_s,
        ),
    )
    limits = Limits(
        config.max_queue,
        config.default_n_ctx,
        config.park_budget,
        config.auto_agents,
        config.auto_agent_ttl_s,
    )
    registry = AgentRegistry(config.park_dir) if config.park_dir is not None else None
    return Service(scheduler, limits, on_stop, registry=registry)


async def run(config: DaemonConfig) -> None:
    if config.http is not None:
        check_exposure(config.http)  # before anything is loaded: a refusal is instant
    map_large_blocks()  # freed buffers leave the process (lmxd.memory.host)
    claim_socket(config.socket)
    stop = asyncio.Event()
    service = assemble(config, stop.set)
    scheduler = service.scheduler
    backend = scheduler.room.config.backend
    await service.restore_agents()  # the agents of the last run, before any client comes
    await service.declare_agents(config.agents, config.config_file)  # those not back
    http = HttpFront(service, config.http) if config.http is not None else None
    if http is not None:
        service.http_url = await http.start()
    server = UnixServer(_fronts(service), config.stream_timeout_s)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await server.start(config.socket)
    finally:
        os.umask(old_umask)
    if config.socket_group is not None:
        os.chown(config.socket, -1, config.socket_group)
    os.chmod(config.socket, config.socket_mode)  # shared on purpose (--socket-mode): now
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(scheduler.run()),
        asyncio.create_task(_expire_auto_agents(service)),
    ]
    log.info(
        "lmxd listening on %s and %s; config file %s; backend %s; %s",
        config.socket,
        service.http_url or "no HTTP",
        config.config_file or "none",
        backend.value,
        "; ".join(
            f"device {d.index} {d.info.name} ({d.info.kind}, {format_bytes(d.info.total)} total)"
            f" ledger cap {format_bytes(d.ledger.cap)}"
            for d in scheduler.room.devices
        ),
    )
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        # New requests are refused (SHUTTING_DOWN), in-flight DECODEs end (CANCELLED), and
        # their fronts get a moment to say so before the connections close.
        service.close()
        await service.keep_states()  # idle agents' KV on disk, before anything is freed
        await scheduler.shutdown()
        await asyncio.sleep(0.05)
        if service.registry is not None:
            service.registry.close()  # the agents' last writes land
        if scheduler.room.disk is not None:
            scheduler.room.disk.close()
        if http is not None:
            await http.stop()
        await server.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        config.socket.unlink(missing_ok=True)
        log.info("stopped")


def serve(config: DaemonConfig) -> None:
    asyncio.run(run(config))
