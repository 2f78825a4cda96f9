"""Every test server comes from one preset: the tiny CPU model on a loopback port, changed per test.

As llama.cpp's server tests build every server from ``ServerPreset.tinyllama2()`` and set attributes
per test, a test here asks the ``serve`` fixture (or ``serve_module`` for a server shared by a module)
for a started server with the attributes it cares about::

    def test_idle_unload(serve):
        server = serve(models={"sleepy": {"idle_unload_minutes": 0.01}})

Servers are stopped at the fixture's teardown. Import the fixtures into the test module that uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from app.api.server import ServerConfig
from app.engine.catalog.registry import Registry
from app.engine.facade import Engine
from app.engine.settings.schema import Settings
from tests.server_harness import ServerThread, register

#: the settings the preset registers the tiny model with
TINY_SETTINGS: dict[str, Any] = {"context_length": 512}


@dataclass
class ServerPreset:
    """What a test server is made of; :meth:`start` registers the models and starts it."""

    #: the registry to serve (None: a fresh models.json in a temporary folder)
    registry: Registry | None
    #: the folder the models below are registered from
    model_dir: Path
    #: model name -> its settings layer in the registry
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {"tiny": dict(TINY_SETTINGS)})
    config: ServerConfig = field(default_factory=lambda: ServerConfig(port=0))
    max_loaded: int = 1
    server_settings: Settings | None = None
    #: (registry entry, resolved settings) -> a backend (None: the engine's own choice, on CPU the
    #: transformers backend)
    backend_factory: Callable[..., Any] | None = None

    def start(self, tmp_dir: Callable[[], Path]) -> ServerThread:
        registry = self.registry or Registry(tmp_dir() / "models.json")
        for name, settings in self.models.items():
            register(registry, name, self.model_dir, **settings)
        factory = self.backend_factory
        engine_factory = Engine if factory is None else (
            lambda reg, **kw: Engine(reg, backend_factory=factory, **kw))
        return ServerThread(registry, server_settings=self.server_settings, max_loaded=self.max_loaded,
                            config=self.config, engine_factory=engine_factory).start()


class Servers:
    """Starts servers from the tiny preset and stops every one it started."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> None:
        self._tmp = tmp_path_factory
        self._preset = ServerPreset(registry=None, model_dir=tiny_model_dir)
        self._started: list[ServerThread] = []

    def __call__(self, **attrs: Any) -> ServerThread:
        """A started server: the preset with ``attrs`` (any :class:`ServerPreset` field) changed."""
        preset = dataclasses.replace(self._preset, **attrs)
        server = preset.start(lambda: self._tmp.mktemp("server"))
        self._started.append(server)
        return server

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Servers]:
    """Start servers for one test."""
    servers = Servers(tmp_path_factory, tiny_model_dir)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Servers]:
    """Start servers shared by the tests of a module."""
    servers = Servers(tmp_path_factory, tiny_model_dir)
    yield servers
    servers.stop_all()
