"""A chat answer's tool calls on the wire: the model's text through the tool-call parser, as a message
body or as stream deltas (``delta.tool_calls`` with ``index``), and the finish reason they imply."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from app.engine.facade import ParsedToolCall, ToolCallStream

log = logging.getLogger(__name__)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def wire_call(call: ParsedToolCall, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ChatOutput:
    """The model's text split into content and tool calls (no parsing when ``fmt`` is None). With
    ``parallel`` False only the first call is kept, as OpenAI's ``parallel_tool_calls: false`` promises."""

    def __init__(self, fmt: str | None, tools: list[dict[str, Any]] | None, parallel: bool = True) -> None:
        self._stream = ToolCallStream(fmt, tools) if fmt else None  # type: ignore[arg-type]
        self._parallel = parallel
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Stream deltas for a piece of model text."""
        if self._stream is None:
            return [{"content": text}] if text else []
        return self._deltas(self._stream.feed(text))

    def finish(self) -> list[dict[str, Any]]:
        """Stream deltas for what was held back at the end of the output."""
        return [] if self._stream is None else self._deltas(self._stream.finish())

    def _deltas(self, pieces: list[str | ParsedToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append({"content": piece})
            elif self._parallel or not self.calls:
                call = wire_call(piece, new_call_id())
                out.append({"tool_calls": [{"index": len(self.calls), **call}]})
                self.calls.append(call)
            else:
                log.info("parallel_tool_calls is false: call to %s dropped", piece.name)
        return out

    def message(self, text: str) -> dict[str, Any]:
        """The whole output as a chat completion's ``message``."""
        content = "".join(d.get("content", "") for d in [*self.feed(text), *self.finish()])
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if self.calls:
            message["content"] = content.strip() or None
            message["tool_calls"] = self.calls
        return message

    def finish_reason(self, reason: str) -> str:
        """"tool_calls" for an output that ended by itself with calls in it."""
        return "tool_calls" if self.calls and reason == "stop" else reason
