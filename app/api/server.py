"""The aiohttp app factory and a listener that can be started and stopped on a running loop."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.api.errors import ApiError, Handler, error_middleware
from app.api.keys import API_KEY, ENGINE
from app.api import admin
from app.api.openai import chat, completions, models
from app.api.ollama import ROUTE_TABLES as OLLAMA_ROUTES, ollama_error_middleware
from app.engine.facade import Engine

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024 * 1024
OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    #: also serve the same app on this port (Ollama's 11434), None: not
    ollama_port: int | None = None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.headers.get("api-key")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app.get(API_KEY)
    if expected and request.method != "OPTIONS" and request.path not in OPEN_PATHS:
        given = presented_key(request) or ""
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
            raise ApiError(401, "Invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")
    return await handler(request)


def cors_middleware(origins: tuple[str, ...]):
    allowed = set(origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        ok = origin is not None and ("*" in allowed or origin in allowed)
        if request.method == "OPTIONS" and ok:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if ok and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin  # type: ignore[assignment]
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, x-api-key, api-key"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Vary"] = "Origin"
        return response

    return middleware


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    states = engine.model_states()
    return web.json_response({
        "status": "ok",
        "loaded": [s.name for s in states if s.state == "ready"],
        "loading": [{"model": s.name, "progress": round(s.progress, 3), "message": s.message}
                    for s in states if s.state == "loading"],
        "models": [{"model": s.name, "state": s.state, "backend": s.backend, "batching": s.batching,
                    "max_batch": s.max_batch, "batching_summary": s.batching_summary,
                    "active_jobs": s.active_jobs, "message": s.message, "notice": s.notice} for s in states],
        "load_failures": [{"model": f.name, "message": f.message, "at": f.at} for f in engine.load_failures()],
        "spare_processes": engine.spare_processes(),
    })


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = generate_latest(engine.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(engine: Engine, config: ServerConfig | None = None) -> web.Application:
    config = config or ServerConfig()
    middlewares = [error_middleware, ollama_error_middleware]  # the second answers /api/ in Ollama's shape
    if config.cors_origins:
        middlewares.insert(0, cors_middleware(config.cors_origins))
    middlewares.append(auth_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    if config.api_key:
        app[API_KEY] = config.api_key
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    for table in (models.routes, chat.routes, completions.routes, admin.routes):
        app.router.add_routes(table)
        # continue.dev calls /completions and /chat/completions when apiBase lacks /v1
        for route in table:
            if isinstance(route, web.RouteDef) and route.path.startswith("/v1/"):
                app.router.add_route(route.method, route.path[3:], route.handler)
    for table in OLLAMA_ROUTES:
        app.router.add_routes(table)
    return app


class Listener:
    """Runs the app on a TCP site of the current loop; can be stopped and started again."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self._runner: web.AppRunner | None = None
        #: why the Ollama port is not served (Ollama itself there, port taken), None when it is or is off
        self.ollama_error: str | None = None
        self.ollama_port: int | None = None

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "localhost"
        return f"http://{host}:{self.port}/v1"

    @property
    def port(self) -> int:
        if self._runner is not None:
            for addr in self._runner.addresses:
                if isinstance(addr, tuple):
                    return int(addr[1])
        return self.config.port

    async def start(self) -> None:
        if not is_loopback(self.config.host) and not self.config.api_key:
            raise ValueError(f"refusing to listen on {self.config.host} without an API key: set one "
                             "(--api-key or the server settings) or listen on 127.0.0.1")
        runner = web.AppRunner(create_app(self.engine, self.config), handler_cancellation=True,
                               access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}") from None
        self._runner = runner
        log.info("OpenAI API listening on %s", self.url)
        if self.config.ollama_port and self.config.ollama_port != self.port:
            await self._start_ollama_site(runner, self.config.ollama_port)

    async def _start_ollama_site(self, runner: web.AppRunner, port: int) -> None:
        """The same app on Ollama's port too; a failure leaves the main port serving and says why."""
        from app.api.ollama.port import ollama_running_message, ollama_version_at

        self.ollama_error, self.ollama_port = None, None
        version = await ollama_version_at(self.config.host, port)
        if version is not None:
            self.ollama_error = ollama_running_message(port, version)
        else:
            try:
                await web.TCPSite(runner, self.config.host, port).start()
                self.ollama_port = port
                log.info("Ollama API also listening on port %d", port)
                return
            except OSError as exc:
                self.ollama_error = f"cannot listen on Ollama's port {port} too: {exc.strerror or exc}"
        log.warning("%s", self.ollama_error)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            self.ollama_port = None
            await runner.cleanup()
