"""End to end with servers of their own: access control, also listening on Ollama's port, the Continue CLI
with its ``ollama`` provider, a model removed while loaded, a model without fill-in-the-middle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import ollama
import pytest

from app.api.server import ServerConfig
from tests.helpers.ollama_shapes import check
from tests.helpers.servers import Servers
from tests.helpers.tiny import MESSAGES


def test_access_control_as_for_v1(serve: Servers) -> None:
    server = serve(config=ServerConfig(port=0, api_key="sesame"))
    for method, path in (("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/api/version"), ("GET", "/")):
        resp = httpx.request(method, f"{server.root}{path}", json={"model": "tiny", "messages": MESSAGES})
        assert resp.status_code == 401, path
        if path != "/":
            assert "API key" in check("error", resp.json())["error"]
    keyed = ollama.Client(host=server.root, headers={"Authorization": "Bearer sesame"})
    assert [m.model for m in keyed.list().models] == ["tiny:latest"]
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=server.root).list()
    assert err.value.status_code == 401


# -- also on Ollama's port ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_also_on_ollamas_port_unless_ollama_is_there(serve: Servers) -> None:
    port = _free_port()
    first = serve(config=ServerConfig(port=0, ollama_port=port))
    assert first.listener.ollama_port == port and first.listener.ollama_error is None
    assert [m.model for m in ollama.Client(host=f"http://127.0.0.1:{port}").list().models] == ["tiny:latest"]
    # something speaking Ollama's API answers there now: a second server says so and serves on its own port
    second = serve(config=ServerConfig(port=0, ollama_port=port))
    assert second.listener.ollama_port is None
    assert "already answers there" in second.listener.ollama_error and "0.9.0" in second.listener.ollama_error
    assert "the 'Ollama port' server setting or --ollama-port" in second.listener.ollama_error  # the real knobs
    check("version", httpx.get(f"{second.root}/api/version").json())


def test_ollamas_port_has_the_same_access_control(serve: Servers) -> None:
    port = _free_port()
    serve(config=ServerConfig(port=0, ollama_port=port, api_key="sesame"))
    keyed = ollama.Client(host=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer sesame"})
    assert [m.model for m in keyed.list().models] == ["tiny:latest"]
    assert httpx.get(f"http://127.0.0.1:{port}/api/tags").status_code == 401


def test_ollamas_port_taken_by_something_else(serve: Servers) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = serve(config=ServerConfig(port=0, ollama_port=port))
    assert server.listener.ollama_port is None and f"cannot listen on Ollama's port {port}" in \
        server.listener.ollama_error
    assert httpx.get(f"{server.root}/api/version").status_code == 200


# -- a real client that speaks only Ollama's API ------------------------------------------------------
CN = Path(os.environ.get("EXLLAMA_TRAY_CN", Path(__file__).resolve().parent.parent / ".cache" / "node" /
                         "node_modules" / ".bin" / "cn"))


def test_continue_cli_with_the_ollama_provider(serve: Servers, tmp_path: Path) -> None:
    if not CN.exists():
        pytest.skip(f"Continue CLI not installed at {CN} (scripts/dev.py test installs it when npm is present)")
    # agents send long system prompts and tool lists: room for them, short answers
    server = serve(models={"tiny": {"context_length": 32768, "max_tokens": 12}})
    home, work = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    work.mkdir()
    (work / "README.md").write_text("# scratch project\n")
    config = work / "config.yaml"
    config.write_text("name: exllama-tray-test\nversion: 0.0.1\nschema: v1\nmodels:\n"
                      f"  - name: tiny\n    provider: ollama\n    model: tiny\n    apiBase: {server.root}\n"
                      "    roles:\n      - chat\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "CONTINUE", "OLLAMA"))}
    env.update(HOME=str(home), CI="true", NO_COLOR="1")
    res = subprocess.run([str(CN), "-p", "Say hello in one word", "--config", str(config)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-1000:], res.stderr[-1000:])
    assert res.stdout.strip()
    [done] = server.engine.recent_requests()
    assert done.completion_tokens >= 1 and done.prompt_tokens > 100  # Continue's own system prompt came along


def test_a_loaded_model_removed_from_the_registry(serve: Servers) -> None:
    server = serve()
    client = ollama.Client(host=server.root, timeout=60)
    client.generate(model="tiny")  # loaded
    assert [m.model for m in client.ps().models] == ["tiny:latest"]
    server.registry.remove("tiny")
    assert check("ps", httpx.get(f"{server.root}/api/ps").json())["models"] == []
    assert check("tags", httpx.get(f"{server.root}/api/tags").json())["models"] == []
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt="hi")
    assert err.value.status_code == 404


def test_suffix_for_a_model_that_cannot_fill_in_the_middle(serve: Servers, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "no-fim"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if not t["content"].startswith("<fim")]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    server = serve(model_dir=folder, models={"plain": {"context_length": 256, "max_tokens": 2}})
    shown = check("show", httpx.post(f"{server.root}/api/show", json={"model": "plain"}).json())
    assert "insert" not in shown["capabilities"]
    resp = httpx.post(f"{server.root}/api/generate", json={"model": "plain", "prompt": "a", "suffix": "b"})
    assert resp.status_code == 400 and "does not support insert" in check("error", resp.json())["error"]
    assert ollama.Client(host=server.root).generate(model="plain", prompt="a").done

