"""Which tool-call format a model writes, read from its prompt template.

An Ollama (Go) template renders an assistant's earlier calls in its ``{{ if .ToolCalls }}`` block: the
text that opens that block is what the model writes to start a call (as Ollama itself finds it). A
Jinja template is recognised by the markers it renders: ``<tool_call>`` (Hermes, Qwen),
``<function=`` (Qwen3-coder), ``[TOOL_CALLS]`` (Mistral), ``<|python_tag|>`` or a JSON object with
``"parameters"`` (Llama 3.1). The ``tool_format`` model setting overrides what is found.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from app.engine.catalog.registry import ModelEntry
    from app.engine.catalog.tokenizer import SpecialTokens
    from app.engine.prepared import PreparedModel
    from app.engine.settings.schema import Settings
    from app.engine.settings.layers import EffectiveSettings

ToolFormat = Literal["hermes", "qwen3_coder", "mistral", "llama3"]
TOOL_FORMATS: tuple[str, ...] = ("hermes", "qwen3_coder", "mistral", "llama3")
#: when a template shows no tool-call format: the most common one among open models
FALLBACK: ToolFormat = "hermes"
_GO_TOOLCALLS = re.compile(r"\{\{-?\s*(?:else\s+)?if\s+\.ToolCalls\s*-?\}\}(?P<rest>.*)", re.S)
_GO_ACTION = re.compile(r"\{\{-?(?P<body>.*?)-?\}\}", re.S)


def _classify(text: str) -> ToolFormat | None:
    if "<function=" in text:
        return "qwen3_coder"
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or '"parameters"' in text:
        return "llama3"
    return None


def go_block_opening(template: str) -> str | None:
    """The literal text that opens the template's ``.ToolCalls`` block (through its ``range``), or None."""
    match = _GO_TOOLCALLS.search(template)
    if match is None:
        return None
    rest, out = match.group("rest"), []
    pos = 0
    while True:
        action = _GO_ACTION.search(rest, pos)
        literal = rest[pos:action.start()] if action else rest[pos:]
        out.append(literal)
        if action is None or "range" not in action.group("body") and ".Function" not in action.group("body"):
            break
        if ".Function" in action.group("body"):  # the call itself: keep a placeholder for its name
            out.append("NAME")
        pos = action.end()
        if len("".join(out)) > 400:
            break
    return "".join(out)


@lru_cache(maxsize=64)
def detect_tool_format(template: str | None, *, go: bool) -> ToolFormat:
    """The format a model with this template writes its tool calls in."""
    if not template:
        return FALLBACK
    if go:
        opening = go_block_opening(template)
        if opening is not None:
            found = _classify(opening)
            if found is None and opening.lstrip().startswith("{"):
                found = "llama3"  # bare JSON objects, as Llama 3.1's Ollama template renders them
            if found is not None:
                return found
    return _classify(template) or FALLBACK


def format_for_model(entry: "ModelEntry", settings: "EffectiveSettings", special: "SpecialTokens",
                     setting_value: str | None) -> ToolFormat | None:
    """The model's tool-call format: its ``tool_format`` setting, else read from the template it uses;
    None when the setting is ``none`` (calls are left as text)."""
    if setting_value == "none":
        return None
    if setting_value in TOOL_FORMATS:
        return setting_value  # type: ignore[return-value]
    from app.engine.prompting.builders import PromptError
    from app.engine.prompting.select import looks_like_go_template, template_source

    try:
        source = template_source(entry, settings, special)
    except PromptError:
        return FALLBACK
    if source == "ollama" and entry.ollama is not None:
        return detect_tool_format(entry.ollama.template, go=True)
    if source == "custom":
        text = settings.custom_template
        return detect_tool_format(text, go=looks_like_go_template(text))
    return detect_tool_format(special.chat_template, go=False)


def format_for_prepared(prepared: "PreparedModel", request: "Settings") -> ToolFormat | None:
    """:func:`format_for_model` for a prepared model and a request's settings layer."""
    resolved = prepared.resolve(request)
    return format_for_model(prepared.entry, resolved.effective, prepared.special, resolved.values.get("tool_format"))
