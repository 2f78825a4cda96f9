"""Ollama's own golden outputs for its templates, rendered by our Go-template renderer byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.engine.prompting.gotemplate import GoTemplate, TemplateSyntaxError
from app.engine.prompting.ollama import OllamaPromptBuilder, render_ollama
from app.engine.prompting.builders import ChatInput

CONF = Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "ollama-templates"


def _cases(name: str) -> list[dict]:
    path = CONF / name
    if not path.is_file():
        return []
    return json.loads(path.read_text())["cases"]


NAMED = _cases("named-templates.json")
LEGACY = _cases("legacy-and-messages.json")
skip_no_data = pytest.mark.skipif(not NAMED or not LEGACY, reason=f"conformance data not found in {CONF}")


@skip_no_data
@pytest.mark.parametrize("case", NAMED, ids=[f"{c['template_name']}/{c['case']}" for c in NAMED])
def test_named_templates_match_ollama(case: dict) -> None:
    out = render_ollama(GoTemplate(case["template"]), case["messages"])
    if case["strip_one_trailing_space_from_output"] and out.endswith(" "):
        out = out[:-1]
    assert out == case["expected"]


@skip_no_data
@pytest.mark.parametrize("case", LEGACY, ids=[c["name"] for c in LEGACY])
def test_legacy_and_messages_templates_match_ollama(case: dict) -> None:
    assert render_ollama(GoTemplate(case["template"]), case["messages"]) == case["expected"]


def test_go_template_language_features() -> None:
    src = (
        '{{- /* a comment */ -}}\n'
        '{{- $n := len .Messages }}{{ range $i, $m := .Messages }}'
        '{{- if and (eq $m.Role "user") (lt $i 5) }}U{{ $i }}:{{ .Content }}'
        '{{- else if or (eq .Role "assistant") false }} A:{{ .Content | printf "%q" }}'
        '{{- else }} ?{{ end }}'
        '{{- if eq (len (slice $.Messages $i)) 1 }} last{{ end }}{{ end }}'
        ' n={{ $n }} {{ with .System }}sys={{ . }}{{ else }}nosys{{ end }}'
        ' {{ index .Messages 0 "Role" | print }}{{ range .Empty }}x{{ else }} empty{{ end }}'
        ' {{ range $k, $v := .Map }}{{ $k }}={{ $v }};{{ end }}'
        ' {{ range .Messages }}{{ if eq .Role "assistant" }}{{ break }}{{ end }}{{ .Role }},{{ end }}'
        ' {{ json .Map }} {{ printf "%d-%s-%v" 3 "a" true }} {{ not "" }} {{ ne 1 2 }}'
    )
    data = {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": 'say "x"'},
                         {"Role": "user", "Content": "bye"}],
            "System": "", "Empty": [], "Map": {"b": 2, "a": "<1>"}}
    assert GoTemplate(src).render(data) == (
        'U0:hi A:"say \\"x\\""U2:bye last n=3 nosys user empty a=<1>;b=2; user,'
        ' {"a":"\\u003c1\\u003e","b":2} 3-a-true true true')


@pytest.mark.parametrize("src, line, col", [
    ("hello\n{{ if .X }}", 2, 12),
    ("{{ .X | }}", 1, 9),
    ("a\nb {{ end }}", 2, 6),
    ('{{ "unterminated }}', 1, 4),
    ("{{ .X ) }}", 1, 7),
])
def test_parse_errors_name_line_and_column(src: str, line: int, col: int) -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        GoTemplate(src)
    assert (info.value.line, info.value.col) == (line, col)
    assert f"line {line}, column {col}" in str(info.value)


def test_system_prompt_only_when_conversation_has_none_and_message_layers_first() -> None:
    src = "{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}"
    builder = OllamaPromptBuilder(src, system_prompt="SAVED",
                                  prepend_messages=[{"role": "user", "content": "example"}])
    assert builder.build(ChatInput([{"role": "user", "content": "q"}])) == \
        "<user>example<system>SAVED<user>q"
    assert builder.build(ChatInput([{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}])) == \
        "<user>example<system>mine<user>q"


def test_tools_and_tool_calls_reach_the_template() -> None:
    src = ('{{ if .Tools }}[TOOLS]{{ range .Tools }}{{ .Function.Name }}:{{ json .Function.Parameters }};{{ end }}'
           '{{ end }}{{ range .Messages }}{{ if .ToolCalls }}{{ range .ToolCalls }}CALL {{ .Function.Name }}'
           '{{ .Function.Arguments }}{{ end }}{{ else if eq .Role "tool" }}RESULT({{ .ToolName }}) {{ .Content }}'
           '{{ else }}{{ .Role }}: {{ .Content }}{{ end }}|{{ end }}')
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string", "description": "c"}}}}}]
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = render_ollama(GoTemplate(src), messages, tools)
    assert out == ('[TOOLS]get_weather:{"properties":{"city":{"description":"c","type":"string"}},'
                   '"required":["city"],"type":"object"};user: weather?|CALL get_weather{"city":"Paris"}|'
                   'RESULT(get_weather) sunny|')
