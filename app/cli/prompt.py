"""``python -m app prompt``: print the exact prompt a chat request would produce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.engine.catalog.registry import Registry
from app.engine.prompting.builders import ChatInput, JinjaPromptBuilder, PromptBuilder, PromptError
from app.engine.prompting.select import looks_like_go_template, make_prompt_builder
from app.engine.settings.layers import layers_for


def load_messages(path: Path) -> ChatInput:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PromptError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PromptError(f"{path} is not valid JSON: {exc}") from None
    tools = None
    if isinstance(data, dict):
        tools = data.get("tools")
        data = data.get("messages")
    if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m for m in data):
        raise PromptError(f"{path} must hold a list of {{role, content}} messages (or {{messages, tools}})")
    return ChatInput(data, tools)


def render_prompt_for_cli(registry: Registry, model: str | None, template_file: Path | None,
                          messages_file: Path) -> str:
    chat = load_messages(messages_file)
    builder: PromptBuilder
    if model is not None:
        key, entry = registry.find(model) or (None, None)
        if entry is None:
            raise PromptError(f"model {model!r} is not registered in {registry.path}")
        builder = make_prompt_builder(entry, layers_for(entry).resolve().effective)
    else:
        assert template_file is not None
        try:
            text = template_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise PromptError(f"cannot read {template_file}: {exc.strerror or exc}") from None
        if looks_like_go_template(text):
            from app.engine.prompting.ollama import OllamaPromptBuilder

            builder = OllamaPromptBuilder(text)
        else:
            builder = JinjaPromptBuilder(text)
    return builder.build(chat)
