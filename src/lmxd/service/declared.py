"""The agents the config file declares (its ``[[agent]]`` tables, lmxd.config): registered at
the start, after the registry's agents are back, unless registered already; what became of
them, for STATUS ``config``.

A declaration takes effect when its agent is not registered: at the first start, and at a
start after the agent was unregistered (a running daemon does not read its file again). An
agent registered already (brought back by the registry, with its conversation) is left as it
is, even where its declaration now says another model, n_ctx, sampling, system prompt or owner;
a warning lists what differs. To apply a changed declaration, UNREGISTER the agent and restart
the daemon. A declared agent is registered as a client's REGISTER would be, owned by the
daemon's user and kept in the registry like any other (so it stays registered, conversation and
all, after its table is deleted, until it is unregistered). One that cannot be registered (an
unknown model, no room under the cap) is logged, listed in STATUS ``config.failed``, and the
daemon serves on without it: under a service manager that restarts it on failure, stopping
would only fail the same way again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from lmxd import protocol
from lmxd.config import DeclaredAgent
from lmxd.engine.sampling import SamplingParams
from lmxd.errors import LmxdError

if TYPE_CHECKING:
    from lmxd.scheduler import Agent
    from lmxd.service.core import Service

log = logging.getLogger("lmxd.service.declared")
T = TypeVar("T")


@dataclass
class Declared:
    """What the start made of the declarations."""

    file: Path | None = None
    declared: int = 0  # [[agent]] tables
    registered: int = 0  # agents registered from their declaration at this start
    kept: int = 0  # agents registered already (by the registry): left as they were
    failed: list[dict[str, str]] = field(default_factory=list)  # {agent, code, message}

    def status(self) -> dict[str, Any]:
        return {
            "file": None if self.file is None else str(self.file),
            "declared": self.declared,
            "registered": self.registered,
            "kept": self.kept,
            "failed": list(self.failed),
        }


async def register_declared(
    service: Service, agents: Sequence[DeclaredAgent], file: Path | None
) -> Declared:
    """Register each of ``agents`` not registered yet; a failure is logged (by
    :meth:`Service.register`) and counted, and the others go on."""
    report = Declared(file, declared=len(agents))
    for declared in agents:
        agent = service.scheduler.agents.get(declared.name)
        if agent is not None:
            report.kept += 1
            if differs := _differences(service, agent, declared):
                log.warning(
                    "declared agent=%s kept as registered, not as declared (%s): UNREGISTER "
                    "it and restart the daemon to register it as declared",
                    declared.name,
                    "; ".join(differs),
                )
            continue
        try:
            await service.register(
                declared.name,
                declared.model,
                _unset(declared.n_ctx),
                _sampling(declared),
                _unset(declared.system_prompt),
            )
        except LmxdError as exc:
            report.failed.append({"agent": declared.name, "code": exc.code, "message": exc.message})
            continue
        report.registered += 1
    if agents:
        log.log(
            logging.WARNING if report.failed else logging.INFO,
            "declared agents file=%s declared=%d registered=%d kept=%d failed=%d",
            file,
            report.declared,
            report.registered,
            report.kept,
            len(report.failed),
        )
    return report


def _differences(service: Service, agent: Agent, declared: DeclaredAgent) -> list[str]:
    """What the registered ``agent`` has that its declaration does not say."""
    out = []
    try:
        same_model = service.scheduler.model_path(declared.model) == str(agent.slot.path)
    except LmxdError:  # the declared model cannot be had now; the registered one is loaded
        same_model = False
    if not same_model:
        out.append(f"model {agent.slot.key}, declared {declared.model}")
    n_ctx = _unset(declared.n_ctx) or service.limits.default_n_ctx
    if agent.n_ctx != n_ctx:
        out.append(f"n_ctx {agent.n_ctx}, declared {n_ctx}")
    if agent.sampling != SamplingParams(**(_sampling(declared) or {})):
        out.append("other sampling")
    if agent.system_prompt != _unset(declared.system_prompt):
        out.append("another system prompt")
    if agent.owner != service.uid:
        out.append(f"owner uid {agent.owner}, not the daemon's {service.uid}")
    return out


def _sampling(declared: DeclaredAgent) -> dict[str, Any] | None:
    sampling = _unset(declared.sampling)
    return None if sampling is None else protocol.to_builtins(sampling)


def _unset(value: T | msgspec.UnsetType) -> T | None:
    return None if isinstance(value, msgspec.UnsetType) else value
