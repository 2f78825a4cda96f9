"""An incremental tool-call parser: model text in, as it streams; content and whole calls out.

Content is passed on as soon as it cannot be the start of a call (only a tail that could still become
a call marker is held back); a call is given out when it is complete. What turns out not to be a
well-formed call (at its closing marker, or at the end of the output) is given out as content.
"""

from __future__ import annotations

from typing import Any

from app.engine.tools.formats import ToolFormat
from app.engine.tools.parse import (
    ParsedToolCall, bare_json_verdict, calls_from_json, calls_in_block, mistral_calls,
)

Piece = str | ParsedToolCall
#: per format: the markers that open a call, and the one that closes it (None: the call runs to the end)
_MARKERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "hermes": (("<tool_call>",), "</tool_call>"),
    "qwen3_coder": (("<tool_call>", "<function="), "</tool_call>"),
    "mistral": (("[TOOL_CALLS]",), None),
    "llama3": (("<|python_tag|>",), None),
}
#: formats whose calls may also open the output bare (a JSON object or array: Llama 3.1 writes them so,
#: and Mistral's ``[TOOL_CALLS]`` is a special token that decoding leaves out)
_BARE_JSON_START = {"llama3", "mistral"}


class ToolCallStream:
    """Feed model text with :meth:`feed`; :meth:`finish` at the end. Both return content strings and
    :class:`ParsedToolCall` pieces in the order they occur."""

    def __init__(self, fmt: ToolFormat, tools: list[dict[str, Any]] | None = None) -> None:
        self.format = fmt
        self._tools = tools
        self._open, self._close = _MARKERS[fmt]
        self._buf = ""
        self._in_call = False
        #: still at the start of the output (nothing but whitespace seen)
        self._at_start = fmt in _BARE_JSON_START
        #: the open call began bare (no marker), and its first JSON value is not known to be a call yet
        self._bare = False

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while self._buf:
            if self._at_start:
                stripped = self._buf.lstrip()
                if not stripped or any(m.startswith(stripped) and m != stripped for m in self._open):
                    return out  # nothing yet, or what may still become a marker
                self._at_start = False
                if stripped[0] in "{[" and not any(stripped.startswith(m) for m in self._open):
                    self._in_call = self._bare = True
                    out.append(self._buf[:len(self._buf) - len(stripped)])
                    self._buf = stripped
            if self._in_call:
                if not self._take_call(out):
                    break
                continue
            if not self._take_text(out):
                break
        return [p for p in out if p != ""]

    def finish(self) -> list[Piece]:
        """The end of the output: a call still open is a call if it parses, else content."""
        out: list[Piece] = []
        if self._in_call:
            calls = self._parse_open_call(self._buf, final=True)
            out += calls if calls is not None else [self._buf]
        elif self._buf:
            out.append(self._buf)
        self._buf, self._in_call, self._bare = "", False, False
        return [p for p in out if p != ""]

    # -- internals ----------------------------------------------------------------
    def _take_text(self, out: list[Piece]) -> bool:
        """Pass on text up to the next marker; False when more text is needed to decide."""
        found = [(i, m) for m in self._open if (i := self._buf.find(m)) >= 0]
        if found:
            index, _ = min(found)
            out.append(self._buf[:index])
            self._buf = self._buf[index:]
            self._in_call = True
            return True
        hold = max((n for m in self._open for n in range(min(len(m) - 1, len(self._buf)), 0, -1)
                    if self._buf.endswith(m[:n])), default=0)
        out.append(self._buf[:len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold:]
        return False

    def _take_call(self, out: list[Piece]) -> bool:
        """Give out the call at the start of the buffer once it is closed; False while it is open."""
        if self._close is None:  # runs to the end of the output, unless it began bare and is no call
            if self._bare and (verdict := bare_json_verdict(self._buf)) is not None:
                self._bare = False
                if not verdict:
                    out.append(self._buf)
                    self._buf, self._in_call = "", False
                    return True
            return False
        end = self._buf.find(self._close)
        if end < 0:
            return False
        block, self._buf = self._buf[:end + len(self._close)], self._buf[end + len(self._close):]
        self._in_call = False
        calls = self._parse_open_call(block[:end], final=False)
        out += calls if calls is not None else [block]
        return True

    def _parse_open_call(self, text: str, *, final: bool) -> list[ParsedToolCall] | None:
        """A call's text from its opening marker (without the closing one)."""
        marker = next((m for m in self._open if text.startswith(m)), "")
        if self.format in ("hermes", "qwen3_coder"):
            inner = text[len(marker):] if marker != "<function=" else text
            return calls_in_block(inner, self._tools)
        if self.format == "mistral":
            return mistral_calls(text[len(marker):] if marker else text)
        return calls_from_json(text[len(marker):])
