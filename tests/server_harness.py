"""Run the real engine + aiohttp server on a loopback port in a background thread."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import httpx

from app.api.server import Listener, ServerConfig
from app.engine.facade import Engine
from app.engine.catalog.registry import Registry
from app.engine.catalog.add_model import add_model
from app.engine.settings.schema import Settings


class ServerThread:
    def __init__(self, registry: Registry, *, server_settings: Settings | None = None, max_loaded: int = 1,
                 config: ServerConfig | None = None, engine_factory: Callable[..., Engine] = Engine) -> None:
        self.registry = registry
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._config = config or ServerConfig(port=0)
        self._settings = server_settings
        self._max_loaded = max_loaded
        self._engine_factory = engine_factory
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-server")
        self._stopped = False
        self.engine: Engine
        self.listener: Listener

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.engine = self._engine_factory(self.registry, server_settings=self._settings,
                                               max_loaded=self._max_loaded)
            await self.engine.start()
            self.listener = Listener(self.engine, self._config)
            await self.listener.start()

        try:
            self.loop.run_until_complete(start())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.root}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        """Stop the listener and the engine; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True

        async def shutdown() -> None:
            await self.listener.stop()
            await self.engine.close()

        try:
            self.call(shutdown(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


def register(registry: Registry, name: str, folder: Path, **settings: Any) -> str:
    return add_model(registry, name, folder, settings=Settings(**settings), replace=True).key


def register_broken(registry: Registry, name: str, good_folder: Path, folder: Path) -> Callable[[], None]:
    """Register a copy of ``good_folder`` whose weights are cut short (it fails to load); returns what
    repairs it, as a user fixing the folder would."""
    shutil.copytree(good_folder, folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    register(registry, name, folder)
    return lambda: weights.write_bytes(good)
