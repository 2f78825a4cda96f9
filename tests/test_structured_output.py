"""Structured output from the tiny random-weight model through the real server and openai SDK: the
grammar makes every answer that ends by itself parse and validate against its schema; max_tokens may
cut one (finish_reason "length"). Bad schemas are a 400 with the grammar engine's reason."""

from __future__ import annotations

import json
import threading
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers.servers import Servers
from tests.openai_schema import validate, validate_completion_chunk
from tests.server_harness import ServerThread

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}
#: name -> schema: nested objects, arrays with bounds, enums, anyOf, $ref, patterns, number ranges
SCHEMAS = {
    "nested": {"type": "object", "properties": {"user": PERSON, "team": {
        "type": "object", "properties": {"id": {"type": "integer"}, "lead": PERSON},
        "required": ["id", "lead"], "additionalProperties": False}},
        "required": ["user", "team"], "additionalProperties": False},
    "bounded_array": {"type": "object", "properties": {"scores": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4}},
        "required": ["scores"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "L"]}},
              "required": ["color", "size"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer", "minimum": 10, "maximum": 20}, {"type": "boolean"}, {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False},
    "ref": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                "required": ["x", "y"], "additionalProperties": False}},
            "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["code", "zip"], "additionalProperties": False},
    "number_ranges": {"type": "object", "properties": {
        "percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "delta": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 5},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["percent", "delta", "ratio"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "const_and_bool": {"type": "object", "properties": {"version": {"const": 2}, "ok": {"type": "boolean"},
                                                        "note": {"type": ["string", "null"], "maxLength": 6}},
                       "required": ["version", "ok", "note"], "additionalProperties": False},
    "top_level_array": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 5},
    "optional_fields": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                         "label": {"type": "string", "maxLength": 5}},
                        "required": ["id"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 1024}})


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "answer in JSON"}], max_tokens=200, seed=7,
        response_format=json_schema_format(schema))  # type: ignore[arg-type]
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # bounded schemas end well before 200
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_several_seeds_all_validate(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], seed=seed,
                                             max_tokens=120, temperature=1.5,
                                             response_format=json_schema_format(SCHEMAS["nested"]))  # type: ignore
        if out.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMAS["nested"])
        else:
            assert out.choices[0].finish_reason == "length"


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "a pet"}],
                                        response_format=Pet, max_tokens=100, seed=3)
    pet = out.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "fish") and 0 <= pet.age <= 30


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    # the random model would ramble in a string for ever: a bias towards '"' and '}' lets it close
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}], seed=1,
                                         max_tokens=200, response_format={"type": "json_object"},
                                         logit_bias={"10": 6, "101": 6})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_completions_honour_response_format(server: ServerThread) -> None:
    schema = SCHEMAS["enums"]
    resp = httpx.post(f"{server.base_url}/completions", timeout=60, json={
        "model": "tiny", "prompt": "Colour and size:", "max_tokens": 60, "seed": 2,
        "response_format": json_schema_format(schema)})
    body = resp.json()
    validate("CreateCompletionResponse", body)
    jsonschema.validate(json.loads(body["choices"][0]["text"]), schema)


def test_a_streamed_constrained_answer_validates(server: ServerThread) -> None:
    schema = SCHEMAS["array_of_objects"]
    with httpx.stream("POST", f"{server.base_url}/completions", timeout=60, json={
            "model": "tiny", "prompt": "Items:", "max_tokens": 150, "seed": 5, "stream": True,
            "response_format": json_schema_format(schema)}) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line and line != "data: [DONE]"]
    for chunk in chunks:
        validate_completion_chunk(chunk)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_constrained_and_free_jobs_share_the_batch(client: openai.OpenAI) -> None:
    results: dict[str, object] = {}

    def run(key: str, **kw: object) -> None:
        results[key] = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": key}],
                                                      seed=11, **kw)  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=("free",), kwargs={"max_tokens": 60}),
               threading.Thread(target=run, args=("json",), kwargs={
                   "max_tokens": 150, "response_format": json_schema_format(SCHEMAS["pattern"])})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    free, constrained = results["free"], results["json"]
    assert free.usage.completion_tokens > 0  # type: ignore[attr-defined]
    jsonschema.validate(json.loads(constrained.choices[0].message.content), SCHEMAS["pattern"])  # type: ignore


