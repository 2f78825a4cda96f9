"""How model text sits in an Ollama answer: ``response`` for /api/generate, ``message`` for /api/chat,
where tool calls (through the engine's tool-call parser, in the model's own format) become
``message.tool_calls`` with their arguments as objects, as Ollama gives them."""

from __future__ import annotations

import json
import logging
from typing import Any

from app.engine.facade import ParsedToolCall, ToolCallStream

log = logging.getLogger(__name__)
Part = dict[str, Any]


class GenerateOutput:
    """Text as ``{"response": ...}``."""

    def feed(self, text: str) -> list[Part]:
        return [{"response": text}] if text else []

    def finish(self) -> list[Part]:
        return []

    def whole(self, text: str) -> Part:
        return {"response": text}

    def empty(self) -> Part:
        return {"response": ""}


def _message(content: str, calls: list[dict[str, Any]] | None = None) -> Part:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


class ChatOutput:
    """Text as ``{"message": {...}}``; with ``fmt`` (the model's tool-call format) calls are parsed out."""

    def __init__(self, fmt: str | None, tools: list[dict[str, Any]] | None) -> None:
        self._stream = ToolCallStream(fmt, tools) if fmt else None  # type: ignore[arg-type]
        self.calls = 0

    def feed(self, text: str) -> list[Part]:
        if self._stream is None:
            return [_message(text)] if text else []
        return self._parts(self._stream.feed(text))

    def finish(self) -> list[Part]:
        return [] if self._stream is None else self._parts(self._stream.finish())

    def whole(self, text: str) -> Part:
        parts = [*self.feed(text), *self.finish()]
        content = "".join(p["message"]["content"] for p in parts)
        calls = [c for p in parts for c in p["message"].get("tool_calls", ())]
        return _message(content.strip() if calls else content, calls)

    def empty(self) -> Part:
        return _message("")

    def _parts(self, pieces: list[str | ParsedToolCall]) -> list[Part]:
        out: list[Part] = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(_message(piece))
                continue
            out.append(_message("", [self._call(piece)]))
            self.calls += 1
        return out

    def _call(self, call: ParsedToolCall) -> dict[str, Any]:
        # the parser's arguments are always a JSON object's text (json.dumps of a dict, app/engine/tools)
        return {"function": {"index": self.calls, "name": call.name, "arguments": json.loads(call.arguments)}}
