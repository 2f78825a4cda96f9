"""logprobs / top_logprobs (chat), logprobs (completions) and n > 1, through the real server and the
openai SDK with the tiny model: shapes valid against OpenAI's schema, values from the backend's own
distribution after the sampling settings, streamed as in the body; n choices indexed, usage summed."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.helpers.scripted_backend import ScriptedBackend, say, scripted_factory
from tests.helpers.servers import Servers
from tests.helpers.tiny import KEEP_TALKING
from tests.openai_schema import validate, validate_completion_chunk
from tests.server_harness import ServerThread

MSGS = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    # the engine's own backend: the transformers backend in a model process, so the log-probabilities
    # cross its pipe as every user's do
    return serve_module(models={"tiny": {"context_length": 512}})


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def sse_chunks(server: ServerThread, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.base_url}/{path}", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        return [json.loads(line[6:]) for line in resp.iter_lines() if line and line != "data: [DONE]"]


def test_chat_logprobs_in_the_body(server: ServerThread) -> None:
    body = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": "tiny", "messages": MSGS, "max_tokens": 12, "temperature": 0, "logprobs": True,
        "top_logprobs": 3}).json()
    validate("CreateChatCompletionResponse", body)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in content) == body["choices"][0]["message"]["content"]
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 3
        assert t["top_logprobs"][0]["token"] == t["token"]  # greedy: the chosen token is the most likely
        assert t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])
        assert t["bytes"] == list(t["token"].encode())


def test_top_logprobs_follow_the_sampling_settings(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=1.0, seed=3,
                                         logprobs=True, top_logprobs=4, extra_body={"top_k": 2, "top_p": 1})
    for t in out.choices[0].logprobs.content:
        top = [a.logprob for a in t.top_logprobs]
        assert sum(math.exp(lp) for lp in top[:2]) == pytest.approx(1.0, abs=1e-4)  # only two can be drawn
        assert top[2:] == [-9999.0, -9999.0]
        assert min(abs(t.logprob - lp) for lp in top[:2]) < 1e-5  # the token drawn is one of the two


def test_streamed_chat_logprobs_match_the_body(server: ServerThread, client: openai.OpenAI) -> None:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 10, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = client.chat.completions.create(**body).choices[0].logprobs.content
    chunks = sse_chunks(server, "chat/completions", body)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    streamed = [t for c in chunks for ch in c["choices"] for t in (ch.get("logprobs") or {}).get("content") or []]
    assert [(t["token"], round(t["logprob"], 5)) for t in streamed] == \
        [(t.token, round(t.logprob, 5)) for t in whole]


def test_completion_logprobs_body_and_stream(server: ServerThread) -> None:
    req = {"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    body = httpx.post(f"{server.base_url}/completions", json=req, timeout=60).json()
    validate("CreateCompletionResponse", body)
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == body["usage"]["completion_tokens"]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in
               zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    chunks = sse_chunks(server, "completions", req)
    for chunk in chunks:
        validate_completion_chunk(chunk)
    streamed = [t for c in chunks for ch in c["choices"] for t in (ch["logprobs"] or {}).get("tokens", [])]
    offsets = [o for c in chunks for ch in c["choices"] for o in (ch["logprobs"] or {}).get("text_offset", [])]
    assert streamed == lp["tokens"] and offsets == lp["text_offset"]


def test_n_choices_are_indexed_and_usage_summed(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MSGS, n=3, max_tokens=6, seed=5)
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    out = raw.parse()
    assert [c.index for c in out.choices] == [0, 1, 2]
    one = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, seed=5)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens
    assert out.usage.completion_tokens == 3 * 6 and one.usage.completion_tokens == 6
    assert out.choices[0].message.content == one.choices[0].message.content  # choice i samples with seed + i
    assert len({c.message.content for c in out.choices}) > 1


def test_n_streams_every_choice(server: ServerThread) -> None:
    chunks = sse_chunks(server, "chat/completions", {"model": "tiny", "messages": MSGS, "n": 2, "max_tokens": 5,
                                                     "logit_bias": KEEP_TALKING,  # every choice runs to max_tokens
                                                     "stream_options": {"include_usage": True}})
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    ends = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert ends == {0: "length", 1: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_n_on_completions(server: ServerThread) -> None:
    body = httpx.post(f"{server.base_url}/completions", timeout=60, json={
        "model": "tiny", "prompt": "Hi", "n": 2, "max_tokens": 4, "logprobs": 0, "logit_bias": KEEP_TALKING}).json()
    validate("CreateCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 8
    assert all(len(c["logprobs"]["tokens"]) == 4 for c in body["choices"])


def test_top_logprobs_without_logprobs_is_a_400(server: ServerThread) -> None:
    resp = httpx.post(f"{server.base_url}/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": MSGS, "top_logprobs": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs"


# -- n > 1 choices share the batch --------------------------------------------------------------------------
class _BatchRecording(ScriptedBackend):
    """The scripted backend, keeping the largest batch any step ran."""

    widest = 0

    def step(self):  # type: ignore[no-untyped-def]
        events = super().step()
        self.widest = max(self.widest, len(events))
        return events


@pytest.fixture(scope="module")
def batch_server(serve_module: Servers) -> tuple[ServerThread, list[_BatchRecording]]:
    made: list[_BatchRecording] = []

    def factory(entry, settings):  # type: ignore[no-untyped-def]
        made.append(_BatchRecording(entry.model_dir, context_length=settings.context_length, tokens_per_step=1))
        return made[-1]

    return serve_module(models={"tiny": {"context_length": 2048}}, backend_factory=factory), made


@pytest.mark.parametrize("path, body", [
    ("chat/completions", {"messages": [{"role": "user", "content": say("one two three four five six seven")}]}),
    ("completions", {"prompt": say("one two three four five six seven")}),
])
def test_non_streaming_n_choices_run_in_one_batch(batch_server, path: str, body: dict) -> None:
    server, made = batch_server
    resp = httpx.post(f"{server.base_url}/{path}", timeout=60, json={"model": "tiny", "n": 4, **body})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 4
    backend = made[-1]
    assert backend.widest == 4  # one after another, no step would have had more than one job
    backend.widest = 0


def test_merged_choices_end_when_a_job_cannot_start(serve: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """The model's runner stops between the submit and the first event (as at an unload): every choice
    still finishes, with the reason, and the merge ends instead of waiting for ever."""
    import asyncio

    from app.api.openai.choices import merged
    from app.engine.facade import ChatRequest, JobFinished, Message, Settings

    caplog.allowed_errors = True  # the runner's refusal is logged with its traceback
    server = serve(models={"tiny": {"context_length": 2048}}, backend_factory=scripted_factory)

    async def scenario() -> list:
        engine = server.engine
        request = ChatRequest(model="tiny", messages=[Message("user", say("hello there"))], settings=Settings())
        handles = [await engine.submit_chat(request) for _ in range(2)]
        runner = engine.manager.resident(engine.prepared.get("tiny").key).runner
        await asyncio.to_thread(runner.stop)
        return [event async for event in merged(handles)]

    events = server.call(asyncio.wait_for(scenario(), 10), timeout=30)
    assert sorted(i for i, e in events) == [0, 1]
    assert all(isinstance(e, JobFinished) and e.finish_reason == "error" and "unloading" in e.error
               for _, e in events)


def test_logprob_bytes_are_the_tokens_own_where_the_backend_gives_them() -> None:
    """A byte-fallback token (one byte of a multi-byte character) decodes to U+FFFD alone: its bytes on
    the wire are its own byte, from the backend's id-to-bytes map, not the replacement character's."""
    from app.api.openai.choices import chat_logprobs
    from app.engine.events import token_logprobs

    pieces = {10: b"\xe2", 11: b"\x82", 12: b"\xac", 13: b"a"}  # the euro sign, as three byte tokens
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace")  # noqa: E731
    items = token_logprobs([10, 11, 12], [0.5, 1.0, 1.0], [[10, 13]] * 3, [[0.5, 0.25]] * 3, decode,
                           raw=pieces.__getitem__)
    content = chat_logprobs(items, 2)["content"]
    assert [t["token"] for t in content] == ["\ufffd"] * 3
    assert b"".join(bytes(t["bytes"]) for t in content).decode() == "€"
    assert [a["bytes"] for a in content[0]["top_logprobs"]] == [[0xE2], [0x61]]
    without = chat_logprobs(token_logprobs([13], [1.0], [], [], decode), 0)["content"]
    assert without[0]["bytes"] == [0x61] and without[0]["top_logprobs"] == []
