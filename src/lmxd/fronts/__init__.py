"""The daemon's fronts: each translates one wire into :mod:`lmxd.service` calls and back.

- ``jsonl``: the JSON-lines protocol (docs/protocol.md), on the Unix socket;
- ``text``: the article's text protocol, on the same socket, told apart by the first byte;
- ``http``: the OpenAI-compatible HTTP API (docs/http.md), Starlette inside the daemon's loop.

``unix`` is the socket both socket fronts share: it accepts, reads lines and hands each
connection to the front its first byte names. No front imports another, the scheduler or
llama.cpp.
"""
