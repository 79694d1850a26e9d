"""The OpenAI-compatible HTTP API (docs/http.md): chat completions, completions, responses,
models, health and Prometheus metrics, served inside the daemon's loop (``app.HttpFront``).

This package's own namespace is only its configuration, so that reading it costs no imports
of Starlette or uvicorn.
"""

from lmxd.fronts.http.config import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    HttpConfig,
    check_exposure,
    parse_address,
)

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "HttpConfig",
    "check_exposure",
    "parse_address",
]
