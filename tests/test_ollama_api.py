"""End to end: the official ``ollama`` Python client against the real server on loopback (tiny CPU model);
every response is checked against the shapes Ollama documents (tests/helpers/ollama_shapes.py). The tests
that start servers of their own (Ollama's port, access control, Continue CLI) are in test_ollama_api_servers.py."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest
from hypothesis import HealthCheck, given, settings

from app.api.ollama.output import GenerateOutput
from app.engine.catalog.tokenizer import FolderTokenizer
from tests.helpers.ollama_fuzz import fuzzed_requests
from tests.helpers.ollama_shapes import check, check_stream
from tests.helpers.scripted_backend import say, scripted_factory
from tests.helpers.servers import Servers
from tests.helpers.tiny import MESSAGES
from tests.helpers.waiting import wait_until
from tests.server_harness import ServerThread

#: greedy decoding: the tiny random model never ends on its own within a few hundred tokens, so a
#: request runs to its token limit and the limit in force can be read off eval_count
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> ServerThread:
    # "capped" has a model setting of 6 new tokens, to show a request's num_predict over it, and no tool calls
    # "fuzz": a short context, so that a fuzzed request without a limit ends soon
    return serve_module(models={"tiny": {"context_length": 512, "max_tokens": 8},
                                "capped": {"context_length": 512, "max_tokens": 6, "tool_format": "none"},
                                "fuzz": {"context_length": 96, "max_tokens": 2}})


@pytest.fixture(scope="module")
def client(server: ServerThread) -> ollama.Client:
    return ollama.Client(host=server.root, timeout=120)


def stream_lines(server: ServerThread, path: str, body: dict) -> list[dict]:
    """A streamed answer read line by line over raw HTTP, so that each object can be checked."""
    with httpx.stream("POST", f"{server.root}{path}", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in resp.iter_lines() if line]


def test_version_tags_and_show(client: ollama.Client, server: ServerThread) -> None:
    check("version", httpx.get(f"{server.root}/api/version").json())
    listed = check("tags", httpx.get(f"{server.root}/api/tags").json())
    assert sorted(m["name"] for m in listed["models"]) == ["capped:latest", "fuzz:latest", "tiny:latest"]
    assert all(m["size"] > 0 and m["details"]["family"] == "llama" for m in listed["models"])
    assert sorted(m.model for m in client.list().models) == ["capped:latest", "fuzz:latest", "tiny:latest"]
    shown = check("show", httpx.post(f"{server.root}/api/show", json={"model": "tiny"}).json())
    assert shown["model_info"]["llama.context_length"] == 512
    assert "insert" in shown["capabilities"]  # the tiny model has FIM tokens
    assert "tools" in shown["capabilities"] and "tools" not in httpx.post(  # capped's tool_format is "none"
        f"{server.root}/api/show", json={"model": "capped"}).json()["capabilities"]
    assert "num_ctx" in shown["parameters"] and "num_predict" in shown["parameters"]
    assert client.show("tiny:latest").modelinfo["general.architecture"] == "llama"
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404 and "nope" in err.value.error


def test_chat_stream_equals_non_stream(client: ollama.Client, server: ServerThread) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "options": {"seed": 7, "temperature": 0.9, "num_predict": 5}}
    whole = check("chat_final", httpx.post(f"{server.root}/api/chat", json={**body, "stream": False},
                                           timeout=60).json())
    assert whole["eval_count"] <= 5 and whole["prompt_eval_count"] > 5
    assert whole["done_reason"] in ("stop", "length")
    assert whole["total_duration"] >= whole["prompt_eval_duration"] + whole["eval_duration"] > 0
    lines = check_stream("chat", stream_lines(server, "/api/chat", body))
    assert "".join(line["message"]["content"] for line in lines) == whole["message"]["content"]
    assert lines[-1]["eval_count"] == whole["eval_count"]
    streamed = "".join(part.message.content or "" for part in client.chat(
        model="tiny", messages=MESSAGES, stream=True, options=body["options"]))
    assert streamed == whole["message"]["content"]
    answer = client.chat(model="tiny", messages=MESSAGES, options=body["options"])
    assert answer.message.role == "assistant" and answer.message.content == whole["message"]["content"]


def test_generate_with_suffix_is_fill_in_the_middle(client: ollama.Client, server: ServerThread,
                                                    tiny_model_dir: Path) -> None:
    tok = FolderTokenizer(tiny_model_dir)
    expected = tok.encode("<fim_prefix>def add(a, b):<fim_suffix>\n    return c<fim_middle>")
    body = {"model": "tiny", "prompt": "def add(a, b):", "suffix": "\n    return c", "options": {"num_predict": 2}}
    whole = check("generate_final", httpx.post(f"{server.root}/api/generate", json={**body, "stream": False},
                                               timeout=60).json())
    assert whole["prompt_eval_count"] == len(expected)
    lines = check_stream("generate", stream_lines(server, "/api/generate", body))
    assert lines[-1]["prompt_eval_count"] == len(expected)
    assert client.generate(**body).prompt_eval_count == len(expected)


def test_generate_templated_raw_and_system(client: ollama.Client, tiny_model_dir: Path) -> None:
    tok = FolderTokenizer(tiny_model_dir)
    raw = client.generate(model="tiny", prompt="<|im_start|>user\nhi", raw=True, options={"num_predict": 1})
    assert raw.prompt_eval_count == len(tok.encode("<|im_start|>user\nhi"))
    templated = client.generate(model="tiny", prompt="hi", options={"num_predict": 1})
    assert templated.prompt_eval_count > raw.prompt_eval_count  # the chat template around the prompt
    with_system = client.generate(model="tiny", prompt="hi", system="You are terse.", options={"num_predict": 1})
    assert with_system.prompt_eval_count > templated.prompt_eval_count
    own = client.generate(model="tiny", prompt="hi", template="Q: {{ .Prompt }}\nA:", options={"num_predict": 1})
    assert own.prompt_eval_count == len(tok.encode("Q: hi\nA:", add_bos=False))


def test_options_over_model_settings(client: ollama.Client) -> None:
    # no option: the model's own setting (6 for "capped"); num_predict wins over it, both ways
    assert client.generate(model="capped", prompt="hi", options=GREEDY).eval_count == 6
    capped = client.generate(model="capped", prompt="hi", options={**GREEDY, "num_predict": 3})
    assert capped.eval_count == 3 and capped.done_reason == "length"
    assert client.generate(model="capped", prompt="hi", options={**GREEDY, "num_predict": 9}).eval_count == 9
    # seeds: the same seed samples the same text, the stop option ends it
    once = client.generate(model="tiny", prompt="hi", options={"seed": 3, "temperature": 1.0, "num_predict": 6})
    again = client.generate(model="tiny", prompt="hi", options={"seed": 3, "temperature": 1.0, "num_predict": 6})
    assert once.response == again.response
    greedy = client.generate(model="tiny", prompt="hi", options={**GREEDY, "num_predict": 8}).response
    stop = greedy[2:4]
    stopped = client.generate(model="tiny", prompt="hi", options={**GREEDY, "num_predict": 8, "stop": [stop]})
    assert stopped.done_reason == "stop" and stop not in stopped.response
    assert greedy.startswith(stopped.response)


def test_bad_options_are_400(server: ServerThread) -> None:
    for options in ({"temperature": "hot"}, {"num_predict": 1.5}, {"top_p": 7}, {"stop": [1]}):
        resp = httpx.post(f"{server.root}/api/generate", json={"model": "tiny", "prompt": "x", "options": options})
        assert resp.status_code == 400, options
        check("error", resp.json())
    # options this app has no use for are ignored, as Ollama ignores them
    ok = httpx.post(f"{server.root}/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                                          "options": {"num_gpu": 1, "num_thread": 4, "num_predict": 1,
                                                                      "mirostat": 2, "num_ctx": 256}},
                    timeout=60)
    assert ok.status_code == 200 and check("generate_final", ok.json())["eval_count"] == 1


def test_load_keep_alive_and_unload(client: ollama.Client, server: ServerThread) -> None:
    def loaded() -> list[str]:
        return [m["name"] for m in check("ps", httpx.get(f"{server.root}/api/ps").json())["models"]]

    loading = check("generate_load", client.generate(model="tiny", keep_alive="1h30m").model_dump(exclude_none=True))
    assert loading["done_reason"] == "load" and loaded() == ["tiny:latest"]
    [model] = client.ps().models
    assert timedelta(hours=1, minutes=29) < model.expires_at - datetime.now(timezone.utc) <= timedelta(hours=1.5)
    client.generate(model="tiny", keep_alive=-1)  # negative: kept loaded
    assert client.ps().models[0].expires_at - datetime.now(timezone.utc) > timedelta(days=365)
    unloading = check("generate_load", client.generate(model="tiny", keep_alive=0).model_dump(exclude_none=True))
    assert unloading["done_reason"] == "unload" and loaded() == []
    # keep_alive 0 on a real request: answered, then unloaded
    answer = client.chat(model="tiny", messages=MESSAGES, keep_alive=0, options={"num_predict": 2})
    assert answer.done and answer.eval_count >= 1
    assert wait_until(lambda: loaded() == [], timeout=30)
    chat_load = httpx.post(f"{server.root}/api/chat", json={"model": "tiny", "messages": []}, timeout=60).json()
    assert check("chat_load", chat_load)["done_reason"] == "load" and loaded() == ["tiny:latest"]
    chat_unload = httpx.post(f"{server.root}/api/chat", json={"model": "tiny", "messages": [], "keep_alive": "0s"})
    assert check("chat_load", chat_unload.json())["done_reason"] == "unload" and loaded() == []


def test_what_this_app_does_not_do_is_said(server: ServerThread) -> None:
    cases = [("POST", "/api/pull", {"model": "llama3.2"}, 501, "pull"),
             ("POST", "/api/push", {"model": "x"}, 501, "push"),
             ("POST", "/api/create", {"model": "x", "from": "tiny"}, 501, "creat"),
             ("POST", "/api/copy", {"source": "tiny", "destination": "y"}, 501, "copy"),
             ("DELETE", "/api/delete", {"model": "tiny"}, 501, "delet"),
             ("POST", "/api/embed", {"model": "tiny", "input": "x"}, 501, "embedding"),
             ("POST", "/api/embeddings", {"model": "tiny", "prompt": "x"}, 501, "embedding"),
             ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x",
                                                                   "images": ["aGk="]}]}, 400, "images"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "format": "xml"}, 400, "format"),
             ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "format": {"type": "nonsense"}}, 400,
              "format"),
             ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "think": True}, 400, "think"),
             ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "tools": [{"function": "x"}]}, 400,
              "tools[0]"),
             ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "tools": [
                 {"type": "function", "function": {"name": "f", "parameters": "zz"}}]}, 400, "parameters"),
             ("POST", "/api/chat", {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function", "function": {
                 "name": "f", "parameters": {"type": "object", "properties": {"a": 5}}}}]}, 400, "properties.a"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 2]}, 400, "context"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "system": "s"}, 400, "raw"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y", "system": "s"}, 400,
              "suffix cannot be combined with system"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y", "system": "s",
                                        "template": "{{ .Prompt }}"}, 400, "with template, system"),
             ("POST", "/api/generate", {"model": "nope", "prompt": "x"}, 404, "nope"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": "x", "keep_alive": "soon"}, 400, "keep_alive"),
             ("POST", "/api/generate", {"model": "tiny", "prompt": 5}, 400, "prompt"),
             ("POST", "/api/show", {}, 400, "model"),
             ("GET", "/api/chat", None, 405, "GET"),
             ("POST", "/api/nothing", {}, 404, "/api/nothing")]
    for method, path, body, status, words in cases:
        resp = httpx.request(method, f"{server.root}{path}", json=body, timeout=30)
        assert resp.status_code == status, (path, body, resp.text)
        assert words in check("error", resp.json())["error"], (path, resp.text)
    resp = httpx.post(f"{server.root}/api/chat", content=b"{not json", timeout=30)
    assert resp.status_code == 400 and check("error", resp.json())
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=server.root).pull("llama3.2")
    assert err.value.status_code == 501


def test_client_leaving_a_stream_cancels_its_job(server: ServerThread) -> None:
    def idle() -> bool:
        return all(s.active_jobs == 0 for s in server.engine.model_states())

    body = {"model": "tiny", "prompt": "hi", "options": {**GREEDY, "num_predict": 400}}
    with httpx.stream("POST", f"{server.root}/api/generate", json=body, timeout=60) as resp:
        first = json.loads(next(resp.iter_lines()))
        check("generate_chunk", first)
    assert wait_until(idle, timeout=30)
    # one body (stream false): the client giving up while its job runs cancels the job too
    data = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        assert wait_until(lambda: not idle(), timeout=30)
    assert wait_until(idle, timeout=10)
    assert [r.finish_reason for r in server.engine.recent_requests()[-2:]] == ["cancelled", "cancelled"]
    after = httpx.post(f"{server.root}/api/generate", json={**body, "stream": False,
                                                            "options": {"num_predict": 1}}, timeout=60)
    assert after.status_code == 200 and check("generate_final", after.json())


def test_a_failure_mid_stream_ends_the_stream_with_an_error_line(client: ollama.Client, server: ServerThread,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.allowed_errors = True  # the failure is logged with its traceback
    # a fault injected into the answer's output after its first chunk: the stream has begun (200 sent)
    feed, calls = GenerateOutput.feed, []

    def failing_feed(self: GenerateOutput, text: str) -> list[dict]:
        calls.append(text)
        if len(calls) > 1:
            raise RuntimeError("injected fault")
        return feed(self, text)

    monkeypatch.setattr(GenerateOutput, "feed", failing_feed)
    body = {"model": "tiny", "prompt": "hi", "options": {**GREEDY, "num_predict": 6}}
    lines = stream_lines(server, "/api/generate", body)
    check("generate_chunk", lines[0])
    assert list(lines[-1]) == ["error"] and "internal server error" in lines[-1]["error"], lines
    calls.clear()
    with pytest.raises(ollama.ResponseError) as err:  # Ollama's client reads it as Ollama's mid-stream error
        list(client.generate(stream=True, **body))
    assert "internal server error" in err.value.error
    assert wait_until(lambda: all(s.active_jobs == 0 for s in server.engine.model_states()), timeout=30)
    monkeypatch.undo()
    assert client.generate(model="tiny", prompt="hi", options={"num_predict": 1}).done
    failures = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert len(failures) == 2 and all("stream of job" in r.getMessage() for r in failures)


def test_request_body_limit(server: ServerThread) -> None:
    big = b'{"model": "tiny", "prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    resp = httpx.post(f"{server.root}/api/generate", content=big, timeout=60)
    assert resp.status_code == 413 and check("error", resp.json())


# -- hostile input: fuzzed bodies never 500, the server keeps serving -------------------------------
# (the strategies: tests/helpers/ollama_fuzz.py)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(request=fuzzed_requests)
def test_fuzzed_bodies_never_500(server: ServerThread, request: tuple[tuple[str, str], bytes]) -> None:
    (method, path), body = request
    with httpx.Client(base_url=server.root, timeout=60) as http:
        resp = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code < 500 or (resp.status_code == 501 and path in ("/api/pull", "/api/embed")), \
            (path, body[:300], resp.text[:300])
        if resp.status_code >= 400:
            check("error", resp.json())
        elif resp.headers["content-type"].startswith("application/x-ndjson"):
            objects = [json.loads(line) for line in resp.text.splitlines() if line]
            assert objects and "error" not in objects[-1], (body[:300], objects[-1:])


def test_a_schema_the_grammar_engine_once_panicked_on_is_a_400(server: ServerThread) -> None:
    # llguidance panicked cutting its (non-ASCII) error text at byte 100: the connection dropped
    schema = {"pattern": [{"\u00eb" * 60: False}]}
    resp = httpx.post(f"{server.root}/api/generate", json={"model": "fuzz", "prompt": "x", "format": schema,
                                                           "stream": False}, timeout=30)
    assert resp.status_code == 400 and "format" in check("error", resp.json())["error"]


def test_still_serving_after_the_fuzz(client: ollama.Client) -> None:
    assert client.generate(model="tiny", prompt="hi", options={"num_predict": 2}).done


# -- structured outputs and tool calls ----------------------------------------------------------------
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 30}},
       "required": ["kind", "age"], "additionalProperties": False}


def test_format_schema_is_enforced(client: ollama.Client, server: ServerThread) -> None:
    chat = client.chat(model="tiny", messages=[{"role": "user", "content": "a pet"}], format=PET,
                       options={"seed": 7, "num_predict": 120})
    assert chat.done_reason == "stop", chat.message.content
    jsonschema.validate(json.loads(chat.message.content), PET)
    lines = check_stream("generate", stream_lines(server, "/api/generate", {
        "model": "tiny", "prompt": "Pet:", "raw": True, "format": PET, "options": {"seed": 2, "num_predict": 120}}))
    assert lines[-1]["done_reason"] == "stop"
    jsonschema.validate(json.loads("".join(line["response"] for line in lines)), PET)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}},
                                               "required": ["city"]}}}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def scripted(serve_module: Servers) -> ServerThread:
    """The scripted backend says what the prompt asks (a random model never writes a tool call)."""
    return serve_module(models={"tiny": {"context_length": 2048}}, backend_factory=scripted_factory)


def test_tool_calls_in_chat(scripted: ServerThread) -> None:
    client = ollama.Client(host=scripted.root, timeout=60)
    messages = [{"role": "user", "content": say("Let me look. " + HERMES_CALL)}]
    whole = client.chat(model="tiny", messages=messages, tools=TOOLS)
    assert whole.message.content == "Let me look." and whole.done_reason == "stop"
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris", "days": 3}
    raw = check("chat_final", httpx.post(f"{scripted.root}/api/chat", timeout=60, json={
        "model": "tiny", "messages": messages, "tools": TOOLS, "stream": False}).json())
    assert raw["message"]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 3}
    lines = check_stream("chat", stream_lines(scripted, "/api/chat", {"model": "tiny", "messages": messages,
                                                                       "tools": TOOLS}))
    calls = [c for line in lines for c in line["message"].get("tool_calls", ())]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert "<tool_call>" not in "".join(line["message"]["content"] for line in lines)
    # without tools the same text is content, and the call's result goes back as a tool message
    plain = client.chat(model="tiny", messages=messages)
    assert "<tool_call>" in plain.message.content and not plain.message.tool_calls
    history = [*messages, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
               {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
               {"role": "user", "content": say("It is 11 degrees.")}]
    assert client.chat(model="tiny", messages=history, tools=TOOLS).message.content == "It is 11 degrees."
