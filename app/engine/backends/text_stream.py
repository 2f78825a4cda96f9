"""Token ids -> text, incrementally: never splits a UTF-8 character, cuts at stop strings."""

from __future__ import annotations

from typing import Protocol, Sequence


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas.

    Byte-level tokenizers can split one character over several tokens; until the bytes are complete
    the decoded text ends in U+FFFD, and that part is held back. Only a short window of recent tokens
    is decoded each time, so the cost per token stays constant.
    """

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decoder.decode(self._ids[self._prefix:self._read])
        new_text = self._decoder.decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decoder.decode(self._ids[self._prefix:self._read])
        new_text = self._decoder.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Hold back text that could be the start of a stop string; report the cut when one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped). After a stop, the stop string and the rest are dropped."""
        if not self._stops:
            return text, False
        self._pending += text
        cut = -1
        for stop in self._stops:
            idx = self._pending.find(stop)
            if idx != -1 and (cut == -1 or idx < cut):
                cut = idx
        if cut != -1:
            out, self._pending = self._pending[:cut], ""
            return out, True
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:n]):
                    hold = n
                    break
        if hold:
            out, self._pending = self._pending[:-hold], self._pending[-hold:]
        else:
            out, self._pending = self._pending, ""
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class TextStream:
    """Incremental decoding plus stop-string matching for one job."""

    def __init__(self, decoder: Decoder, stops: Sequence[str]) -> None:
        self._decoder = IncrementalDecoder(decoder)
        self._stops = StopMatcher(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._stops.push(self._decoder.push(token_id))

    def finish(self) -> str:
        text, stopped = self._stops.push(self._decoder.flush())
        return text if stopped else text + self._stops.flush()
