"""End to end: the official openai SDK against the real server on loopback, tiny CPU model."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.servers import Servers
from tests.helpers.tiny import KEEP_TALKING
from tests.helpers.tiny import MESSAGES as MSGS
from tests.helpers.waiting import wait_until
from tests.openai_schema import validate, validate_completion_chunk
from tests.server_harness import ServerThread, register


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 512}})


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **kw):
    raw = client.chat.completions.with_raw_response.create(**kw)
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    return raw.parse()


def stream_chat(server: ServerThread, body: dict) -> tuple[list[dict], str]:
    """Stream through raw HTTP so every chunk can be checked against the schema."""
    chunks = []
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json={**body, "stream": True},
                      timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunk = json.loads(line[6:])
        validate("CreateChatCompletionStreamResponse", chunk)
        chunks.append(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return chunks, text


def test_models_list_and_get(client: openai.OpenAI, server: ServerThread) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    body = httpx.get(f"{server.base_url}/models").json()
    validate("ListModelsResponse", body)
    assert body["data"][0]["context_length"] == 512
    one = client.models.retrieve("tiny")
    assert one.id == "tiny" and one.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_stream_equals_non_stream_for_the_same_seed(client: openai.OpenAI, server: ServerThread) -> None:
    full = chat(client, model="tiny", messages=MSGS, max_tokens=24, seed=42, temperature=0.9)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 5
    chunks, text = stream_chat(server, {"model": "tiny", "messages": MSGS, "max_tokens": 24, "seed": 42,
                                        "temperature": 0.9})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text == full.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    # and the SDK's own streaming reads the same
    sdk_text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=24, seed=42, temperature=0.9, stream=True) if c.choices)
    assert sdk_text == text


def test_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=7, seed=1, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 7 or chunks[-2].choices[0].finish_reason == "stop"
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI) -> None:
    # a large negative bias on every end-of-sequence id keeps the random model going
    out = chat(client, model="tiny", messages=MSGS, max_tokens=5, seed=3, logit_bias=KEEP_TALKING)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    out2 = chat(client, model="tiny", messages=MSGS, max_completion_tokens=3, seed=3, logit_bias=KEEP_TALKING)
    assert out2.usage.completion_tokens == 3


def test_stop_string_is_cut_and_not_returned(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", messages=MSGS, max_tokens=40, seed=11, temperature=1.0, logit_bias=KEEP_TALKING)
    text = chat(client, **kw).choices[0].message.content
    assert len(text) > 12
    stop = text[8:11]
    expected = text[: text.find(stop)]
    out = chat(client, **kw, stop=stop)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    # the same across chunk boundaries when streaming, and with a list of stops
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **kw, stop=["never-appears", stop], stream=True) if c.choices)
    assert streamed == expected


def test_completions_stream_and_non_stream(server: ServerThread, client: openai.OpenAI) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "seed": 5}
    raw = httpx.post(f"{server.base_url}/completions", json=body, timeout=120).json()
    validate("CreateCompletionResponse", raw)
    assert raw["object"] == "text_completion"
    with httpx.stream("POST", f"{server.base_url}/completions", json={**body, "stream": True,
                                                                      "stream_options": {"include_usage": True}},
                      timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks:
        validate_completion_chunk(chunk)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == raw["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == raw["usage"]["completion_tokens"]
    sdk = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, seed=5, stream=True)
    assert "".join(c.choices[0].text for c in sdk if c.choices) == raw["choices"][0]["text"]


def test_batching_is_real_with_8_concurrent_streams(server: ServerThread) -> None:
    before = server.metric("exllama_tray_engine_batched_steps_total")
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 40,
               "seed": i, "logit_bias": KEEP_TALKING} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: stream_chat(server, b), bodies))
    for chunks, text in results:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert text
    assert server.metric("exllama_tray_engine_batched_steps_total") > before
    assert server.metric("exllama_tray_engine_max_batch") > 1
    # each streamed text equals the same request run alone
    alone = httpx.post(f"{server.base_url}/chat/completions", json=bodies[3], timeout=120).json()
    assert alone["choices"][0]["message"]["content"] == results[3][1]


def test_disconnect_mid_stream_cancels_the_job(server: ServerThread, client: openai.OpenAI) -> None:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 400, "stream": True, "seed": 9,
            "logit_bias": KEEP_TALKING}
    cancelled_before = _reason_count(server, "cancelled")
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as resp:
        it = resp.iter_lines()
        got = [next(it) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    assert wait_until(lambda: server.metric("exllama_tray_requests_running") == 0)
    assert _reason_count(server, "cancelled") == cancelled_before + 1
    assert server.engine.manager.resident("tiny:latest").active == 0
    out = chat(client, model="tiny", messages=MSGS, max_tokens=4)
    assert out.choices[0].message.content is not None


def _reason_count(server: ServerThread, reason: str) -> float:
    try:
        return server.metric(f'exllama_tray_requests_total{{finish_reason="{reason}"}}')
    except KeyError:
        return 0.0


def test_second_model_registered_while_running_is_served_on_demand(server: ServerThread, client: openai.OpenAI,
                                                                  tiny_model_dir_b: Path) -> None:
    register(server.registry, "tiny-b", tiny_model_dir_b, context_length=512)
    assert {m.id for m in client.models.list().data} == {"tiny", "tiny-b"}
    a1 = chat(client, model="tiny", messages=MSGS, max_tokens=8, seed=2).choices[0].message.content
    b1 = chat(client, model="tiny-b", messages=MSGS, max_tokens=8, seed=2).choices[0].message.content
    assert a1 != b1  # other weights, other text

    def one(i: int) -> str:
        model = "tiny" if i % 2 == 0 else "tiny-b"
        return chat(client, model=model, messages=MSGS, max_tokens=8, seed=2).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(one, range(12)))
    assert outs == [a1 if i % 2 == 0 else b1 for i in range(12)]
    server.registry.remove("tiny-b")


def test_bad_inputs_get_openai_errors(server: ServerThread, client: openai.OpenAI) -> None:
    url = f"{server.base_url}/chat/completions"

    def post(content: bytes | str, status: int, param: str | None = None) -> dict:
        resp = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=60)
        assert resp.status_code == status, resp.text
        body = resp.json()
        validate("ErrorResponse", body)
        if param is not None:
            assert body["error"]["param"] == param
        return body

    post("{broken", 400)
    post("", 400)
    post("[]", 400)
    post(json.dumps({"model": "tiny", "messages": "hello"}), 400, "messages")
    post(json.dumps({"model": "tiny"}), 400, "messages")
    post(json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": -1}), 400, "max_tokens")
    post(json.dumps({"model": "tiny", "messages": MSGS, "temperature": "hot"}), 400, "temperature")
    post(json.dumps({"model": "tiny", "messages": MSGS, "n": 0}), 400, "n")
    post('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400)
    unknown = post(json.dumps({"model": "nope", "messages": MSGS}), 404, "model")
    assert unknown["error"]["code"] == "model_not_found"
    long_prompt = [{"role": "user", "content": "word " * 2000}]
    too_long = post(json.dumps({"model": "tiny", "messages": long_prompt}), 400, "messages")
    assert too_long["error"]["code"] == "context_length_exceeded"
    comp_url = url.replace("/chat/completions", "/completions")
    too_long = httpx.post(comp_url, json={"model": "tiny", "prompt": "word " * 2000}, timeout=60).json()
    assert too_long["error"]["code"] == "context_length_exceeded" and too_long["error"]["param"] == "prompt"
    # far beyond the context: refused from its length, before a template renders or a token is counted
    # (5 MB of text held the event loop for seconds while it was tokenized)
    huge = "word " * 1_000_000
    for endpoint, body, param in ((url, {"messages": [{"role": "user", "content": huge}]}, "messages"),
                                  (comp_url, {"prompt": huge}, "prompt"),
                                  (comp_url, {"prompt": [1] * 513}, "prompt")):
        answer = httpx.post(endpoint, json={"model": "tiny", **body}, timeout=60).json()
        assert answer["error"]["code"] == "context_length_exceeded" and answer["error"]["param"] == param
        assert "characters" in answer["error"]["message"] or "513 tokens" in answer["error"]["message"]
    # more tokens than the context has left is clamped (real clients do this all the time)
    clamped = httpx.post(url, json={"model": "tiny", "messages": MSGS, "max_tokens": 100000, "seed": 1,
                                    "logit_bias": KEEP_TALKING}, timeout=120)
    assert clamped.status_code == 200
    usage = clamped.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 512
    assert clamped.json()["choices"][0]["finish_reason"] == "length"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MSGS)
    # still serving
    assert chat(client, model="tiny", messages=MSGS, max_tokens=2).choices[0].message.content is not None


def test_health_and_metrics(server: ServerThread, client: openai.OpenAI) -> None:
    chat(client, model="tiny", messages=MSGS, max_tokens=2)
    health = httpx.get(f"{server.root}/health").json()
    assert health["status"] == "ok" and "tiny:latest" in health["loaded"]
    tiny = next(m for m in health["models"] if m["model"] == "tiny:latest")
    assert tiny["batching"] == "continuous" and tiny["max_batch"] >= 2
    assert tiny["batching_summary"] == f"continuous batching ({tiny['max_batch']})"
    text = httpx.get(f"{server.root}/metrics").text
    for name in ("exllama_tray_requests_running", "exllama_tray_requests_waiting", "exllama_tray_prompt_tokens_total",
                 "exllama_tray_generation_tokens_total", "exllama_tray_time_to_first_token_seconds_bucket",
                 "exllama_tray_time_per_output_token_seconds_bucket"):
        assert name in text
    assert server.metric("exllama_tray_generation_tokens_total") > 0


def test_recent_requests_show_where_the_first_token_time_went(server: ServerThread, client: openai.OpenAI) -> None:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 6, "temperature": 0, "logit_bias": KEEP_TALKING}
    _, streamed = stream_chat(server, body)
    chat(client, **body)
    records = httpx.get(f"{server.root}/admin/requests").json()["data"]
    stream_rec, whole_rec = records[-2], records[-1]
    assert streamed and stream_rec["completion_tokens"] == whole_rec["completion_tokens"] == 6
    for rec in (stream_rec, whole_rec):
        assert rec["model"] == "tiny:latest" and rec["finish_reason"] == "length"
        assert 0 <= rec["queued_s"] <= rec["ttft_s"]
        assert rec["first_step_s"] >= 0
    # the stream's consumer told the GPU thread it had sent the first text; a whole answer has no hand-off
    assert stream_rec["handoff_s"] is not None and 0 <= stream_rec["handoff_s"] < 60
    assert whole_rec["handoff_s"] is None
