"""How model text becomes Ollama's ``message``: tool calls parsed out with their arguments as objects,
whole and streamed, for the formats whose parsers build arguments differently (JSON, XML parameters)."""

from __future__ import annotations

import pytest

from app.api.ollama.output import ChatOutput

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALLS = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
         "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"}
CALL = {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}


@pytest.mark.parametrize("fmt", sorted(CALLS))
def test_a_call_in_one_body(fmt: str) -> None:
    assert ChatOutput(fmt, TOOLS).whole("Let me look. " + CALLS[fmt]) == {
        "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}}


@pytest.mark.parametrize("fmt", sorted(CALLS))
def test_a_call_streamed_in_small_pieces(fmt: str) -> None:
    output, text = ChatOutput(fmt, TOOLS), "Hm. " + CALLS[fmt] + CALLS[fmt]
    parts = [p for i in range(0, len(text), 3) for p in output.feed(text[i:i + 3])] + output.finish()
    calls = [c for p in parts for c in p["message"].get("tool_calls", ())]
    assert calls == [CALL, {"function": {**CALL["function"], "index": 1}}]
    assert "".join(p["message"]["content"] for p in parts).strip() == "Hm."


def test_without_a_format_calls_stay_text() -> None:
    assert ChatOutput(None, None).whole(CALLS["hermes"]) == {
        "message": {"role": "assistant", "content": CALLS["hermes"]}}
