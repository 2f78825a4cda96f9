"""What the API and the UI hand to the engine: chat and completion requests, and the models it lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.engine.settings.schema import Settings


@dataclass(frozen=True)
class ToolCall:
    """A tool call an assistant message made earlier in the conversation."""

    id: str | None
    name: str
    arguments: Any  # the decoded JSON arguments (usually an object), or the text when it was not JSON
    type: str = "function"


@dataclass(frozen=True)
class Message:
    """One chat message, already normalised by the wire protocol (content as plain text)."""

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates see it (the OpenAI shape transformers and Ollama use)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass
class ChatRequest:
    model: str
    messages: list[Message]
    settings: Settings = field(default_factory=Settings)
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: OpenAI's response_format ({"type": "json_object"} or {"type": "json_schema", "json_schema": {...}})
    response_format: dict[str, Any] | None = None
    #: "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    #: report each token's log-probability and this many alternatives (None: none)
    logprobs: int | None = None


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    settings: Settings = field(default_factory=Settings)
    suffix: str | None = None
    stream: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    response_format: dict[str, Any] | None = None
    logprobs: int | None = None


@dataclass(frozen=True)
class ModelInfoView:
    """A registered model as the API and the UI list it."""

    name: str
    model_dir: str
    created: int
    context_length: int | None
    format: str | None
    state: str  # "unloaded", "loading", "ready", "unloading"
