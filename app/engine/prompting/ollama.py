"""Build prompts with an Ollama Go template, with Ollama's rules for messages, system prompts and tools.

- A template that mentions ``.Messages`` gets the whole conversation at once (``.System`` is the
  system messages joined by blank lines, ``.Tools`` the tools).
- Any other template is Ollama's legacy form: it is expanded once per turn with ``.System``,
  ``.Prompt`` and ``.Response``, and the last turn is cut right after ``.Response``.
- The saved system prompt is used only when the conversation has no system message; the saved
  ``messages`` layer is put in front of the conversation.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Callable

from app.engine.prompting.gotemplate import (
    GoMap, GoStruct, GoTemplate, TemplateExecError, TemplateSyntaxError, go_json,
)
from app.engine.prompting.builders import ChatInput, PromptError, message_text


@lru_cache(maxsize=32)
def compile_template(source: str) -> GoTemplate:
    try:
        return GoTemplate(source)
    except TemplateSyntaxError as exc:
        raise PromptError(f"Ollama template: {exc}") from None


def _arguments(value: Any) -> GoMap:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {}
    if not isinstance(value, dict):
        value = {}
    return GoMap(dict(value), string=go_json(value))


def _tool_call(call: dict[str, Any], index: int) -> GoStruct:
    fn = call.get("function") or {}
    args = _arguments(fn.get("arguments"))
    fn_json: dict[str, Any] = {"name": fn.get("name", "")}
    if index:
        fn_json = {"index": index, **fn_json}
    fn_json["arguments"] = args.items
    function = GoStruct({"Index": index, "Name": fn.get("name", ""), "Arguments": args}, fn_json,
                        type_name="api.ToolCallFunction")
    return GoStruct({"ID": call.get("id") or "", "Function": function}, {"function": fn_json},
                    type_name="api.ToolCall")


def to_ollama_messages(messages: list[dict[str, Any]]) -> list[GoStruct]:
    """OpenAI-style message dicts -> Ollama api.Message values."""
    names_by_id: dict[str, str] = {}
    out = []
    for m in messages:
        role = m.get("role", "user")
        content = message_text(m.get("content"))
        calls = [_tool_call(c, i) for i, c in enumerate(m.get("tool_calls") or [])]
        for c in m.get("tool_calls") or []:
            if c.get("id"):
                names_by_id[c["id"]] = (c.get("function") or {}).get("name", "")
        tool_name = m.get("name") or names_by_id.get(m.get("tool_call_id") or "", "") if role == "tool" else ""
        js: dict[str, Any] = {"role": role, "content": content}
        if calls:
            js["tool_calls"] = [c.json_value for c in calls]
        if tool_name:
            js["tool_name"] = tool_name
        out.append(GoStruct({"Role": role, "Content": content, "Thinking": "", "Images": [],
                             "ToolCalls": calls, "ToolName": tool_name, "ToolCallID": m.get("tool_call_id") or ""},
                            js, type_name="api.Message"))
    return out


def _property(spec: dict[str, Any]) -> GoStruct:
    typ = spec.get("type", "")
    js = {k: v for k, v in spec.items()}
    return GoStruct({"Type": typ, "Items": spec.get("items"), "Description": spec.get("description", ""),
                     "Enum": spec.get("enum") or []}, js, type_name="api.ToolProperty")


def to_ollama_tools(tools: list[dict[str, Any]] | None) -> list[GoStruct]:
    out = []
    for tool in tools or []:
        fn = tool.get("function") or {}
        params = fn.get("parameters") or {}
        props = {name: _property(spec if isinstance(spec, dict) else {}) for name, spec in
                 (params.get("properties") or {}).items()}
        params_struct = GoStruct({"Type": params.get("type", "object"), "Defs": params.get("$defs"),
                                  "Items": params.get("items"), "Required": params.get("required") or [],
                                  "Properties": props},
                                 {"type": params.get("type", "object"), "required": params.get("required") or [],
                                  "properties": {k: v.json_value for k, v in props.items()}},
                                 type_name="api.ToolFunctionParameters")
        fn_json = {"name": fn.get("name", ""), "description": fn.get("description", ""),
                   "parameters": params_struct.json_value}
        function = GoStruct({"Name": fn.get("name", ""), "Description": fn.get("description", ""),
                             "Parameters": params_struct}, fn_json, type_name="api.ToolFunction")
        out.append(GoStruct({"Type": tool.get("type", "function"), "Items": None, "Function": function},
                            {"type": tool.get("type", "function"), "function": fn_json}, type_name="api.Tool"))
    return out


def render_ollama(template: GoTemplate, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> str:
    """Render ``messages`` the way Ollama does (messages mode or legacy turn-by-turn mode)."""
    msgs = to_ollama_messages(messages)
    system = "\n\n".join(m.fields["Content"] for m in msgs if m.fields["Role"] == "system")
    try:
        if "Messages" in template.identifiers():
            return template.render({"System": system, "Messages": msgs, "Tools": to_ollama_tools(tools),
                                    "Response": "", "Think": False, "ThinkLevel": "", "IsThinkSet": False})
        return _render_legacy(template, msgs)
    except TemplateExecError as exc:
        raise PromptError(f"Ollama template failed: {exc}") from None


def _render_legacy(template: GoTemplate, msgs: list[GoStruct]) -> str:
    if "Response" not in template.identifiers():
        template = template.with_response_appended()
    parts: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        parts.append(template.render(dict(turn)))
        turn.update(System="", Prompt="", Response="")

    for m in msgs:
        role, content = m.fields["Role"], m.fields["Content"]
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                flush()
            turn["System"] = content
        elif role == "user":
            if turn["Response"]:
                flush()
            turn["Prompt"] = content
        elif role == "assistant":
            turn["Response"] = content
    parts.append(template.cut_at_response().render(dict(turn)))
    return "".join(parts)


def fim_renderer(source: str) -> Callable[[str, str], str]:
    """Ollama's fill-in-the-middle form of a template (compiled once): ``(prompt, suffix) -> text``,
    the template rendered with ``.Prompt`` and ``.Suffix``."""
    template = compile_template(source)

    def render(prompt: str, suffix: str) -> str:
        try:
            return template.render({"Prompt": prompt, "Suffix": suffix, "Response": ""})
        except TemplateExecError as exc:
            raise PromptError(f"Ollama template failed: {exc}") from None

    return render


class OllamaPromptBuilder:
    def __init__(self, source: str, *, system_prompt: str | None = None,
                 prepend_messages: list[dict[str, Any]] | None = None) -> None:
        self.template = compile_template(source)
        self._system = system_prompt
        self._prepend = list(prepend_messages or [])
        self.stop_strings: list[str] = []

    def build(self, chat: ChatInput) -> str:
        messages = list(chat.messages)
        if self._system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self._system})
        return render_ollama(self.template, [*self._prepend, *messages], chat.tools)
