"""Tool calls through the real server and the real openai SDK: the model's text (replayed by the
scripted backend in the model's own format, since a random model never writes a call) is parsed into
``tool_calls``, streamed as ``delta.tool_calls``, and checked against OpenAI's schema."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.helpers.scripted_backend import say, scripted_factory
from tests.helpers.servers import Servers
from tests.openai_schema import validate
from tests.server_harness import ServerThread

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}},
                                               "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
HERMES_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
HERMES_TWO = HERMES_ONE + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 2048},
                                "tiny-mistral": {"context_length": 2048, "tool_format": "mistral"},
                                "tiny-plain": {"context_length": 2048, "tool_format": "none"}},
                        backend_factory=scripted_factory, max_loaded=3)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def body_of(server: ServerThread, **kw) -> dict:
    resp = httpx.post(f"{server.base_url}/chat/completions", json=kw, timeout=60)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    validate("CreateChatCompletionResponse", data)
    return data


def stream_of(server: ServerThread, **kw) -> list[dict]:
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json={**kw, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    return chunks


def assemble(chunks: list[dict]) -> tuple[str, list[dict], str | None]:
    """Content, calls (by index) and finish reason, as a client puts stream deltas together."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for part in delta.get("tool_calls") or []:
                call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
                call["id"] = part.get("id") or call["id"]
                fn = part.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            reason = choice.get("finish_reason") or reason
    return content, [calls[i] for i in sorted(calls)], reason


def ask(text: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": say(text)}], "tools": TOOLS, **kw}


def test_one_call_in_the_body(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(**ask(HERMES_ONE))
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}


def test_parallel_calls_and_text_before_them(server: ServerThread) -> None:
    data = body_of(server, **ask("Let me look.\n" + HERMES_TWO))
    message = data["choices"][0]["message"]
    assert message["content"] == "Let me look."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    assert data["choices"][0]["finish_reason"] == "tool_calls"


def test_parallel_tool_calls_false_keeps_the_first(server: ServerThread) -> None:
    data = body_of(server, **ask(HERMES_TWO, parallel_tool_calls=False))
    assert [c["function"]["name"] for c in data["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


def test_streamed_deltas_assemble_into_the_body_calls(server: ServerThread) -> None:
    text = "Checking both.\n" + HERMES_TWO
    body = body_of(server, **ask(text))["choices"][0]
    chunks = stream_of(server, **ask(text))
    content, calls, reason = assemble(chunks)
    assert reason == "tool_calls" and content.strip() == body["message"]["content"]
    strip = [{**c, "id": None} for c in calls]
    assert strip == [{**c, "id": None} for c in body["message"]["tool_calls"]]
    assert [d["index"] for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []] == [0, 1]


def test_the_openai_sdk_stream_helper_assembles_the_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(**ask(HERMES_TWO)) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments)["city"] == "Paris"
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_malformed_call_stays_content(server: ServerThread) -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>'
    data = body_of(server, **ask(bad))
    assert data["choices"][0]["message"]["content"] == bad
    assert "tool_calls" not in data["choices"][0]["message"]
    assert data["choices"][0]["finish_reason"] == "stop"
    content, calls, reason = assemble(stream_of(server, **ask(bad)))
    assert (content, calls, reason) == (bad, [], "stop")


def test_tool_choice_none_and_no_tools_leave_text_alone(server: ServerThread) -> None:
    data = body_of(server, **ask(HERMES_ONE, tool_choice="none"))
    assert data["choices"][0]["message"]["content"] == HERMES_ONE
    no_tools = ask(HERMES_ONE)
    del no_tools["tools"]
    assert body_of(server, **no_tools)["choices"][0]["message"]["content"] == HERMES_ONE


def test_the_tool_format_setting_overrides_the_template(server: ServerThread) -> None:
    text = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'
    data = body_of(server, **{**ask(text), "model": "tiny-mistral"})
    assert data["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    plain = body_of(server, **{**ask(HERMES_ONE), "model": "tiny-plain"})
    assert plain["choices"][0]["message"]["content"] == HERMES_ONE


def test_a_tool_loop_round_trip_renders_calls_and_results(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(**ask(HERMES_ONE))
    call = first.choices[0].message.tool_calls[0]
    second = client.chat.completions.create(model="tiny", tools=TOOLS, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        {"role": "user", "content": say("It is 21 degrees in Paris.")}])
    assert second.choices[0].message.content == "It is 21 degrees in Paris."
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("bad,reason", [
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
    ({"tools": [{"type": "retrieval"}]}, "type 'function'"),
])
def test_bad_tools_are_a_400_with_the_reason(server: ServerThread, bad: dict, reason: str) -> None:
    resp = httpx.post(f"{server.base_url}/chat/completions", json={**ask("x"), **bad}, timeout=30)
    assert resp.status_code == 400
    validate("ErrorResponse", resp.json())
    assert reason in resp.json()["error"]["message"]


def test_a_json_answer_streams_as_it_comes_on_a_bare_json_format(server: ServerThread) -> None:
    """Mistral's (and Llama 3.1's) calls may open the output bare: an answer that opens with JSON but is
    no call is given out once its value is complete, not held to the end."""
    text = '{"answer": 42} is what the numbers say, and here are many more words to stream after it.'
    chunks = stream_of(server, **{**ask(text), "model": "tiny-mistral"})
    content, calls, reason = assemble(chunks)
    assert content == text and calls == [] and reason == "stop"
    with_content = [c for c in chunks for ch in c["choices"] if ch["delta"].get("content")]
    assert len(with_content) > 3  # pieces as they come; held back, it would be one delta at the end