@pytest.mark.parametrize("fmt,reason", [
    (json_schema_format({"type": "wat"}), "Invalid type"),
    (json_schema_format({"type": "string", "format": "no-such-format"}, strict=True), "format"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_invalid_schemas_are_a_400_with_the_reason(client: openai.OpenAI, fmt: dict, reason: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format=fmt)  # type: ignore[arg-type]
    assert caught.value.status_code == 400 and reason in caught.value.message
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]


def test_a_keyword_it_cannot_enforce_is_ignored_unless_strict(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format", "maxLength": 4}},
              "required": ["d"], "additionalProperties": False}
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=60,
                                         seed=1, response_format=json_schema_format(schema, strict=False))
    assert len(json.loads(out.choices[0].message.content)["d"]) <= 4


def test_a_schema_the_grammar_engine_panics_on_is_a_400(client: openai.OpenAI) -> None:
    """llguidance 1.9 panics (a pyo3 PanicException, no Exception) cutting a non-ASCII message at byte 100."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format=json_schema_format({"pattern": [{"\u00eb" * 60: False}]}))
    assert "grammar engine failed" in caught.value.message


# -- a job the backend refuses because of the request is a 400, not a 500 ------------------------------------
JSON_OBJECT = {"type": "json_object"}


def test_a_grammar_on_a_model_without_tokenizer_json_is_a_400(serve: Servers, tiny_model_dir, tmp_path) -> None:
    import shutil

    from tests.helpers.scripted_backend import scripted_factory

    folder = tmp_path / "no-tokenizer-json"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.json").unlink()
    server = serve(model_dir=folder, models={"tiny": {"context_length": 1024}}, backend_factory=scripted_factory)
    resp = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": JSON_OBJECT})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "response_format" and "tokenizer.json" in error["message"]
    resp = httpx.post(f"{server.base_url}/completions", timeout=60, json={  # completions too, before any load
        "model": "tiny", "prompt": "x", "response_format": JSON_OBJECT})
    assert resp.status_code == 400 and "tokenizer.json" in resp.json()["error"]["message"], resp.text
    assert httpx.get(f"{server.root}/health", timeout=10).json()["loaded"] == []


def _refusing_factory(entry, settings):  # type: ignore[no-untyped-def]
    """The scripted backend, refusing every grammar as the request's fault (as a backend does whose
    grammar engine cannot compile it against the model's vocabulary)."""
    from app.engine.events import StepEvent
    from tests.helpers.scripted_backend import ScriptedBackend

    class Refusing(ScriptedBackend):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self.refused: list[StepEvent] = []

        def submit(self, job):  # type: ignore[no-untyped-def]
            if job.grammar is None:
                return super().submit(job)
            self.refused.append(StepEvent(job.job_id, "", 0, True, "error", "constraint: not this vocabulary",
                                          error_kind="request"))

        def has_work(self) -> bool:
            return bool(self.refused) or super().has_work()

        def step(self):  # type: ignore[no-untyped-def]
            out, self.refused = list(self.refused), []
            return out + super().step()

    return Refusing(entry.model_dir, context_length=settings.context_length)


@pytest.fixture(scope="module")
def refusing_server(serve_module: Servers) -> ServerThread:
    return serve_module(models={"tiny": {"context_length": 1024}}, backend_factory=_refusing_factory)


def test_a_request_fault_in_the_backend_is_a_400(refusing_server: ServerThread) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": JSON_OBJECT}
    resp = httpx.post(f"{refusing_server.base_url}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == "constraint: not this vocabulary"
    resp = httpx.post(f"{refusing_server.base_url}/chat/completions", json={**body, "n": 3}, timeout=60)
    assert resp.status_code == 400, resp.text  # every choice refused: one answer, the others cancelled
    resp = httpx.post(f"{refusing_server.base_url}/completions", timeout=60,
                      json={"model": "tiny", "prompt": "x", "response_format": JSON_OBJECT})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    with httpx.stream("POST", f"{refusing_server.base_url}/chat/completions", json={**body, "stream": True},
                      timeout=60) as streamed:
        lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["type"] == "invalid_request_error"
    # Ollama's API too: a one-body answer is a 400 with Ollama's error shape
    resp = httpx.post(f"{refusing_server.root}/api/chat", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "format": "json", "stream": False})
    assert resp.status_code == 400 and resp.json() == {"error": "constraint: not this vocabulary"}, resp.text


def test_n_choices_build_their_grammar_once(server: ServerThread) -> None:
    import uuid

    from app.engine.constraints.requested import GRAMMARS

    schema = {"type": "object", "properties": {"id": {"const": uuid.uuid4().hex}}, "required": ["id"]}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}
    hits, misses = GRAMMARS.hits, GRAMMARS.misses
    resp = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert (GRAMMARS.misses - misses, GRAMMARS.hits - hits) == (1, 2)  # built for the first, reused twice
    assert all(json.loads(c["message"]["content"]) == {"id": schema["properties"]["id"]["const"]}
               for c in resp.json()["choices"] if c["finish_reason"] == "stop")
