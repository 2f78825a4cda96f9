"""Crash-safe models.json and access control (API key, bind address, CORS)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from app.api.server import Listener, ServerConfig
from app.engine.facade import Engine
from app.engine.catalog.registry import Registry, RegistryError
from tests.helpers.servers import Servers
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parent.parent
WRITER = """
import sys
from app.engine.catalog.registry import ModelEntry, Registry
from app.engine.settings.schema import Settings
reg = Registry(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    reg.add(f"m{i % 50}", ModelEntry(model_dir="/x/" + "y" * (i % 4000), settings=Settings(top_k=i % 100)),
            replace=True)
    i += 1
"""


def test_sigkill_while_writing_never_corrupts(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    Registry(path).add("seed", __import__("app.engine.catalog.registry", fromlist=["ModelEntry"]).ModelEntry(model_dir="/s"))
    rng = random.Random(3)
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        data = json.loads(path.read_text())  # never corrupt, never empty
        assert data["schema_version"] == 1 and "seed:latest" in data["models"]
        assert Registry(path).names()
    leftovers = [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    # a killed writer can leave its temp file behind; it never replaces models.json half-written
    assert all(name.startswith("models.json.") for name in leftovers)


def test_broken_models_json_on_start_is_reported_and_backed_up(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('{"models": {"a": ')
    res = subprocess.run([sys.executable, "-m", "app", "--models", str(path), "serve", "--port", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "is not valid JSON" in res.stderr and "a copy was kept as" in res.stderr
    backups = list(tmp_path.glob("models.json.broken-*"))
    assert len(backups) == 1 and backups[0].read_text() == '{"models": {"a": '
    assert path.read_text() == '{"models": {"a": '  # never reset
    with pytest.raises(RegistryError):
        Registry(path).check_on_start()
    assert len(list(tmp_path.glob("models.json.broken-*"))) == 1  # one copy per distinct content


@pytest.fixture
def keyed_server(serve: Servers) -> ServerThread:
    return serve(models={"tiny": {}}, config=ServerConfig(port=0, api_key="sk-test-SECRET-123",
                                                          cors_origins=("http://allowed.example",)))


def test_api_key_required_and_never_leaked(keyed_server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    base = keyed_server.base_url
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sk-test-SECRET-12"},
                    {"x-api-key": "nope"}, {"Authorization": "Basic sk-test-SECRET-123"}):
        resp = httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401
        err = resp.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert "SECRET" not in resp.text
    for headers in ({"Authorization": "Bearer sk-test-SECRET-123"}, {"x-api-key": "sk-test-SECRET-123"},
                    {"api-key": "sk-test-SECRET-123"}):
        assert httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=60).status_code == 200
    client = openai.OpenAI(base_url=base, api_key="sk-test-SECRET-123", max_retries=0)
    assert client.models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="bad", max_retries=0).models.list()
    assert httpx.get(f"{keyed_server.root}/health").status_code == 200  # liveness stays open
    metrics = httpx.get(f"{keyed_server.root}/metrics", headers={"Authorization": "Bearer sk-test-SECRET-123"}).text
    assert "SECRET" not in metrics
    assert "SECRET" not in caplog.text


def test_cors_only_for_configured_origins(keyed_server: ServerThread) -> None:
    url = f"{keyed_server.base_url}/chat/completions"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(url, headers={"Origin": "http://allowed.example", **pre})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.options(url, headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in other.headers
    get = httpx.get(f"{keyed_server.base_url}/models", headers={"Origin": "http://evil.example",
                                                                "Authorization": "Bearer sk-test-SECRET-123"})
    assert get.status_code == 200 and "access-control-allow-origin" not in get.headers


def test_cors_is_off_by_default(serve: Servers) -> None:
    srv = serve(models={})
    resp = httpx.get(f"{srv.base_url}/models", headers={"Origin": "http://allowed.example"})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
    assert srv.listener.config.host == "127.0.0.1"  # default bind


def test_refuses_network_bind_without_a_key(tmp_path: Path) -> None:
    async def go() -> None:
        engine = Engine(Registry(tmp_path / "models.json"))
        with pytest.raises(ValueError, match="without an API key"):
            await Listener(engine, ServerConfig(host="0.0.0.0", port=0)).start()
        await engine.close()

    asyncio.run(go())


def test_serve_refuses_network_bind_without_a_key(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "app", "--models", str(tmp_path / "m.json"), "serve", "--host",
                          "0.0.0.0", "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "refusing to listen on 0.0.0.0 without an API key" in res.stderr
