"""Tool-call parsers per format, on outputs written as those models write them: one call, parallel
calls, text then a call, each split across stream chunks at every character, and malformed calls
(kept as content, never an error)."""

from __future__ import annotations

import json
import re

import pytest

from app.engine.tools import ParsedToolCall, ToolCallStream, detect_tool_format, parse_tool_calls
from app.engine.tools.validate import check_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
PARIS = ParsedToolCall("get_weather", json.dumps({"city": "Paris", "days": 3}))
ROME = ParsedToolCall("get_weather", json.dumps({"city": "Rome", "days": 1}))
ZURICH = ParsedToolCall("get_weather", json.dumps({"city": "Z\u00fcrich \U0001f642", "days": 2}, ensure_ascii=False))

# (format, model output, content expected, calls expected)
RECORDED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
     "", [PARIS]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>',
     "", [PARIS, ROME]),
    ("hermes", 'Let me check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "days": 3}}\n</tool_call>', "Let me check the weather.", [PARIS]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", "", [PARIS]),
    ("qwen3_coder", "I will look both up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                    "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
                    "<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n1\n"
                    "</parameter>\n</function>\n</tool_call>", "I will look both up.", [PARIS, ROME]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', "", [PARIS]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]', "", [PARIS, ROME]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}', "", [PARIS]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris", "days": 3}'
                '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 1}', "", [PARIS, ROME]),
    # decoding leaves out the special [TOOL_CALLS] token: the bare array is still a call
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', " ", [PARIS]),
    ("mistral", 'Sure, checking.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
     "Sure, checking.", [PARIS]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', "", [PARIS]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', "", [PARIS]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
               '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}', "", [PARIS, ROME]),
    ("llama3", 'The weather tool needs a city.', "The weather tool needs a city.", []),
    # \\u escapes (models write the hex digits as tokens of their own): cut anywhere, still a call
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Z\\u00fcrich \\ud83d\\ude42", "days": 2}}', "",
     [ZURICH]),
]

MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("qwen3_coder", "<tool_call>\nnot a function at all\n</tool_call>"),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"'),
    ("llama3", '{"name": "get_weather", "parameters": "Paris"} and then some words'),
    ("llama3", '{"city": "Paris"}'),
]


def _split_feed(fmt: str, text: str, at: int) -> list:
    stream = ToolCallStream(fmt, [WEATHER])  # type: ignore[arg-type]
    return [*stream.feed(text[:at]), *stream.feed(text[at:]), *stream.finish()]


def _joined(pieces: list) -> tuple[str, list[ParsedToolCall]]:
    return "".join(p for p in pieces if isinstance(p, str)), [p for p in pieces if isinstance(p, ParsedToolCall)]


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_recorded_outputs_parse(fmt: str, text: str, content: str, calls: list) -> None:
    got_content, got_calls = parse_tool_calls(text, fmt, [WEATHER])  # type: ignore[arg-type]
    assert got_calls == calls
    assert got_content.strip() == content.strip()
    for call in got_calls:
        assert isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_split_at_every_character_gives_the_same(fmt: str, text: str, content: str, calls: list) -> None:
    whole = parse_tool_calls(text, fmt, [WEATHER])  # type: ignore[arg-type]
    for at in range(len(text) + 1):
        assert _joined(_split_feed(fmt, text, at)) == whole, f"split at {at}: {text[:at]!r} | {text[at:]!r}"


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_one_character_at_a_time(fmt: str, text: str, content: str, calls: list) -> None:
    stream = ToolCallStream(fmt, [WEATHER])  # type: ignore[arg-type]
    pieces = [p for ch in text for p in stream.feed(ch)] + stream.finish()
    assert _joined(pieces) == parse_tool_calls(text, fmt, [WEATHER])  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_malformed_call_stays_content(fmt: str, text: str) -> None:
    content, calls = parse_tool_calls(text, fmt)  # type: ignore[arg-type]
    assert calls == [] and content == text
    for at in range(0, len(text) + 1, 3):
        assert _joined(_split_feed(fmt, text, at)) == (text, [])


