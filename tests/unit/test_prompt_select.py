"""Choosing a model's prompt form (app/engine/prompting/select.py), on tiny folders written by each test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from app.engine.catalog.registry import ModelEntry, OllamaMetadata
from app.engine.prompting.builders import ChatInput, JinjaPromptBuilder, PlainPromptBuilder, PromptError
from app.engine.prompting.ollama import OllamaPromptBuilder
from app.engine.prompting.select import (
    FIM_TOKEN_SETS, fill_in_middle_form, looks_like_go_template, make_prompt_builder, template_source,
)
from app.engine.settings.schema import Settings
from app.engine.settings.layers import EffectiveSettings, SettingsLayers

JINJA = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
GO = "{{ range .Messages }}[{{ .Role }}]{{ .Content }}{{ end }}[assistant]"
GO_FIM = ("{{- if .Suffix }}<PRE>{{ .Prompt }}<SUF>{{ .Suffix }}<MID>"
          "{{- else }}{{ range .Messages }}{{ .Content }}{{ end }}{{- end }}")
HELLO = ChatInput([{"role": "user", "content": "hi"}])


def folder(tmp_path: Path, *, chat_template: str | list | None = None, jinja_file: str | None = None,
           added_tokens: list | None = None, tokenizer_json: str | None = None) -> Path:
    """A model folder holding only the tokenizer files a test needs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config: dict = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja_file)
    if tokenizer_json is not None:
        (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    elif added_tokens is not None:
        tokens = [t if not isinstance(t, str) else {"id": i, "content": t, "special": True}
                  for i, t in enumerate(added_tokens)]
        (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": tokens, "model": {}}))
    return tmp_path


def entry(model_dir: Path, ollama_template: str | None = None, **ollama) -> ModelEntry:
    meta = None if ollama_template is None and not ollama else OllamaMetadata(name="x", template=ollama_template,
                                                                              **ollama)
    return ModelEntry(model_dir=str(model_dir), ollama=meta)


def fill_in_middle_prompt(model: ModelEntry, prompt: str, suffix: str) -> str | None:
    """The FIM prompt of ``model`` for ``prompt``/``suffix``, or None when it has no FIM form."""
    form = fill_in_middle_form(model)
    return None if form is None else form(prompt, suffix)


def settings(**values) -> EffectiveSettings:
    return SettingsLayers(model=Settings(**values)).resolve().effective


# -- template_source ---------------------------------------------------------------------------------
@pytest.mark.parametrize("has_ollama, has_jinja, expected", [
    (True, True, "ollama"), (True, False, "ollama"), (False, True, "jinja"), (False, False, "plain"),
])
def test_auto_prefers_ollama_then_the_folders_template_then_plain(tmp_path: Path, has_ollama: bool,
                                                                  has_jinja: bool, expected: str) -> None:
    model = folder(tmp_path, chat_template=JINJA if has_jinja else None)
    e = entry(model, GO if has_ollama else None)
    assert template_source(e, settings()) == expected
    assert template_source(e, settings(template="auto")) == expected


def test_an_empty_saved_ollama_template_counts_as_none(tmp_path: Path) -> None:
    model = folder(tmp_path, chat_template=JINJA)
    assert template_source(entry(model, "", system="sys"), settings()) == "jinja"
    with pytest.raises(PromptError, match="no saved Ollama template"):
        template_source(entry(model, ""), settings(template="ollama"))


@pytest.mark.parametrize("choice, message", [
    ("ollama", "template is set to 'ollama' but the model has no saved Ollama template"),
    ("jinja", "template is set to 'jinja' but the model folder has no chat_template"),
    ("custom", "template is set to 'custom' but no custom template was given"),
])
def test_an_explicit_choice_that_cannot_be_met_is_a_readable_error(tmp_path: Path, choice: str,
                                                                   message: str) -> None:
    with pytest.raises(PromptError) as info:
        template_source(entry(folder(tmp_path)), settings(template=choice))
    assert str(info.value) == message


def test_an_explicit_choice_wins_over_auto_order(tmp_path: Path) -> None:
    e = entry(folder(tmp_path, chat_template=JINJA), GO)
    assert template_source(e, settings(template="jinja")) == "jinja"
    assert template_source(e, settings(template="custom", custom_template=GO)) == "custom"


def test_the_folders_template_may_be_named_or_in_its_own_file(tmp_path: Path) -> None:
    named = folder(tmp_path / "named", chat_template=[{"name": "tool_use", "template": "T"},
                                                      {"name": "default", "template": JINJA}])
    assert template_source(entry(named), settings()) == "jinja"
    assert make_prompt_builder(entry(named), settings()).build(HELLO) == "<user>hi<a>"
    only_other = folder(tmp_path / "other", chat_template=[{"name": "rag", "template": "R{{ messages[0].content }}"}])
    assert make_prompt_builder(entry(only_other), settings()).build(HELLO) == "Rhi"
    own_file = folder(tmp_path / "file", chat_template="IGNORED", jinja_file="F{{ messages[0].content }}")
    assert make_prompt_builder(entry(own_file), settings()).build(HELLO) == "Fhi"  # the file wins


def test_a_folder_without_tokenizer_config_is_plain(tmp_path: Path) -> None:
    assert template_source(entry(tmp_path), settings()) == "plain"


# -- looks_like_go_template ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "{{ .Prompt }}", "{{- .System }}", "{{range .Messages}}{{end}}", "{{ if .Tools }}x{{ end }}",
    "{{ with .System }}{{ . }}{{ end }}", '{{ template "x" . }}', "{{ $last := 1 }}", "{{/* note */}}",
    "{{- /* note */ -}}",
])
def test_go_actions_are_recognised(text: str) -> None:
    assert looks_like_go_template(text)


