"""The HTTP front: Starlette routes served by uvicorn inside the daemon's own asyncio loop.

One process, one engine: the HTTP API is a sibling of the socket fronts, calling the same
Service. Every route answers bad input with an OpenAI-shaped 4xx (docs/http.md), never a
traceback; a bug is a 500 with the same shape and the daemon goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmxd.errors import InvalidInput, LmxdError
from lmxd.fronts.http import schemas
from lmxd.fronts.http.chat import chat_completions, completions
from lmxd.fronts.http.config import HttpConfig
from lmxd.fronts.http.errors import HttpError, error_response
from lmxd.fronts.http.metrics import Metrics
from lmxd.fronts.http.responses import responses
from lmxd.fronts.http.sse import ClientGone
from lmxd.service import Service

log = logging.getLogger("lmxd.fronts.http")

MAX_BODY_BYTES = 8 << 20  # a request body; a 2,000-message conversation is far below it

B = TypeVar("B", bound=msgspec.Struct)
Handler = Callable[[Service, Request, B], Awaitable[Response]]


async def _body(request: Request, schema: type[B]) -> B:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HttpError(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise HttpError(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        return msgspec.json.decode(bytes(data), type=schema)
    except msgspec.ValidationError as exc:
        raise HttpError(
            400, "invalid_request", f"invalid request: {exc}", _param(str(exc))
        ) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise HttpError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc


def _local(host: str) -> bool:
    """A name or address of this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _param(message: str) -> str | None:
    """The field a msgspec validation message is about: ``... - at `$.messages[0]` `` and,
    for a missing field, ``Object missing required field `role` ``."""
    where = re.search(r"at `\$\.?([^`]*)`", message)
    missing = re.search(r"missing required field `([^`]+)`", message)
    parts = [where.group(1) if where else "", missing.group(1) if missing else ""]
    return ".".join(p for p in parts if p) or None


class Api:
    """The routes, the API key check, and turning every failure into an OpenAI error."""

    def __init__(self, service: Service, api_key: str | None) -> None:
        self.service = service
        self.api_key = api_key
        self.metrics = Metrics(service)

    def app(self) -> Starlette:
        def post(path: str, handler: Handler[Any], schema: type[msgspec.Struct]) -> Route:
            async def endpoint(request: Request) -> Response:
                async def run() -> Response:
                    return await handler(self.service, request, await _body(request, schema))

                return await self._answer(path, request, run)

            return Route(path, endpoint, methods=["POST"])

        def get(
            path: str, handler: Callable[[Request], Awaitable[Response]], open_to_all: bool = False
        ) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._answer(path, request, lambda: handler(request), open_to_all)

            return Route(path, endpoint, methods=["GET"])

        routes = [
            post("/v1/chat/completions", chat_completions, schemas.ChatCompletionRequest),
            post("/v1/completions", completions, schemas.CompletionRequest),
            post("/v1/responses", responses, schemas.ResponsesRequest),
            get("/v1/models", self.models),
            get("/v1/models/{model:path}", self.model),
            get("/health", self.health, open_to_all=True),
            get("/metrics", self.metrics_text),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})

    async def _answer(
        self,
        route: str,
        request: Request,
        run: Callable[[], Awaitable[Response]],
        open_to_all: bool = False,
    ) -> Response:
        try:
            self._admit(request, open_to_all)
            response = await run()
        except ClientGone:
            response = Response(status_code=499)  # nobody is there to read it
        except (LmxdError, HttpError) as exc:
            response = error_response(exc)
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("internal error on %s", route)
            response = error_response(LmxdError(f"internal error: {exc!r}"))
        self.metrics.http_requests[(route, response.status_code)] += 1
        return response

    def _admit(self, request: Request, open_to_all: bool = False) -> None:
        """Who may ask: the key's holders; without a key, programs on this machine only."""
        if not open_to_all:
            self._authenticate(request)
        if self.api_key is None:
            # Without a key the API listens on loopback, where a web page the user opens can
            # still reach it: refuse a foreign Host (DNS rebinding) and a foreign Origin (a
            # page's cross-site request); the SDKs, curl and agents send neither.
            host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
            origin = urlsplit(request.headers.get("origin", "")).hostname
            if not _local(host) or (origin is not None and not _local(origin)):
                raise HttpError(
                    403,
                    "forbidden_origin",
                    "without an API key, only programs on this machine may use the API "
                    "(a browser page from another origin, or a foreign Host, may not)",
                )
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise HttpError(
                    415, "unsupported_media_type", "send the body as Content-Type: application/json"
                )

    def _authenticate(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.api_key.encode()
        ):
            raise HttpError(
                401, "invalid_api_key", "a valid API key is needed: Authorization: Bearer <key>"
            )

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        try:
            self._admit(request)  # a client without the key learns nothing of routes
        except HttpError as denied:
            return error_response(denied)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(
            HttpError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")
        )

    # -- the simple routes -------------------------------------------------------------------

    def _model_entries(self) -> list[dict[str, Any]]:
        svc = self.service
        created = int(svc.started_at)
        loaded = {m.model for m in svc.models()}
        entries = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "lmxd",
                "lmxd": {"kind": "model", "loaded": name in loaded},
            }
            for name in svc.available_models()
        ]
        entries += [
            {
                "id": a.agent,
                "object": "model",
                "created": created,
                "owned_by": "lmxd",
                "lmxd": {"kind": "agent", "model": a.model, "state": a.state, "auto": a.auto},
            }
            for a in svc.list_agents()
        ]
        return entries

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_entries()})

    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model"]
        for entry in self._model_entries():
            if entry["id"] == wanted:
                return JSONResponse(entry)
        raise HttpError(404, "model_not_found", f"no model or agent {wanted!r}", param="model")

    async def health(self, request: Request) -> Response:
        status = self.service.status()
        return JSONResponse(
            {
                "status": "ok",
                "agents": status["agents"],
                "queue": status["queue"],
                "uptime_s": status["uptime_s"],
            }
        )

    async def metrics_text(self, request: Request) -> Response:
        return Response(
            self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a loop it does not own: the daemon handles SIGTERM and SIGINT itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFront:
    """The HTTP API on one address, served by uvicorn in the running loop."""

    def __init__(self, service: Service, config: HttpConfig) -> None:
        self.config = config
        self.api = Api(service, config.api_key)
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> str:
        """Bind and listen; returns the base URL (the port is known even for ``:0``)."""
        host, port = self.config.host, self.config.port
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise InvalidInput(
                f"cannot listen for HTTP on {host}:{port}: {exc.strerror}", host=host, port=port
            ) from exc
        sock.listen(1024)
        config = uvicorn.Config(
            self.api.app(),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=2,
            limit_concurrency=1024,  # past it uvicorn answers 503 at once
        )
        self._server = server = _EmbeddedServer(config)
        self._serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
                raise InvalidInput(f"the HTTP front on {host}:{port} did not start")
            await asyncio.sleep(0.005)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        await self._serving
