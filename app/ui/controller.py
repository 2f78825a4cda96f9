"""The tray app's logic: engine, listener, server settings. No widgets here; the UI calls these."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from app.api.server import Listener, ServerConfig
from app.engine.facade import Engine, ModelLoadError, ModelNotFound
from app.engine.observability.metrics import MetricsSample
from app.engine.catalog.registry import Registry
from app.server_config import ServerSettings, ServerSettingsStore, get_api_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrayState:
    """What the tray icon and tooltip show."""

    state: str  # idle / ready / loading / generating / error
    progress: float | None
    loaded: list[str]
    tokens_per_s: float
    url: str
    error: str | None


class AppController:
    def __init__(self, registry: Registry, store: ServerSettingsStore, *, port: int | None = None) -> None:
        self.registry = registry
        self.store = store
        self.settings = store.load()
        if port is not None:
            self.settings.port = port
        self.engine = Engine(registry)
        self.listener: Listener | None = None
        self.last_error: str | None = None
        self.listen_error: str | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------
    def server_config(self, settings: ServerSettings | None = None) -> ServerConfig:
        s = settings or self.settings
        origins = tuple(s.cors_origins) if s.cors_enabled else ()
        return ServerConfig(host=s.host, port=s.port, api_key=get_api_key() if s.on_network else None,
                            cors_origins=origins, ollama_port=s.ollama_port if s.ollama_port_enabled else None)

    async def start(self) -> None:
        await self.engine.start()
        await self.start_listener()

    async def start_listener(self) -> None:
        listener = Listener(self.engine, self.server_config())
        try:
            await listener.start()
        except (OSError, ValueError) as exc:
            self.listen_error = str(exc)
            log.error("the API server could not start: %s", exc)
            return
        self.listen_error = None
        self.listener = listener

    @property
    def ollama_error(self) -> str | None:
        """Why the Ollama API is not served on Ollama's port as the settings ask (Ollama itself runs
        there, or the port is taken), or None."""
        return self.listener.ollama_error if self.listener is not None else None

    async def apply_server_settings(self, settings: ServerSettings) -> None:
        """Restart the listener with ``settings`` without restarting the app (the engine keeps its
        models), then save them. When the new listener cannot start (the port is taken, say) the old
        one serves again as before and nothing is saved; the error says why."""
        settings.validate()
        if settings.on_network and not get_api_key():
            raise ValueError("listening on the network needs an API key: generate one first")
        new = Listener(self.engine, self.server_config(settings))
        old = self.listener
        if old is not None:  # the same port cannot be held twice: the old listener goes first
            old_config = replace(old.config, port=old.port)  # the port it had, also when asked for "any"
            await old.stop()
            self.listener = None
        try:
            await new.start()
        except (OSError, ValueError) as exc:
            log.warning("server settings not applied: %s", exc)
            if old is not None:  # back on the settings that worked, on the same port
                restored = Listener(self.engine, old_config)
                try:
                    await restored.start()
                    self.listener = restored
                except (OSError, ValueError) as again:  # taken meanwhile by another program
                    self.listen_error = str(again)
                    log.error("the API server could not start again: %s", again)
            raise
        self.listener, self.listen_error = new, None
        self.settings = settings
        self.store.save(settings)

    async def stop(self) -> None:
        """Quit: running requests end with an error saying so, models are unloaded, then the listener
        closes (requests arriving meanwhile get a 503)."""
        await self.engine.close()
        if self.listener is not None:
            await self.listener.stop()
            self.listener = None

    @property
    def url(self) -> str:
        if self.listener is not None:
            return self.listener.url
        return f"http://{'localhost' if not self.settings.on_network else '0.0.0.0'}:{self.settings.port}/v1"

    # -- models -------------------------------------------------------------------------
    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def load(self, name: str) -> None:
        try:
            await self.engine.load(name)
            self.last_error = None
        except ModelNotFound as exc:
            self.last_error = str(exc)
            log.warning("%s", exc)
        except ModelLoadError as exc:  # the engine keeps it (last_load_failure) until a model loads
            self.last_error = None
            log.warning("%s", exc)

    async def unload(self, name: str) -> None:
        await self.engine.unload(name)

    def tray_state(self) -> TrayState:
        states = self.engine.model_states()
        loading = [s for s in states if s.state == "loading"]
        loaded = [s.name for s in states if s.state == "ready"]
        history = self.engine.metrics.history(5)
        last: MetricsSample | None = history[-1] if history else None
        tps = last.generation_tps if last else 0.0
        # a failed load shows until a model loads, whoever asked for it (the menu or a client's request)
        failure = self.engine.last_load_failure
        error = self.last_error or (failure.message if failure is not None else None) or self.listen_error
        if loading:
            state, progress = "loading", loading[0].progress
        elif error:
            state, progress = "error", None
        elif last is not None and last.running > 0:
            state, progress = "generating", None
        elif loaded:
            state, progress = "ready", None
        else:
            state, progress = "idle", None
        return TrayState(state, progress, loaded, tps, self.url, error)


def log_folder() -> Path:
    from app.paths import log_dir

    return log_dir()
