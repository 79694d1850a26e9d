"""The typed values the Service's operations return (besides :class:`lmxd.results.DecodeResult`).

Fronts encode them on their own wire; msgspec turns each into the JSON objects that
docs/protocol.md documents.
"""

from __future__ import annotations

import msgspec


class Registered(msgspec.Struct, frozen=True):
    agent: str
    model: str  # the key the daemon knows the model by
    n_ctx: int
    path: str  # the resolved .gguf file


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


class LoadedModel(msgspec.Struct, frozen=True):
    model: str
    path: str
    refcount: int  # agents registered on it
    weights_bytes: int
    context_bytes: int
    n_seq: int
    pool_cells: int
    used_cells: int
    device: int  # the device its weights, KV and compute are on
