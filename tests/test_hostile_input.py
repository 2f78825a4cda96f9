"""Property-based fuzzing of every endpoint: hostile bodies and headers get a 4xx OpenAI-style error
(or a valid answer), never a 500 and never a hang; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers.servers import Servers

CASES = 1000
ENDPOINTS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
             ("GET", "/v1/models/{fuzz}"), ("POST", "/admin/load"), ("POST", "/admin/unload"), ("GET", "/health"),
             ("GET", "/metrics"), ("POST", "/chat/completions")]


@pytest.fixture(scope="module")
def server(serve_module: Servers):
    srv = serve_module(models={"tiny": {"context_length": 256, "max_tokens": 2}})
    with httpx.Client(base_url=srv.root, timeout=30) as client:
        yield srv, client


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50),
    st.sampled_from(["tiny", "system", "user", "assistant", "tool", "", "\x00", "\ud7ff", "😀" * 5]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=25)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "stream_options", "stop",
          "temperature", "top_p", "top_k", "min_p", "seed", "n", "logit_bias", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "tools", "suffix", "echo", "logprobs", "user", "response_format"]
plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny:latest", "nope", ""])},
    optional={f: json_values for f in FIELDS[1:]} | {
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bad", 1]),
                                                    "content": json_values}), max_size=3),
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=10**12), json_values),
    },
)


def raw_bodies() -> st.SearchStrategy[bytes]:
    encoded = st.one_of(json_values, plausible).map(lambda v: json.dumps(v).encode())
    return st.one_of(
        encoded,
        st.binary(max_size=300),  # invalid UTF-8 and garbage
        st.just(b""),
        st.just(b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
        st.just(b'{"model": "tiny", "prompt": "x", "max_tokens": Infinity}'),
        st.integers(min_value=50, max_value=5000).map(lambda d: b"[" * d + b"]" * d),  # deep nesting
        st.integers(min_value=50, max_value=20000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
        st.just(json.dumps({"model": "tiny", "prompt": "x" * 1_000_000, "max_tokens": 1}).encode()),
        st.just(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "é" * 600_000}]}).encode()),
        st.just(json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**100}).encode()),
        st.just(b'\xff\xfe{"model": "tiny"}'),
    )


headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=latin-1", ""]),
    "Authorization": st.sampled_from(["Bearer", "Bearer x", "Basic abc", "Bearer " + "k" * 5000]),
    "X-Api-Key": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    "Accept": st.sampled_from(["*/*", "text/event-stream", "application/xml"]),
})


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("method, path", ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
def test_fuzz_endpoint(server, method: str, path: str) -> None:
    srv, client = server

    @settings(max_examples=CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
    @given(body=raw_bodies(), hdrs=headers, fuzz=st.text(min_size=1, max_size=40).filter(lambda t: "/" not in t))
    def one(body: bytes, hdrs: dict, fuzz: str) -> None:
        from urllib.parse import quote

        url = path.replace("{fuzz}", quote(fuzz, safe="") or "x")
        resp = client.request(method, url, content=body if method == "POST" else None, headers=hdrs)
        check(resp)

    one()
    # still serving afterwards
    ok = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def test_body_size_limit(server) -> None:
    srv, client = server
    big = b'{"model": "tiny", "prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    resp = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["message"] == "Request body too large"


def test_wrong_methods_and_paths(server) -> None:
    srv, client = server
    for method, path, status in [("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v2/whatever", 404), ("POST", "/v1/embeddings", 404)]:
        resp = client.request(method, path)
        assert resp.status_code == status
        check(resp)


# -- malformed tool schemas against a model whose calls are parsed by their schema (qwen3_coder) ---------
QWEN_CALL = "<tool_call>\n<function=f>\n<parameter=n>\n2\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture(scope="module")
def qwen_server(serve_module: Servers):
    from tests.helpers.scripted_backend import scripted_factory

    srv = serve_module(models={"tiny-qwen": {"context_length": 2048, "tool_format": "qwen3_coder"}},
                       backend_factory=scripted_factory)
    with httpx.Client(base_url=srv.root, timeout=30) as client:
        yield srv, client


property_schemas = st.one_of(json_scalars, json_values, st.dictionaries(st.sampled_from(["type", "items"]),
                                                                       json_values, max_size=2))
tool_schemas = st.one_of(
    json_values, st.dictionaries(st.sampled_from(["type", "properties", "required"]), json_values, max_size=3),
    st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.just("n"), property_schemas)}))
named_tools = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.just("f"), "parameters": tool_schemas})})
hostile_tools = st.one_of(st.lists(named_tools, min_size=1, max_size=2),
                          st.lists(st.one_of(json_values, named_tools, st.fixed_dictionaries(
                              {"type": st.just("function"), "function": json_values})), min_size=1, max_size=3))


def test_fuzz_tool_schemas_on_a_qwen3_coder_model(qwen_server) -> None:
    from tests.helpers.scripted_backend import say

    srv, client = qwen_server

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(tools=hostile_tools, stream=st.booleans())
    @example(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": "number"}}}}],
             stream=False)
    def one(tools: list, stream: bool) -> None:
        body = {"model": "tiny-qwen", "messages": [{"role": "user", "content": say(QWEN_CALL)}], "tools": tools,
                "stream": stream}
        resp = client.post("/v1/chat/completions", json=body)
        check(resp)
        if resp.status_code == 200 and stream:
            assert resp.text.rstrip().endswith("data: [DONE]") and '"error"' not in resp.text, resp.text[-300:]

    one()


def test_a_property_schema_that_is_not_an_object_is_a_400_naming_it(qwen_server) -> None:
    srv, client = qwen_server
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "properties": {"n": "number"}}}}]
    resp = client.post("/v1/chat/completions", json={"model": "tiny-qwen", "tools": tools,
                                                      "messages": [{"role": "user", "content": "x"}]})
    check(resp)
    assert resp.status_code == 400
    assert "tools[0].function.parameters.properties.n must be a JSON schema object" in resp.json()["error"]["message"]
