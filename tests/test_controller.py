"""The tray app's logic without widgets: server settings restart the listener, the key rule holds."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest

from app.engine.registry import Registry
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
