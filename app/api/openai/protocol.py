"""Wire types of the OpenAI API that the server accepts (pydantic; unknown extra fields tolerated).

Each request model converts itself to engine parameters (``to_settings``); values that would
change the result and are not supported yet (``echo``, ``best_of > 1``) are refused with a clear
message instead of being silently ignored.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.api.errors import ApiError

from app.engine.requests import Message, ToolCall as EngineToolCall
from app.engine.settings.schema import Settings, format_validation_error
from app.engine.facade import check_tools

log = logging.getLogger(__name__)


class UnsupportedValue(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(WireModel):
    include_usage: bool | None = None


class ContentPart(WireModel):
    type: str
    text: str | None = None


class FunctionCall(WireModel):
    name: str
    arguments: str | None = None


class ToolCall(WireModel):
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def to_engine(self) -> Message:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            content = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            content = self.content if self.content is not None else ""
        calls = tuple(EngineToolCall(c.id, c.function.name, _parse_arguments(c.function.arguments), c.type or "function")
                      for c in self.tool_calls or ())
        return Message(role, content, self.name, calls, self.tool_call_id)


def _parse_arguments(arguments: str | None) -> Any:
    import json

    if arguments is None:
        return {}
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class SamplingFields(WireModel):
    """Fields common to chat and text completions."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(None, ge=1, le=128)
    user: str | None = None
    # extensions (not in OpenAI's API; common among local servers)
    top_k: int | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    typical_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 64:
            raise ValueError("at most 64 stop strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        for key, bias in value.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, not {key!r}")
            if not -100 <= bias <= 100 or bias != bias:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    def check_supported(self) -> None:
        """Values accepted by the wire model that this server does not do (a 400 saying so)."""

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def to_settings(self) -> Settings:
        """The request layer of the settings."""
        data: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "top_k": self.top_k, "min_p": self.min_p,
            "typical": self.typical_p, "repetition_penalty": self.repetition_penalty,
            "max_tokens": self.token_limit(),
        }
        if self.seed is not None:
            data["seed"] = self.seed % (2**63)
        if self.top_p == 0:  # "only the most likely token"
            data["top_p"], data["top_k"] = None, 1
        stops = self.stop_list()
        settings = Settings(**{k: v for k, v in data.items() if v is not None})
        if stops:
            settings.stop = stops
        return settings

    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedValue("top_logprobs needs logprobs: true", "top_logprobs")

    @model_validator(mode="after")
    def _tools(self) -> "ChatCompletionRequest":
        check_tools(self.tools, self.tool_choice)
        return self

    def tool_choice_kind(self) -> str:
        """"none", "auto", "required", or the name of the function the request demands."""
        choice = self.tool_choice
        if isinstance(choice, dict):
            return str((choice.get("function") or {}).get("name"))
        if choice is None:
            return "auto" if self.tools else "none"
        return choice


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    response_format: dict[str, Any] | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return self  # one prompt given as token ids
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("prompt: exactly one prompt per request is supported")
        return self

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise UnsupportedValue("echo is not supported yet", "echo")
        if self.best_of is not None and self.best_of > 1:
            raise UnsupportedValue("best_of > 1 is not supported yet", "best_of")

    def prompt_value(self) -> str | list[int]:
        """The prompt as text, or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt  # type: ignore[return-value]
        if isinstance(prompt, list):
            return prompt[0]  # type: ignore[return-value]
        return prompt


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """``body`` as the wire model ``model``, or an ApiError (400) naming the field at fault."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"Invalid request: {format_validation_error(exc)}", param=param) from None
    except RecursionError:
        raise ApiError(400, "Invalid request: nested too deeply") from None
    extra = set(parsed.model_extra or {})
    if extra:
        log.debug("ignoring unknown request fields: %s", sorted(extra))
    try:
        parsed.check_supported()
    except UnsupportedValue as exc:
        raise ApiError(400, str(exc), param=exc.param, code="unsupported_value") from None
    return parsed
