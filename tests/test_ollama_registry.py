"""The Ollama registry client and add-model, against a loopback server speaking the same protocol."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.engine.catalog.ollama_client import OllamaError, OllamaRegistryClient
from app.engine.catalog.ollama_names import InvalidName, parse_name
from app.engine.catalog.registry import Registry
from app.engine.catalog.tokenizer import FolderTokenizer
from tests.fake_ollama import CHATML_OLLAMA, FakeModel, FakeRegistry
from tests.helpers.servers import Servers

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"stop": ["<|im_end|>", "<|im_start|>"], "temperature": 0.3, "top_k": 7, "num_ctx": 1024}


@pytest.fixture
def fake() -> FakeRegistry:
    reg = FakeRegistry().start()
    reg.add(("library", "tinychat", "latest"), FakeModel(CHATML_OLLAMA, system="You are tiny.", params=PARAMS,
                                                          license="MIT test licence",
                                                          messages=[{"role": "user", "content": "hi"}]))
    yield reg
    reg.stop()


def fetch(fake: FakeRegistry, name: str, **kw):
    progress: list[tuple[str, int, int]] = []
    client = OllamaRegistryClient(fake.url, **kw)
    meta = asyncio.run(client.fetch(name, lambda *a: progress.append(a)))
    return meta, progress


def test_fetches_metadata_and_never_the_weights(fake: FakeRegistry) -> None:
    meta, progress = fetch(fake, "tinychat")
    assert meta.name == "registry.ollama.ai/library/tinychat:latest"
    assert meta.template == CHATML_OLLAMA and meta.system == "You are tiny."
    assert meta.params == PARAMS and meta.license == "MIT test licence"
    assert meta.messages == [{"role": "user", "content": "hi"}]
    assert meta.config["model_family"] == "llama"
    assert progress[-1][1] == progress[-1][2]  # ends at 100 %
    weights = [d for d, data in fake.blobs.items() if data.startswith(b"GGUF")]
    assert weights and not any(w in path for path in fake.requests for w in weights)
    assert any(path.startswith("/cdn/") for path in fake.requests)  # the 307 was followed


def test_unknown_model_or_tag_is_a_clear_404(fake: FakeRegistry) -> None:
    with pytest.raises(OllamaError, match="not found in the Ollama library.*tag 'nope'"):
        fetch(fake, "tinychat:nope")
    with pytest.raises(OllamaError, match="no model library/missing"):
        fetch(fake, "missing")


def test_truncated_body_is_retried_then_reported(fake: FakeRegistry) -> None:
    fake.mode = "truncate"
    with pytest.raises(OllamaError, match="cut short|damaged"):
        fetch(fake, "tinychat", retries=1, backoff=0.01)


def test_slow_server_times_out(fake: FakeRegistry) -> None:
    fake.mode = "slow"
    with pytest.raises(OllamaError, match="no answer within 0.5 s"):
        fetch(fake, "tinychat", timeout=0.5, retries=0)


def test_transient_errors_are_retried(fake: FakeRegistry) -> None:
    fake.flaky_left = 2
    meta, _ = fetch(fake, "tinychat", retries=3, backoff=0.01)
    assert meta.system == "You are tiny."


def test_no_network_is_a_clear_error() -> None:
    client = OllamaRegistryClient("http://127.0.0.1:9", retries=0, timeout=2)
    with pytest.raises(OllamaError, match="cannot connect|could not fetch"):
        asyncio.run(client.fetch("tinychat"))


@pytest.mark.parametrize("text, expected", [
    ("llama3", "registry.ollama.ai/library/llama3:latest"),
    ("llama3:8b", "registry.ollama.ai/library/llama3:8b"),
    ("user/model:q4", "registry.ollama.ai/user/model:q4"),
    ("example.com:5000/ns/m:t", "example.com:5000/ns/m:t"),
    ("Mixtral", "registry.ollama.ai/library/mixtral:latest"),
])
def test_name_parsing(text: str, expected: str) -> None:
    assert str(parse_name(text)) == expected


@pytest.mark.parametrize("bad", ["", "a b", "a//b", "x:", "a/b/c/d", "-x", "x:!!"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(InvalidName):
        parse_name(bad)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_add_model_from_ollama_then_prompt_and_serve(serve: Servers, fake: FakeRegistry, tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    res = cli("--models", str(models), "add-model", "--model-dir", str(tiny_model_dir),
              "--registry-url", fake.url, "--ollama", "tinychat", "mychat:v1")
    assert res.returncode == 0, res.stderr
    assert "ollama: [" in res.stderr and "Ollama metadata from" in res.stdout
    saved = json.loads(models.read_text())["models"]["mychat:v1"]
    assert saved["ollama"]["template"] == CHATML_OLLAMA
    assert saved["ollama"]["system"] == "You are tiny." and saved["ollama"]["params"] == PARAMS

    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hello"}]))
    res = cli("--models", str(models), "prompt", "--model", "mychat:v1", "--messages-file", str(messages))
    assert res.returncode == 0, res.stderr
    expected = ("OLLAMA-TEMPLATE<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert res.stdout == expected

    server = serve(registry=Registry(models), models={})  # what the CLI saved, nothing more
    resolved = server.engine.resolve("mychat:v1")
    assert (resolved.values["temperature"], resolved.source("temperature")) == (0.3, "ollama")
    assert (resolved.values["context_length"], resolved.source("context_length")) == (1024, "ollama")
    assert resolved.values["stop"] == ["<|im_end|>", "<|im_start|>"]
    body = {"model": "mychat:v1", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    out = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120).json()
    n_tokens = len(FolderTokenizer(tiny_model_dir).encode(expected))
    assert out["usage"]["prompt_tokens"] == n_tokens


def test_add_model_offline_is_a_readable_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    res = cli("--models", str(models), "add-model", "--model-dir", str(tiny_model_dir),
              "--registry-url", "http://127.0.0.1:9", "tinychat")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: could not fetch")
    assert "Traceback" not in res.stderr and not models.exists()


def test_prompt_command_with_a_template_file(tmp_path: Path) -> None:
    tmpl = tmp_path / "t.tmpl"
    tmpl.write_text("{{ range .Messages }}[{{ .Role }}] {{ .Content }}\n{{ end }}")
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    res = cli("prompt", "--template-file", str(tmpl), "--messages-file", str(msgs))
    assert res.returncode == 0 and res.stdout == "[user] a\n[assistant] b\n"
    tmpl.write_text("{{ range .Messages }")
    res = cli("prompt", "--template-file", str(tmpl), "--messages-file", str(msgs))
    assert res.returncode == 2 and "line 1, column" in res.stderr