def test_content_streams_before_the_call_closes() -> None:
    stream = ToolCallStream("hermes")
    assert stream.feed("Checking now. <tool") == ["Checking now. "]  # only a possible marker is held
    assert stream.feed('_call>{"name": "f", "arguments": {}}') == []
    assert stream.feed("</tool_call>") == [ParsedToolCall("f", "{}")]
    assert stream.finish() == []


def test_an_almost_marker_is_given_back_as_text() -> None:
    stream = ToolCallStream("hermes")
    assert stream.feed("a <tool_c") == ["a "]
    assert stream.feed("hair") == ["<tool_chair"]


def test_qwen3_coder_values_follow_the_parameter_schema() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "zip": {"type": "string"}, "n": {"type": "number"}, "tags": {"type": "array"}}}}}
    text = "<tool_call>\n<function=f>\n<parameter=zip>\n01234\n</parameter>\n<parameter=n>\n2.5\n</parameter>\n" \
           '<parameter=tags>\n["a", "b"]\n</parameter>\n</function>\n</tool_call>'
    _, calls = parse_tool_calls(text, "qwen3_coder", [tool])
    assert json.loads(calls[0].arguments) == {"zip": "01234", "n": 2.5, "tags": ["a", "b"]}


@pytest.mark.parametrize("tools", [
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"n": "number"}}}}],
    [{"type": "function", "function": {"name": "f", "parameters": {"properties": ["n"]}}}],
    [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
    [{"type": "function", "function": "f"}], ["f"], [None],
])
def test_qwen3_coder_ignores_schema_parts_that_are_not_objects(tools: list) -> None:
    text = "<tool_call>\n<function=f>\n<parameter=n>\n2\n</parameter>\n</function>\n</tool_call>"
    _, calls = parse_tool_calls(text, "qwen3_coder", tools)
    assert json.loads(calls[0].arguments) == {"n": 2}  # as if the tool were unknown: JSON when it parses


@pytest.mark.parametrize("parameters, reason", [
    ({"type": "object", "properties": {"n": "number"}}, "properties.n must be a JSON schema object, not str"),
    ({"type": "object", "properties": ["n"]}, "properties must be an object"),
    ({"type": "object", "properties": {"n": {"type": 3}}}, "properties.n.type must be a type name"),
    ({"type": "object", "required": "n"}, "required must be a list"),
    ("object", "parameters must be a JSON schema object"),
])
def test_check_tools_refuses_malformed_parameter_schemas(parameters: object, reason: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    with pytest.raises(ValueError, match=re.escape(reason)) as caught:
        check_tools(tools, None)
    assert str(caught.value).startswith("tools[0].function.parameters")


def test_check_tools_takes_well_formed_schemas() -> None:
    check_tools([WEATHER, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"any": True, "x": {"type": ["string", "null"]}}, "required": ["x"]}}},
        {"type": "function", "function": {"name": "h"}}], {"type": "function", "function": {"name": "g"}})


@pytest.mark.parametrize("fmt", ["llama3", "mistral"])
@pytest.mark.parametrize("answer", ['{"answer": 42}', '[1, 2, 3]', '{"name": 3}', "{not json", '[{"a": true}]'])
def test_an_answer_that_opens_with_json_but_is_no_call_streams_as_content(fmt: str, answer: str) -> None:
    stream = ToolCallStream(fmt, [WEATHER])  # type: ignore[arg-type]
    pieces = [p for ch in answer for p in stream.feed(ch)]  # one character at a time, as a model writes
    assert "".join(pieces) == answer  # released once the value is complete (or cannot be JSON)
    assert stream.feed(" and then some words.") == [" and then some words."]
    assert stream.finish() == []


@pytest.mark.parametrize("fmt, call", [
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]'),
])
def test_a_bare_json_call_is_held_until_the_end(fmt: str, call: str) -> None:
    stream = ToolCallStream(fmt, [WEATHER])  # type: ignore[arg-type]
    assert [p for ch in call for p in stream.feed(ch)] == []
    assert stream.finish() == [PARIS]


