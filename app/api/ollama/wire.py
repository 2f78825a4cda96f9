"""Wire types of Ollama's API that the server accepts (pydantic, strict types, unknown fields tolerated).

A request converts itself to engine input here (``format`` as the engine's response_format); what this
app does not do (images, ``think``, the deprecated ``context``) is refused with a 400 that says so
rather than being ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.errors import ApiError
from app.api.ollama.options import options_to_settings, parse_keep_alive
from app.engine.requests import Message, ToolCall as EngineToolCall
from app.engine.settings.schema import Settings, format_validation_error
from app.engine.facade import check_tools

log = logging.getLogger(__name__)


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ToolFunction(WireModel):
    name: str = Field(max_length=512)
    arguments: dict[str, Any] | str | None = None


class ToolCall(WireModel):
    id: str | None = None
    function: ToolFunction


class ChatMessage(WireModel):
    role: str = Field(min_length=1, max_length=64)
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None

    def to_engine(self) -> Message:
        calls = tuple(EngineToolCall(c.id, c.function.name, c.function.arguments or {}) for c in self.tool_calls or ())
        return Message(self.role, self.content or "", self.tool_name, calls, self.tool_call_id)


class GenerationFields(WireModel):
    """What /api/generate and /api/chat share."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool | None = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: int | float | str | None = None
    think: bool | str | None = None

    def settings(self) -> Settings:
        return options_to_settings(self.options)

    def keep_alive_s(self) -> float | None:
        return parse_keep_alive(self.keep_alive)

    def streaming(self) -> bool:
        return self.stream is not False

    def response_format(self) -> dict[str, Any] | None:
        """``format`` as the engine's response_format: "json" any JSON object, an object a JSON schema
        (enforced as far as the grammar engine can, as Ollama does)."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return {"type": "json_object"}
        if isinstance(self.format, dict):
            return {"type": "json_schema", "json_schema": {"name": "format", "schema": self.format}}
        raise ApiError(400, f"format must be \"json\" or a JSON schema object, not {str(self.format)[:40]!r}")

    def check_supported(self) -> None:
        self.response_format()
        if self.think not in (None, False):
            raise ApiError(400, f"model '{self.model}' does not support thinking (think)")


class GenerateRequest(GenerationFields):
    prompt: str | None = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = False
    images: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.images:
            raise ApiError(400, "images are not supported: this server serves text-only models")
        if self.raw and (self.template or self.system or self.context):
            raise ApiError(400, "raw mode does not support template, system, or context")
        dropped = [name for name in ("template", "system") if getattr(self, name)]
        if self.suffix and dropped:  # the model's own fill-in-the-middle form has no place for them
            raise ApiError(400, f"suffix cannot be combined with {', '.join(dropped)}: a request with suffix is "
                                "the model's fill-in-the-middle form of prompt and suffix, nothing else")
        if self.context:
            raise ApiError(400, "context (deprecated) is not supported: send the conversation to /api/chat as "
                                "messages, or the whole prompt with raw")

    def settings(self) -> Settings:
        layer = super().settings()
        if self.template:
            layer.template, layer.custom_template = "custom", self.template
        return layer


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if any(m.images for m in self.messages or ()):
            raise ApiError(400, "images are not supported: this server serves text-only models")
        try:  # the shared rules of tools (Ollama's tools are OpenAI's): a malformed one is a 400 naming it
            check_tools(self.tools, None)
        except ValueError as exc:
            raise ApiError(400, f"invalid tools: {exc}") from None


class ShowRequest(WireModel):
    model: str | None = Field(None, max_length=512)
    name: str | None = Field(None, max_length=512)  # the field's old name, still sent by some clients
    verbose: bool | None = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise ApiError(400, "model is required")
        return name


def parse(model: type[WireModel], body: dict[str, Any]) -> Any:
    """``body`` as the wire model ``model``, or a 400 naming the field at fault."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, f"invalid request: {format_validation_error(exc)}") from None
    except RecursionError:
        raise ApiError(400, "invalid request: nested too deeply") from None
    if parsed.model_extra:
        log.debug("ignoring unknown request fields: %s", sorted(parsed.model_extra))
    check = getattr(parsed, "check_supported", None)
    if check is not None:
        check()
    return parsed
