"""What a request asks of its output, turned into the job's grammar: ``response_format`` (any JSON
object, or JSON valid against a schema) and ``tool_choice`` "required" or a named function (a call in
the model's own format whose arguments are valid against the tool's parameters).

Schemas are compiled to grammars off the event loop when they are large, and each once (the ``n``
choices of a request share it; see GrammarCache); a schema the grammar engine refuses is an
InvalidRequest naming the field, with the engine's reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from app.engine.constraints.grammars import GrammarError, json_object_grammar, json_schema_grammar, tool_call_grammar
from app.engine.errors import InvalidRequest
from app.engine.tools.formats import FALLBACK, format_for_prepared

if TYPE_CHECKING:
    from app.engine.prepared import PreparedModel
    from app.engine.requests import ChatRequest, CompletionRequest
    from app.engine.serving.jobs import JobHandle

#: schemas longer than this (characters) are compiled on a worker thread
INLINE_SCHEMA_CHARS = 2048


@dataclass(frozen=True)
class OutputRules:
    """The tool-call format to parse (None: none) and the grammar the job's output must follow."""

    tool_format: str | None = None
    grammar: str | None = None
    #: log-probabilities with this many alternatives per token (None: none)
    logprobs: int | None = None

    def apply(self, handle: "JobHandle") -> "JobHandle":
        handle.tool_format = self.tool_format
        handle.job.grammar = self.grammar
        handle.job.logprobs = self.logprobs
        return handle


class GrammarCache:
    """The grammars built lately, by a digest of what they were built from (the schema's or the tools' JSON
    text, and the options): the ``n`` choices of a request, and a client sending the same tools every turn, build
    each grammar once. What the engine refuses is not kept (it is refused again, with its reason)."""

    #: grammars grow with their schema (a 1.2 MB schema gives a 1.2 MB grammar) and bodies may be 16 MiB:
    #: the cache holds at most this many characters of grammar, and none larger than a tenth of it
    MAX_CHARS = 32 * 2**20

    def __init__(self, size: int = 64, max_chars: int = MAX_CHARS) -> None:
        self._size = size
        self._max_chars = max_chars
        self._chars = 0
        self._items: OrderedDict[str, str] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> str | None:
        grammar = self._items.get(key)
        if grammar is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return grammar

    def put(self, key: str, grammar: str, *, keep: bool = True) -> None:
        """Count a miss and keep ``grammar`` unless ``keep`` is False (a source that has no key) or it is too
        large; the least recently used go first when there are too many or their characters add up."""
        self.misses += 1
        if not keep or len(grammar) > self._max_chars // 10 or key in self._items:
            return
        self._items[key] = grammar
        self._chars += len(grammar)
        while len(self._items) > self._size or self._chars > self._max_chars:
            self._chars -= len(self._items.popitem(last=False)[1])


GRAMMARS = GrammarCache()
#: the start of a source that is not JSON text (NaN in a schema): built each time, never kept
UNKEYED = "unkeyed"
#: how to build a grammar: what it is built from (as text: its cache key) and the builder
Build = tuple[str, Callable[[], str]]


def response_format_grammar(response_format: dict[str, Any] | None) -> Build | None:
    """How to build the grammar ``response_format`` asks for (None for plain text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", json_object_grammar
    if kind != "json_schema":
        raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, not {kind!r}",
                             "response_format")
    spec = response_format.get("json_schema") if response_format else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise InvalidRequest("response_format.json_schema must be an object with a 'schema' object",
                             "response_format")
    schema, strict = spec.get("schema") or {"type": "object"}, spec.get("strict") is True
    return f"json_schema strict={strict} {_json_key(schema)}", lambda: json_schema_grammar(schema, strict=strict)


def tool_choice_grammar(request: "ChatRequest", fmt: str | None) -> Build | None:
    choice = request.tool_choice
    if not request.tools or choice in (None, "none", "auto"):
        return None
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    fmt, parallel = fmt or FALLBACK, request.parallel_tool_calls
    key = f"tools {fmt} name={name!r} parallel={parallel} {_json_key(request.tools)}"
    return key, lambda: tool_call_grammar(fmt, request.tools or [], name=name, parallel=parallel)


def _json_key(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):  # not JSON text: built each time (and refused)
        return f"{UNKEYED} {id(value)} {object()!r}"


async def _built(build: Build | None, param: str) -> str | None:
    if build is None:
        return None
    source, make = build
    key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    grammar = GRAMMARS.get(key)
    if grammar is not None:
        return grammar
    try:
        grammar = make() if len(source) < INLINE_SCHEMA_CHARS else await asyncio.to_thread(make)
    except GrammarError as exc:
        raise InvalidRequest(f"{param}: {exc}", param) from None
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # a schema shaped unlike any schema
        raise InvalidRequest(f"{param}: cannot use this schema ({type(exc).__name__}: {exc})", param) from None
    GRAMMARS.put(key, grammar, keep=not source.startswith(UNKEYED))
    return grammar


def _check_constrainable(prepared: "PreparedModel", param: str) -> None:
    """Constrained decoding reads the model folder's tokenizer.json: without it the request cannot be
    served (refused here, before the model loads, instead of failing in the backend)."""
    if not (Path(prepared.entry.model_dir) / "tokenizer.json").is_file():
        raise InvalidRequest(f"{param}: constrained decoding needs the model's tokenizer.json, which model "
                             f"{prepared.key} does not have", param)


async def chat_rules(prepared: "PreparedModel", request: "ChatRequest") -> OutputRules:
    fmt = format_for_prepared(prepared, request.settings) if request.tools else None
    if request.tool_choice == "none":
        fmt = None
    forced = tool_choice_grammar(request, fmt)
    if forced is not None:
        fmt = fmt or FALLBACK  # the grammar writes the call in this format: it is parsed in the same one
        _check_constrainable(prepared, "tool_choice")
        grammar = await _built(forced, "tool_choice")
    else:
        build = response_format_grammar(request.response_format)
        if build is not None:
            _check_constrainable(prepared, "response_format")
        grammar = await _built(build, "response_format")
    return OutputRules(fmt, grammar, request.logprobs)


async def completion_rules(prepared: "PreparedModel", request: "CompletionRequest") -> OutputRules:
    build = response_format_grammar(request.response_format)
    if build is not None:
        _check_constrainable(prepared, "response_format")
    grammar = await _built(build, "response_format")
    return OutputRules(None, grammar, request.logprobs)
