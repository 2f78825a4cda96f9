"""The tray app's logic without widgets: server settings restart the listener, the key rule holds."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest

from app.engine.catalog.registry import Registry
from app.server_config import ServerSettings, ServerSettingsStore
from app.ui.controller import AppController
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_server_settings_change_restarts_the_listener(tmp_path: Path, memory_keyring) -> None:
    asyncio.run(_restart_scenario(tmp_path))


async def _restart_scenario(tmp_path: Path) -> None:
    controller = AppController(Registry(tmp_path / "models.json"), ServerSettingsStore(tmp_path / "server.json"),
                               port=0)
    await controller.start()
    try:
        old_port = controller.listener.port
        new_port = free_port()
        await controller.apply_server_settings(ServerSettings(port=new_port, cors_enabled=True,
                                                              cors_origins=["http://localhost:3000"]))
        ok = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{new_port}/health")
        assert ok.status_code == 200
        assert await asyncio.to_thread(refused, old_port)
        assert controller.url.endswith(f":{new_port}/v1")
        assert json.loads(controller.store.path.read_text())["port"] == new_port
        with pytest.raises(ValueError, match="API key"):
            await controller.apply_server_settings(ServerSettings(port=new_port, on_network=True))
    finally:
        await controller.stop()


def test_a_load_that_fails_on_a_clients_request_shows_in_the_tray(tmp_path: Path, tiny_model_dir: Path,
                                                                  memory_keyring) -> None:
    asyncio.run(_failed_on_demand_scenario(tmp_path, tiny_model_dir))


async def _failed_on_demand_scenario(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.server_harness import register_broken

    registry = Registry(tmp_path / "models.json")
    repair = register_broken(registry, "corrupt", tiny_model_dir, tmp_path / "corrupt")
    controller = AppController(registry, ServerSettingsStore(tmp_path / "server.json"), port=0)
    await controller.start()
    try:
        url = f"http://127.0.0.1:{controller.listener.port}/v1/chat/completions"
        body = {"model": "corrupt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        resp = await asyncio.to_thread(httpx.post, url, json=body, timeout=60)
        assert resp.status_code == 503
        state = controller.tray_state()
        assert state.state == "error" and "corrupt" in state.error and "failed to load" in state.error
        await controller.load("corrupt")  # from the menu: the same failure, still shown
        assert controller.tray_state().state == "error"
        repair()  # fixed; the next request loads it and the tray is well again
        resp = await asyncio.to_thread(httpx.post, url, json=body, timeout=60)
        assert resp.status_code == 200
        assert controller.tray_state().state != "error"
    finally:
        await controller.stop()


def test_the_ollama_port_setting_serves_ollamas_api_there_and_never_over_ollama(tmp_path: Path,
                                                                                memory_keyring) -> None:
    asyncio.run(_ollama_port_scenario(tmp_path))


async def _ollama_port_scenario(tmp_path: Path) -> None:
    first = AppController(Registry(tmp_path / "a.json"), ServerSettingsStore(tmp_path / "a-server.json"), port=0)
    second = AppController(Registry(tmp_path / "b.json"), ServerSettingsStore(tmp_path / "b-server.json"), port=0)
    await first.start()
    await second.start()
    try:
        ollama_port = free_port()
        await first.apply_server_settings(ServerSettings(port=free_port(), ollama_port_enabled=True,
                                                         ollama_port=ollama_port))
        assert first.ollama_error is None
        version = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{ollama_port}/api/version")
        assert version.status_code == 200 and "version" in version.json()
        saved = json.loads(first.store.path.read_text())
        assert saved["ollama_port_enabled"] is True and saved["ollama_port"] == ollama_port
        # a second app asked for the same port finds an Ollama API answering there: it says so and keeps
        # serving on its own port
        await second.apply_server_settings(ServerSettings(port=free_port(), ollama_port_enabled=True,
                                                          ollama_port=ollama_port))
        assert second.ollama_error and f"port {ollama_port}" in second.ollama_error
        assert "already answers there" in second.ollama_error
        health = await asyncio.to_thread(httpx.get, f"{second.url.removesuffix('/v1')}/health")
        assert health.status_code == 200
        with pytest.raises(ValueError, match="must differ from the server's port"):
            await first.apply_server_settings(ServerSettings(port=ollama_port, ollama_port_enabled=True,
                                                             ollama_port=ollama_port))
    finally:
        await second.stop()
        await first.stop()
