"""Choose the prompt builder for a model: Ollama template, the folder's Jinja template, or a custom one."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from app.engine.prompting.builders import JinjaPromptBuilder, PlainPromptBuilder, PromptBuilder, PromptError
from app.engine.catalog.registry import ModelEntry
from app.engine.settings.schema import ResolvedSettings
from app.engine.catalog.tokenizer import read_json, read_special_tokens

log = logging.getLogger(__name__)
_GO_ACTION = re.compile(r"\{\{-?\s*(\.|\$|range\b|if\b|with\b|template\b|/\*)")


def looks_like_go_template(text: str) -> bool:
    """Go templates use ``{{ .Field }}``; Jinja uses ``{% ... %}`` and bare names."""
    return "{%" not in text and bool(_GO_ACTION.search(text))


def template_source(entry: ModelEntry, settings: ResolvedSettings) -> str:
    """Which template a model uses: "ollama", "jinja", "custom" or "plain"."""
    choice = settings.template or "auto"
    has_ollama = entry.ollama is not None and bool(entry.ollama.template)
    has_jinja = read_special_tokens(Path(entry.model_dir)).chat_template is not None
    if choice == "custom":
        if not settings.custom_template:
            raise PromptError("template is set to 'custom' but no custom template was given")
        return "custom"
    if choice == "ollama":
        if not has_ollama:
            raise PromptError("template is set to 'ollama' but the model has no saved Ollama template")
        return "ollama"
    if choice == "jinja":
        if not has_jinja:
            raise PromptError("template is set to 'jinja' but the model folder has no chat_template")
        return "jinja"
    if has_ollama:
        return "ollama"
    return "jinja" if has_jinja else "plain"


def make_prompt_builder(entry: ModelEntry, settings: ResolvedSettings) -> PromptBuilder:
    source = template_source(entry, settings)
    system = settings.system_prompt or None
    special = read_special_tokens(Path(entry.model_dir))
    if source == "ollama":
        from app.engine.prompting.ollama import OllamaPromptBuilder

        assert entry.ollama is not None and entry.ollama.template
        return OllamaPromptBuilder(entry.ollama.template, system_prompt=system,
                                   prepend_messages=entry.ollama.messages)
    if source == "custom":
        text = settings.custom_template or ""
        if looks_like_go_template(text):
            from app.engine.prompting.ollama import OllamaPromptBuilder

            return OllamaPromptBuilder(text, system_prompt=system)
        return JinjaPromptBuilder(text, bos_token=special.bos_token, eos_token=special.eos_token,
                                  system_prompt=system)
    if source == "jinja":
        assert special.chat_template is not None
        return JinjaPromptBuilder(special.chat_template, bos_token=special.bos_token, eos_token=special.eos_token,
                                  system_prompt=system)
    return PlainPromptBuilder(system)


FIM_TOKEN_SETS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


def fill_in_middle_prompt(entry: ModelEntry, settings: ResolvedSettings, prompt: str, suffix: str) -> str | None:
    """The fill-in-the-middle prompt for ``prompt``/``suffix``, or None when the model has no FIM form."""
    if entry.ollama is not None and entry.ollama.template and ".Suffix" in entry.ollama.template:
        from app.engine.prompting.ollama import render_fim

        return render_fim(entry.ollama.template, prompt, suffix)
    vocab = _added_tokens(Path(entry.model_dir))
    for pre, suf, mid in FIM_TOKEN_SETS:
        if {pre, suf, mid} <= vocab:
            return f"{pre}{prompt}{suf}{suffix}{mid}"
    return None


def _added_tokens(folder: Path) -> set[str]:
    data = read_json(folder / "tokenizer.json")
    return {t.get("content") for t in data.get("added_tokens", []) if isinstance(t, dict)}
