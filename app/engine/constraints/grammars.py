"""Grammars for constrained decoding, as llguidance grammar text (plain, picklable: a job carries it to
the backend, which compiles it against its tokenizer).

JSON is written compactly, the way models and ``json.dumps`` write it (``", "`` and ``": "``, no other
whitespace). ``strict`` schemas must be fully enforceable (a keyword the grammar engine cannot enforce
is an error); others are enforced as far as it can (unknown keywords ignored).
"""

from __future__ import annotations

import json
from typing import Any

#: how JSON is laid out under a constraint
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar that cannot be used; the message says why."""


def _llg() -> Any:
    import llguidance

    return llguidance


def engine_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` of the grammar engine, its failures as GrammarError: also a Rust panic,
    which pyo3 raises as a BaseException (llguidance 1.9 panics on some schemas with non-ASCII text)."""
    try:
        return fn(*args, **kwargs)
    except GrammarError:
        raise
    except Exception as exc:  # the engine's own exceptions say what is wrong
        raise GrammarError(str(exc)) from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        reason = str(exc).splitlines()[0][:200] if str(exc) else "internal error"
        raise GrammarError(f"the grammar engine failed on this schema ({reason})") from None


def json_schema_grammar(schema: dict[str, Any], *, strict: bool = False) -> str:
    """The grammar of JSON text valid against ``schema``."""
    if not isinstance(schema, dict):
        raise GrammarError("the schema must be a JSON object")
    options = {**LAYOUT, "lenient": not strict}
    try:
        grammar = engine_call(_llg().LLMatcher.grammar_from_json_schema, json.dumps(schema), overrides=options)
    except GrammarError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None
    check_grammar(grammar)
    return grammar


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


def check_grammar(grammar: str) -> None:
    """Raise GrammarError with the engine's reason when ``grammar`` is not valid."""
    error = engine_call(_llg().LLMatcher.validate_grammar, grammar, None)
    if error and not error.startswith("WARNING"):
        raise GrammarError(error)


def _hoisted(tools: list[dict[str, Any]], wrap: str) -> dict[str, Any]:
    """One schema for a call of any of ``tools``: ``{"name": NAME, wrap: ARGUMENTS}``, with each tool's
    ``$defs`` moved to the top so that its ``#/$defs/...`` references still resolve."""
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        fn = tool["function"]
        params = dict(fn.get("parameters") or {"type": "object"})
        for key in ("$defs", "definitions"):
            defs.update(params.pop(key, None) or {})
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, wrap: params},
                        "required": ["name", wrap], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def _lark_string(text: str) -> str:
    return json.dumps(text)


def tool_call_grammar(fmt: str, tools: list[dict[str, Any]], *, name: str | None = None,
                      parallel: bool = True) -> str:
    """The model's own tool-call syntax around JSON arguments valid against the tool's parameters: for
    ``tool_choice`` "required" (any of ``tools``, one call or, with ``parallel``, several) or a named
    function (exactly one call of it)."""
    chosen = [t for t in tools if t["function"]["name"] == name] if name else tools
    if not chosen:
        raise GrammarError(f"no tool named {name!r}")
    several = parallel and name is None
    wrap = "parameters" if fmt == "llama3" else "arguments"
    # as OpenAI's function "strict": every keyword enforced only when each tool asks for it
    strict = all(t["function"].get("strict") is True for t in chosen)
    schema = {**_hoisted(chosen, wrap), "x-guidance": {**LAYOUT, "lenient": not strict}}
    if fmt in ("hermes", "qwen3_coder"):
        block = _lark_string("<tool_call>\n") + " call " + _lark_string("\n</tool_call>")
        sep = _lark_string("\n")
    elif fmt == "mistral":  # the bare array: [TOOL_CALLS] is a special token the parser does without
        block, sep = "call", '", "'
    else:
        block, sep = "call", '"; "'
    calls = f"block ({sep} block)*" if several else "block"
    start = f'"[" {calls} "]"' if fmt == "mistral" else calls
    lark = f"start: {start}\nblock: {block}\ncall: %json {json.dumps(schema)}\n"
    grammar = engine_call(_llg().LLMatcher.grammar_from_lark, lark)
    check_grammar(grammar)
    return grammar
