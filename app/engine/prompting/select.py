"""Choose the prompt builder for a model: Ollama template, the folder's Jinja template, or a custom one."""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Protocol

from app.engine.prompting.builders import JinjaPromptBuilder, PlainPromptBuilder, PromptBuilder, PromptError
from app.engine.catalog.registry import ModelEntry
from app.engine.settings.layers import EffectiveSettings
from app.engine.catalog.tokenizer import SpecialTokens, read_json, read_special_tokens

log = logging.getLogger(__name__)
_GO_ACTION = re.compile(r"\{\{-?\s*(\.|\$|range\b|if\b|with\b|template\b|/\*)")


def looks_like_go_template(text: str) -> bool:
    """Go templates use ``{{ .Field }}``; Jinja uses ``{% ... %}`` and bare names."""
    return "{%" not in text and bool(_GO_ACTION.search(text))


def template_source(entry: ModelEntry, settings: EffectiveSettings, special: SpecialTokens | None = None) -> str:
    """Which template a model uses: "ollama", "jinja", "custom" or "plain". ``special``: the folder's
    tokenizer_config.json, when the caller has read it already."""
    choice = settings.template
    has_ollama = entry.ollama is not None and bool(entry.ollama.template)
    if special is None:
        special = read_special_tokens(Path(entry.model_dir))
    has_jinja = special.chat_template is not None
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


def make_prompt_builder(entry: ModelEntry, settings: EffectiveSettings,
                        special: SpecialTokens | None = None) -> PromptBuilder:
    if special is None:
        special = read_special_tokens(Path(entry.model_dir))
    source = template_source(entry, settings, special)
    system = settings.system_prompt or None
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


class FillInMiddle(Protocol):
    """A model's fill-in-the-middle form: ``prompt`` and ``suffix`` -> the prompt the model sees."""

    def __call__(self, prompt: str, suffix: str) -> str: ...


def fill_in_middle_form(entry: ModelEntry) -> FillInMiddle | None:
    """How the model fills in the middle (its Ollama template's ``.Suffix`` form, or the folder's FIM
    tokens), or None when it cannot. Reads tokenizer.json: build it once per model, not per request."""
    if entry.ollama is not None and entry.ollama.template and ".Suffix" in entry.ollama.template:
        from app.engine.prompting.ollama import fim_renderer

        return fim_renderer(entry.ollama.template)
    vocab = _added_tokens(Path(entry.model_dir))
    for pre, suf, mid in FIM_TOKEN_SETS:
        if {pre, suf, mid} <= vocab:
            return partial(_fim_tokens, pre, suf, mid)
    return None


def _fim_tokens(pre: str, suf: str, mid: str, prompt: str, suffix: str) -> str:
    return f"{pre}{prompt}{suf}{suffix}{mid}"


def _added_tokens(folder: Path) -> set[str]:
    data = read_json(folder / "tokenizer.json")
    return {t.get("content") for t in data.get("added_tokens", []) if isinstance(t, dict)}