@pytest.mark.parametrize("text", [
    JINJA, "{{ messages[0].content }}", "{{ bos_token }}", "plain text", "{% if x %}{{ .Prompt }}{% endif %}",
    "{{ range_of(x) }}", "{{ iffy }}",
])
def test_jinja_and_bare_names_are_not_go(text: str) -> None:
    assert not looks_like_go_template(text)


# -- make_prompt_builder ----------------------------------------------------------------------------------
def test_a_custom_go_template_is_built_as_an_ollama_template(tmp_path: Path) -> None:
    builder = make_prompt_builder(entry(folder(tmp_path)), settings(template="custom", custom_template=GO))
    assert isinstance(builder, OllamaPromptBuilder)
    assert builder.build(HELLO) == "[user]hi[assistant]"


def test_a_custom_jinja_template_gets_the_folders_special_tokens(tmp_path: Path) -> None:
    custom = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    builder = make_prompt_builder(entry(folder(tmp_path)), settings(template="custom", custom_template=custom))
    assert isinstance(builder, JinjaPromptBuilder) and builder.build(HELLO) == "<s>hi</s>"


def test_the_system_prompt_setting_reaches_every_builder(tmp_path: Path) -> None:
    model = folder(tmp_path, chat_template=JINJA)
    sys_jinja = make_prompt_builder(entry(model), settings(system_prompt="S"))
    assert sys_jinja.build(HELLO) == "<system>S<user>hi<a>"
    sys_go = make_prompt_builder(entry(model, GO), settings(system_prompt="S"))
    assert sys_go.build(HELLO) == "[system]S[user]hi[assistant]"
    plain = make_prompt_builder(entry(tmp_path / "none"), settings(system_prompt="S"))
    assert isinstance(plain, PlainPromptBuilder) and plain.build(HELLO) == "system: S\nuser: hi\nassistant:"


def test_the_saved_ollama_messages_come_before_the_chat(tmp_path: Path) -> None:
    e = entry(folder(tmp_path), GO, messages=[{"role": "user", "content": "example"}])
    assert make_prompt_builder(e, settings()).build(HELLO) == "[user]example[user]hi[assistant]"


# -- fill_in_middle_prompt ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", FIM_TOKEN_SETS, ids=["starcoder", "qwen", "deepseek"])
def test_each_known_fim_token_set(tmp_path: Path, tokens: tuple[str, str, str]) -> None:
    model = folder(tmp_path, added_tokens=["<s>", *tokens])
    pre, suf, mid = tokens
    assert fill_in_middle_prompt(entry(model), "def f(", "):") == f"{pre}def f({suf}):{mid}"


def test_two_of_three_fim_tokens_are_no_fim_form(tmp_path: Path) -> None:
    model = folder(tmp_path, added_tokens=["<fim_prefix>", "<fim_suffix>", "<|fim_middle|>"])
    assert fill_in_middle_prompt(entry(model), "a", "b") is None


def test_an_ollama_template_with_a_suffix_is_used_for_fim(tmp_path: Path) -> None:
    model = folder(tmp_path, added_tokens=list(FIM_TOKEN_SETS[0]))  # the template wins over the tokens
    assert fill_in_middle_prompt(entry(model, GO_FIM), "def f(", "):") == "<PRE>def f(<SUF>):<MID>"


def test_an_ollama_template_without_a_suffix_falls_back_to_the_tokens(tmp_path: Path) -> None:
    model = folder(tmp_path, added_tokens=list(FIM_TOKEN_SETS[1]))
    assert fill_in_middle_prompt(entry(model, GO), "a", "b") == "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"


def test_no_tokenizer_json_or_an_unreadable_one_is_no_fim_form(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    assert fill_in_middle_prompt(entry(folder(tmp_path / "none")), "a", "b") is None
    caplog.set_level(logging.WARNING)
    broken = folder(tmp_path / "broken", tokenizer_json="{not json")
    assert fill_in_middle_prompt(entry(broken), "a", "b") is None
    assert "cannot read" in caplog.text
    odd = folder(tmp_path / "odd", tokenizer_json=json.dumps({"added_tokens": ["<fim_prefix>", 3, None]}))
    assert fill_in_middle_prompt(entry(odd), "a", "b") is None
