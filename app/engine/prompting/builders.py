"""Prompt builders: chat messages -> the prompt string the model sees.

:class:`PromptBuilder` is the interface; :class:`JinjaPromptBuilder` renders the model folder's
``chat_template`` (or a custom Jinja template) in jinja2's sandbox, the way transformers does.
The Ollama Go-template builder lives in :mod:`app.engine.prompting.ollama`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class PromptError(ValueError):
    """The template could not be rendered for these messages; the message says why."""


@dataclass(frozen=True)
class ChatInput:
    """What a prompt builder gets: OpenAI-style messages (dicts) and optional tools."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PromptBuilder(Protocol):
    #: Stop strings the template implies (e.g. Ollama params), added to the job's stops.
    stop_strings: list[str]

    def build(self, chat: ChatInput) -> str: ...


def message_text(content: Any) -> str:
    """OpenAI message content (a string, None, or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def with_default_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """Ollama's rule: the saved system prompt is used only when the conversation has none."""
    if system and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **kw: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=kw.get("sort_keys", False))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class JinjaPromptBuilder:
    """Render a Hugging Face style Jinja chat template."""

    def __init__(self, template: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 system_prompt: str | None = None, stop_strings: list[str] | None = None) -> None:
        try:
            self._template = make_jinja_env().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None
        self._bos = bos_token or ""
        self._eos = eos_token or ""
        self._system = system_prompt
        self.stop_strings = list(stop_strings or [])

    def build(self, chat: ChatInput) -> str:
        messages = with_default_system(chat.messages, self._system)
        try:
            return self._template.render(
                messages=messages, tools=chat.tools or None, add_generation_prompt=True,
                bos_token=self._bos, eos_token=self._eos, **chat.extra,
            )
        except jinja2.TemplateError as exc:
            raise PromptError(f"chat template error: {exc}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise PromptError(f"chat template failed on these messages: {exc}") from None


class PlainPromptBuilder:
    """Fallback for folders without a chat template: ``role: content`` lines."""

    def __init__(self, system_prompt: str | None = None) -> None:
        self._system = system_prompt
        self.stop_strings = ["\nuser:"]

    def build(self, chat: ChatInput) -> str:
        lines = [f"{m.get('role', 'user')}: {message_text(m.get('content'))}"
                 for m in with_default_system(chat.messages, self._system)]
        return "\n".join(lines) + "\nassistant:"
