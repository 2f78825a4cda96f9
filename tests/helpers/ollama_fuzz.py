"""Hypothesis strategies for the Ollama API's hostile-input test: anything at any endpoint, and well-typed
bodies with hostile values, so that most of them reach the engine."""

from __future__ import annotations

import json

from hypothesis import strategies as st


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["tiny", "user", "assistant", "tool", "", "\x00", "5m", "-1", "0s", "1h30m", "{{ .Prompt }}",
                     "{{ range .Messages }}{{ .Content }}{{ end }}", "{{ if }}", "{{ template \"x\" }}"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
option_values = st.dictionaries(st.sampled_from(["num_predict", "temperature", "top_k", "top_p", "min_p", "seed",
                                                 "typical_p", "repeat_penalty", "presence_penalty", "stop",
                                                 "frequency_penalty", "num_ctx", "num_gpu", "mirostat"]),
                                st.one_of(st.integers(-3, 3), st.integers(), json_values), max_size=4)
#: never keep_alive 0 (each answer would unload the model and the next one load it again: slow, not hostile)
keep_alives = st.one_of(st.sampled_from(["5m", -1, "1h30m", "soon", "", 1e300, 10**40, "9" * 400 + "h", "0.5s",
                                         True, [], {}, "-3h", " 2m "]),
                        st.floats(min_value=0.001, allow_nan=False), st.text(max_size=8))
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bad", 1]), "content": json_values},
    optional={"tool_calls": json_values, "tool_name": json_values, "images": json_values}), max_size=3)
plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(["fuzz", "fuzz:latest", "nope", "", "../x"])},
    optional={"prompt": st.one_of(st.text(max_size=30), json_values), "messages": messages, "options": option_values,
              "keep_alive": keep_alives, "stream": st.one_of(st.booleans(), json_values),
              "suffix": st.one_of(st.text(max_size=20), json_values), "system": json_values, "raw": json_values,
              "template": json_values, "format": json_values, "context": json_values, "tools": json_values,
              "think": json_values, "images": json_values, "verbose": json_values, "name": json_values})
ENDPOINTS = [("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/show"), ("GET", "/api/tags"),
             ("GET", "/api/ps"), ("GET", "/api/version"), ("POST", "/api/pull"), ("POST", "/api/embed")]


# well-typed bodies with hostile values, so that most of them reach the engine
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", "\x00", "<fim_prefix>", "<|im_end|>", "😀" * 9]))
typed_options = st.fixed_dictionaries({}, optional={
    "num_predict": st.integers(0, 4), "temperature": st.floats(-1, 6), "top_k": st.integers(-1, 200),
    "top_p": st.floats(-0.5, 1.5), "min_p": st.floats(0, 1), "seed": st.integers(-5, 2**64),
    "repeat_penalty": st.floats(0, 3), "stop": st.one_of(texts, st.lists(texts, max_size=3)),
    "num_ctx": st.integers(-1, 10**6)})
templates = st.one_of(texts, st.sampled_from(["{{ .Prompt }}", "{{ .System }}{{ .Prompt }}", "{{ if }}", "{{ end }}",
                                              "{{ range .Messages }}{{ .Content }}{{ end }}", "{{ .Nope.Deeper }}",
                                              "{{ index .Messages 99 }}", "{{ slice .Prompt 5 1 }}", "{{"]))
typed_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]), "content": texts},
    optional={"tool_calls": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
        {"name": texts, "arguments": st.one_of(st.dictionaries(st.text(max_size=5), json_scalars), texts)})}),
        max_size=2), "tool_name": texts}), max_size=3)
formats = st.one_of(st.sampled_from(["json", "", "xml", {"type": "object"}, {"type": "nonsense"}, {"enum": []},
                                     {"type": "integer", "minimum": 5, "maximum": 1}, {"$ref": "#/nowhere"}]),
                    st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "pattern"]), json_values,
                                    max_size=3))
typed_generate = st.fixed_dictionaries({"model": st.just("fuzz"), "prompt": texts}, optional={
    "format": formats,
    "stream": st.booleans(), "suffix": texts, "system": texts, "raw": st.booleans(), "template": templates,
    "keep_alive": keep_alives, "options": typed_options})
#: tools that pass the validator, with hostile names and parameter schemas, so that they reach the template
well_formed_tools = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(min_size=1, max_size=12)}, optional={"description": texts, "parameters": st.fixed_dictionaries(
        {"type": st.just("object")}, optional={"properties": st.dictionaries(st.text(max_size=6), st.fixed_dictionaries(
            {}, optional={"type": st.sampled_from(["string", "integer", "object", "array", "nope"]),
                          "enum": st.lists(json_scalars, max_size=3)}), max_size=3),
            "required": st.lists(st.text(max_size=6), max_size=2)})})})
typed_chat = st.fixed_dictionaries({"model": st.just("fuzz"), "messages": typed_messages}, optional={
    "format": formats,
    "stream": st.booleans(), "keep_alive": keep_alives, "options": typed_options,
    "tools": st.lists(st.one_of(st.dictionaries(st.sampled_from(["type", "function"]), json_values, max_size=2),
                                well_formed_tools), max_size=2)})


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()


def _bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(st.one_of(plausible, json_values, typed_generate, typed_chat).map(_dumps),
                     st.binary(max_size=200), st.just(b""),
                     st.just(b'{"model": "tiny", "prompt": "x", "options": {"temperature": NaN}}'),
                     st.integers(min_value=50, max_value=3000).map(lambda d: b"[" * d + b"]" * d))


#: (endpoint, body): half of them well-typed generations, the rest anything at any endpoint
fuzzed_requests = st.one_of(st.tuples(st.just(("POST", "/api/generate")), typed_generate.map(_dumps)),
                            st.tuples(st.just(("POST", "/api/chat")), typed_chat.map(_dumps)),
                            st.tuples(st.sampled_from(ENDPOINTS), _bodies()))