def test_partial_scalars_keep_a_bare_call_open() -> None:
    stream = ToolCallStream("llama3", [WEATHER])
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3, "x": tru'
    assert stream.feed(text) == []
    assert stream.feed("e, \"y\": -") == [] and stream.feed("1}}") == []
    assert [c.name for c in stream.finish()] == ["get_weather"]


# -- formats read from templates ------------------------------------------------------------------
GO_TEMPLATES = {
    "hermes": '{{- range .Messages }}{{ if eq .Role "assistant" }}<|im_start|>assistant\n{{ if .Content }}'
              '{{ .Content }}{{- else if .ToolCalls }}<tool_call>\n{{ range .ToolCalls }}{"name": '
              '"{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}\n{{ end }}</tool_call>{{ end }}'
              '<|im_end|>{{ end }}{{ end }}',
    "llama3": '{{- range .Messages }}{{- if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>'
              '\n{{- if .ToolCalls }}\n{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": '
              '{{ .Function.Arguments }}}{{ end }}{{- else }}\n{{ .Content }}{{ end }}{{ end }}{{ end }}',
    "mistral": '{{- range .Messages }}{{- if eq .Role "assistant" }}{{- if .Content }} {{ .Content }}'
               '{{- else if .ToolCalls }}[TOOL_CALLS] [{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", '
               '"arguments": {{ .Function.Arguments }}}{{- end }}]{{- end }}</s>{{ end }}{{ end }}',
    "qwen3_coder": '{{- range .Messages }}{{ if .ToolCalls }}<tool_call>\n{{ range .ToolCalls }}<function='
                   '{{ .Function.Name }}>\n{{ range $k, $v := .Function.Arguments }}<parameter={{ $k }}>\n{{ $v }}'
                   '\n</parameter>\n{{ end }}</function>\n{{ end }}</tool_call>{{ end }}{{ end }}',
}
JINJA_TEMPLATES = {
    "hermes": "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
              "{{ c.function | tojson }}\n</tool_call>{% endfor %}{% endif %}{% endfor %}",
    "llama3": '{% for m in messages %}{% for c in m.tool_calls %}{{ \'{"name": "\' + c.function.name + '
              '\'", "parameters": \' }}{{ c.function.arguments | tojson }}}{% endfor %}{% endfor %}',
    "mistral": "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}{% endif %}"
               "{% endfor %}",
    "qwen3_coder": "{% for m in messages %}{% for c in m.tool_calls %}<tool_call>\n<function={{ c.function.name }}>"
                   "\n{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("fmt", sorted(GO_TEMPLATES))
def test_format_from_the_ollama_toolcalls_block(fmt: str) -> None:
    detect_tool_format.cache_clear()
    assert detect_tool_format(GO_TEMPLATES[fmt], go=True) == fmt


@pytest.mark.parametrize("fmt", sorted(JINJA_TEMPLATES))
def test_format_from_the_jinja_template(fmt: str) -> None:
    assert detect_tool_format(JINJA_TEMPLATES[fmt], go=False) == fmt


def test_a_template_without_tool_calls_gets_the_fallback() -> None:
    assert detect_tool_format("{{ .Prompt }}", go=True) == "hermes"
    assert detect_tool_format(None, go=False) == "hermes"


# -- any text at all ---------------------------------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

PIECES = st.sampled_from(["<tool_call>", "</tool_call>", "<function=f>", "<parameter=a>", "</parameter>",
                          "</function>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '{"name": "f", ',
                          '"arguments": {}}', "{", "}", "[", "]", '"', "\n", " ", "text", "é🙂"])
TEXTS = st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(["hermes", "qwen3_coder", "mistral", "llama3"]), text=TEXTS, at=st.integers(0, 200))
def test_any_text_parses_without_error_and_splits_alike(fmt: str, text: str, at: int) -> None:
    content, calls = parse_tool_calls(text, fmt)  # type: ignore[arg-type]
    if not calls:
        assert content == text  # nothing is lost when nothing is a call
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict) and call.name
    assert _joined(_split_feed(fmt, text, min(at, len(text)))) == (content, calls)
