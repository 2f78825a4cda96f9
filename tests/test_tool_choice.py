"""tool_choice "required" and a named function with the real tiny model: the grammar makes the random
model write a call in its template's format (Hermes for the tiny ChatML template) whose arguments
validate against the tool's parameters; streamed deltas assemble into the same calls as the body."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.helpers.servers import Servers
from tests.openai_schema import validate
from tests.server_harness import ServerThread
from tests.test_tool_calls import assemble

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
LOOKUP = {"$defs": {"id": {"type": "string", "pattern": "^[a-z]{3}[0-9]{2}$"}}, "type": "object",
          "properties": {"ids": {"type": "array", "items": {"$ref": "#/$defs/id"}, "minItems": 1, "maxItems": 2}},
          "required": ["ids"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "parameters": LOOKUP}}]
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 1024},
                                "tiny-plain": {"context_length": 1024, "tool_format": "none"}}, max_loaded=2)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def request(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "use a tool"}], "tools": TOOLS,
            "max_tokens": 150, "seed": 4, **kw}


def check_calls(calls: list) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_gives_calls_that_validate(server: ServerThread, seed: int) -> None:
    resp = httpx.post(f"{server.base_url}/chat/completions", json=request(tool_choice="required", seed=seed),
                      timeout=120)
    body = resp.json()
    validate("CreateChatCompletionResponse", body)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    check_calls(body["choices"][0]["message"]["tool_calls"])


@pytest.mark.parametrize("name", ["get_weather", "lookup"])
def test_a_named_function_is_the_one_called(client: openai.OpenAI, name: str) -> None:
    out = client.chat.completions.create(**request(tool_choice={"type": "function", "function": {"name": name}}))
    calls = out.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == [name]
    check_calls([c.model_dump() for c in calls])
    assert out.choices[0].finish_reason == "tool_calls"


def test_required_without_parallel_calls_is_one_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(**request(tool_choice="required", parallel_tool_calls=False, seed=seed))
        assert len(out.choices[0].message.tool_calls) == 1


def test_streamed_calls_assemble_into_the_body_calls(server: ServerThread, client: openai.OpenAI) -> None:
    body = client.chat.completions.create(**request(tool_choice="required", seed=9)).choices[0].message
    chunks = []
    with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=120,
                      json=request(tool_choice="required", seed=9, stream=True)) as resp:
        for line in resp.iter_lines():
            if line and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                validate("CreateChatCompletionStreamResponse", chunks[-1])
    content, calls, reason = assemble(chunks)
    assert reason == "tool_calls" and not content.strip()
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in body.tool_calls]


def test_the_sdk_stream_helper_gets_the_named_call(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(**request(tool_choice={"type": "function",
                                                               "function": {"name": "get_weather"}})) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_is_parsed_when_the_model_has_no_tool_format(server: ServerThread, stream: bool) -> None:
    """``tool_format: none`` leaves free text unparsed, but a forced call is written in the fallback
    format by the grammar: it is parsed in that same format."""
    body = request(model="tiny-plain", tool_choice={"type": "function", "function": {"name": "get_weather"}},
                   stream=stream)
    if stream:
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as resp:
            lines = [line for line in resp.iter_lines() if line]
        _, calls, reason = assemble([json.loads(line[6:]) for line in lines[:-1]])
    else:
        choice = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120).json()["choices"][0]
        calls, reason = choice["message"].get("tool_calls"), choice["finish_reason"]
    assert reason == "tool_calls"
    check_calls(calls)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
