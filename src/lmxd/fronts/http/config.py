"""Where the HTTP API listens and who may use it: parsed and checked before the daemon starts.

Kept apart from the app so that the command line can read it without loading Starlette.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from lmxd.errors import InvalidInput

DEFAULT_HOST = "127.0.0.1"
# Not Ollama's 11434, llama.cpp's 8080, vLLM's 8000 nor LM Studio's 1234.
DEFAULT_PORT = 8437
API_KEY_ENV = "LMXD_API_KEY"


@dataclass(frozen=True)
class HttpConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (loopback); InvalidInput otherwise."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):(\d{1,5})", value.strip())
    if match is None or int(match.group(3)) > 65535:
        raise InvalidInput(f"--http takes HOST:PORT, [IPv6]:PORT, :PORT or off; got {value!r}")
    host = match.group(1) or match.group(2) or DEFAULT_HOST
    return host, int(match.group(3))


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_exposure(config: HttpConfig) -> None:
    """Refuse to serve anything but loopback without an API key, and an empty key."""
    if config.api_key is not None and not config.api_key.strip():
        raise InvalidInput(f"the API key (--api-key, ${API_KEY_ENV}) is empty")
    if config.api_key is None and not is_loopback(config.host):
        raise InvalidInput(
            f"refusing to serve HTTP on {config.host} without an API key: anyone who can reach "
            f"it could use the daemon. Set --api-key or ${API_KEY_ENV}, or bind to 127.0.0.1",
            host=config.host,
        )
