"""The typed values the Service's operations return (besides :class:`lmxd.results.DecodeResult`).

Fronts encode them on their own wire; msgspec turns each into the JSON objects that
docs/protocol.md documents.
"""

from __future__ import annotations

from typing import Any

import msgspec


class DeviceLayers(msgspec.Struct, frozen=True):
    """The layers of a model one device holds."""

    device: int
    n_gpu_layers: int


class Registered(msgspec.Struct, frozen=True):
    agent: str
    model: str  # the key the daemon knows the model by
    n_ctx: int
    path: str  # the resolved .gguf file
    device: int  # where its model is (split by layer: the first of ``devices``)
    n_gpu_layers: int  # of its model's ``layers`` on the device(s) (fewer: placed partially)
    layers: int  # the model's blocks and its output layer
    estimated_speed: float  # decode speed estimated as a share of all layers on the device
    devices: list[DeviceLayers]  # each device's layers, lower layers first: several if split


class AgentView(msgspec.Struct, frozen=True):
    agent: str
    model: str
    state: str  # Agent.state: empty, resident, parked, spilled, queued, decoding, parking...
    n_ctx: int
    tokens: int  # tokens of its conversation
    kv_tokens: int  # of those, held in KV (resident, parked or spilled)
    last_used: float  # Unix time its last DECODE ended, or its registration
    auto: bool  # created by the HTTP API for a request that named a model
    owner: int  # the uid that registered it (the daemon's own for the HTTP API)
    device: int  # the device its model is on: its KV is there, or comes back there
    generated_tokens: int  # since it registered, counted after every slice of steps
    parks: int  # times its KV was parked to host RAM
    restores: int  # times its KV was restored onto the device


class LoadedModel(msgspec.Struct, frozen=True):
    model: str
    path: str
    refcount: int  # agents registered on it
    weights_bytes: int
    context_bytes: int
    n_seq: int
    pool_cells: int
    used_cells: int
    device: int  # the device its weights, KV and compute are on (split: the first)
    resident: int  # its agents whose KV is on the device now
    generated_tokens: int  # by its agents since it loaded, counted after every slice
    unload_in_s: float | None  # no agent left: seconds until it unloads (keep-alive)
    n_gpu_layers: int  # of ``layers`` on the device (fewer: placed partially)
    layers: int  # its blocks and its output layer
    estimated_speed: float  # decode speed estimated as a share of all layers on the device
    # measured: tokens generated over its slices' time (prompt steps included), since it
    # loaded or was reloaded with more layers
    decode_tokens_per_s: float | None
    devices: list[DeviceLayers]  # each device's layers, lower layers first: several if split


class Refusal(msgspec.Struct, frozen=True):
    """A request refused for lack of room or of queue (STATUS ``refusals``)."""

    time: float  # Unix time
    op: str  # REGISTER, DECODE or HTTP
    agent: str  # or, for an HTTP request that names only a model, the model
    code: str  # VRAM_LEDGER_DENY, PARK_BUDGET_EXCEEDED or BUSY
    message: str
    details: dict[str, Any]  # the error's numbers
