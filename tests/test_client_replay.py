"""Replay the 47 requests captured from real clients; every answer validates against OpenAI's schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest

from app.engine.catalog.tokenizer import FolderTokenizer
from tests.helpers.servers import Servers
from tests.openai_schema import validate, validate_completion_chunk
from tests.server_harness import ServerThread

CAPTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "clients" / \
    "captured-requests.json"
REQUESTS = json.loads(CAPTURES.read_text())["requests"] if CAPTURES.is_file() else []
pytestmark = pytest.mark.skipif(not REQUESTS, reason=f"captured client requests not found at {CAPTURES}")


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    # a long context: Open WebUI's 28 tools make a 20 KB prompt; short default answers keep it quick
    return serve_module(models={"tiny": {"context_length": 32768, "max_tokens": 24}})


def substitute(request: dict) -> dict:
    body = copy.deepcopy(request.get("body"))
    if isinstance(body, dict) and "model" in body:
        body["model"] = "tiny"
    return body


def check_stream(path: str, raw: str) -> None:
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert events and events[-1] == "data: [DONE]", raw[-200:]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    for chunk in chunks:
        if "chat" in path:
            validate("CreateChatCompletionStreamResponse", chunk)
        else:
            validate_completion_chunk(chunk)


@pytest.mark.parametrize("index", range(len(REQUESTS)),
                         ids=[f"{i}-{r['client']}-{r['path']}" for i, r in enumerate(REQUESTS)])
def test_captured_request_is_answered_schema_valid(server: ServerThread, index: int) -> None:
    request = REQUESTS[index]
    body = substitute(request)
    headers = {k: v for k, v in request.get("headers", {}).items()
               if k.lower() not in ("content-length", "host", "accept-encoding", "connection")}
    url = server.root + request["path"]
    resp = httpx.request(request["method"], url, json=body if body is not None else None, headers=headers,
                         timeout=300)
    assert resp.status_code == 200, resp.text[:500]
    path = request["path"]
    if request["method"] == "GET":
        validate("ListModelsResponse", resp.json())
        return
    if isinstance(body, dict) and body.get("stream"):
        assert resp.headers["content-type"].startswith("text/event-stream")
        check_stream(path, resp.text)
        return
    data = resp.json()
    validate("CreateChatCompletionResponse" if "chat" in path else "CreateCompletionResponse", data)


def test_fim_tokens_in_raw_prompts_are_special_tokens(server: ServerThread, tiny_model_dir: Path) -> None:
    tok = FolderTokenizer(tiny_model_dir)
    raw = "<fim_prefix>def add(a, b):<fim_suffix>\n<fim_middle>"
    ids = tok.encode(raw)
    for marker in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"):
        assert tok.token_id(marker) in ids
    resp = httpx.post(f"{server.base_url}/completions", json={"model": "tiny", "prompt": raw, "max_tokens": 2},
                      timeout=60).json()
    assert resp["usage"]["prompt_tokens"] == len(ids)  # no chat template around a raw completion prompt


def test_suffix_uses_the_models_fill_in_the_middle_form(server: ServerThread, tiny_model_dir: Path) -> None:
    tok = FolderTokenizer(tiny_model_dir)
    expected = tok.encode("<fim_prefix>def add(a, b):<fim_suffix>\n    return c<fim_middle>")
    resp = httpx.post(f"{server.root}/fim/completions", json={"model": "tiny", "prompt": "def add(a, b):",
                                                              "suffix": "\n    return c", "max_tokens": 2},
                      timeout=60).json()
    assert resp["usage"]["prompt_tokens"] == len(expected)
