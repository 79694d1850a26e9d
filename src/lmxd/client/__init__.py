"""Clients of the lmxd daemon: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

This package owns the client side of the JSON-lines protocol (docs/protocol.md): it frames
requests, matches reply frames to requests by id, and raises an error frame as the
:mod:`lmxd.errors` type of the same code. It knows nothing of agents beyond the ops' fields.

::

    with Client() as client:
        client.register("coder", "smollm2-135m")
        stream = client.stream("coder", "def fib(n):", max_tokens=64)
        for piece in stream:
            print(piece, end="")
        print(stream.result.stop_reason)

The async client multiplexes: any number of requests may be in flight on one connection, and
one reader task hands each frame to the request with its id. The blocking client does one
request at a time; a lock makes threads that share it take turns.
"""

from lmxd.client._async import AsyncClient, AsyncDecodeStream
from lmxd.client._sync import Client, DecodeStream
from lmxd.client._wire import Messages, SamplingArgs
from lmxd.results import DecodeResult, StopReason

__all__ = [
    "AsyncClient",
    "AsyncDecodeStream",
    "Client",
    "DecodeResult",
    "DecodeStream",
    "Messages",
    "SamplingArgs",
    "StopReason",
]
