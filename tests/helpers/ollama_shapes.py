"""The shapes of Ollama's API responses, as its docs/api.md and api/types.go document them, as JSON
Schemas: every response the Ollama tests get is checked against one of these.

Fields Ollama marks ``omitempty`` are optional here; the ones it always writes are required. Durations
are integer nanoseconds, times RFC 3339.
"""

from __future__ import annotations

from typing import Any

import jsonschema

RFC3339 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$"
_TIME = {"type": "string", "pattern": RFC3339}
_NS = {"type": "integer", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 0}

_DETAILS = {"type": "object", "required": ["parent_model", "format", "family", "families", "parameter_size",
                                           "quantization_level"],
            "properties": {"parent_model": {"type": "string"}, "format": {"type": "string", "minLength": 1},
                           "family": {"type": "string", "minLength": 1},
                           "families": {"type": "array", "items": {"type": "string"}},
                           "parameter_size": {"type": "string"}, "quantization_level": {"type": "string"},
                           "context_length": _COUNT}}
_DIGEST = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TOOL_CALL = {"type": "object", "required": ["function"],
              "properties": {"function": {"type": "object", "required": ["name", "arguments"],
                                          "properties": {"name": {"type": "string"},
                                                         "arguments": {"type": "object"}}}}}
_MESSAGE = {"type": "object", "required": ["role", "content"],
            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"},
                           "thinking": {"type": "string"},
                           "tool_calls": {"type": "array", "items": _TOOL_CALL}}}
_METRICS = {"total_duration": _NS, "load_duration": _NS, "prompt_eval_count": _COUNT, "prompt_eval_duration": _NS,
            "eval_count": _COUNT, "eval_duration": _NS}
_HEAD = {"model": {"type": "string", "minLength": 1}, "created_at": _TIME}


def _final(carry: dict[str, Any], key: str, *, metrics: bool = True) -> dict[str, Any]:
    required = ["model", "created_at", key, "done", "done_reason", *(_METRICS if metrics else ())]
    return {"type": "object", "required": required,
            "properties": {**_HEAD, key: carry, "done": {"const": True}, "done_reason": {"type": "string"},
                           "context": {"type": "array", "items": {"type": "integer"}}, **_METRICS}}


def _chunk(carry: dict[str, Any], key: str) -> dict[str, Any]:
    return {"type": "object", "required": ["model", "created_at", key, "done"],
            "properties": {**_HEAD, key: carry, "done": {"const": False}}, "not": {"required": ["error"]}}


SCHEMAS: dict[str, dict[str, Any]] = {
    "version": {"type": "object", "required": ["version"],
                "properties": {"version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+"}}},
    "tags": {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": {
        "type": "object", "required": ["name", "model", "modified_at", "size", "digest", "details"],
        "properties": {"name": {"type": "string"}, "model": {"type": "string"}, "modified_at": _TIME,
                       "size": _COUNT, "digest": _DIGEST, "details": _DETAILS}}}}},
    "ps": {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": {
        "type": "object", "required": ["name", "model", "size", "digest", "details", "expires_at", "size_vram"],
        "properties": {"name": {"type": "string"}, "model": {"type": "string"}, "size": _COUNT, "digest": _DIGEST,
                       "details": _DETAILS, "expires_at": _TIME, "size_vram": _COUNT,
                       "context_length": _COUNT}}}}},
    "show": {"type": "object", "required": ["details", "model_info"],
             "properties": {"modelfile": {"type": "string"}, "parameters": {"type": "string"},
                            "template": {"type": "string"}, "system": {"type": "string"},
                            "license": {"type": "string"}, "details": _DETAILS, "model_info": {"type": "object"},
                            "capabilities": {"type": "array", "uniqueItems": True, "items": {"enum": [
                                "completion", "tools", "insert", "vision", "embedding", "thinking"]}},
                            "modified_at": _TIME}},
    "generate_chunk": _chunk({"type": "string"}, "response"),
    "generate_final": _final({"type": "string"}, "response"),
    "chat_chunk": _chunk(_MESSAGE, "message"),
    "chat_final": _final(_MESSAGE, "message"),
    "generate_load": _final({"const": ""}, "response", metrics=False),
    "chat_load": _final({"type": "object", "required": ["role", "content"],
                         "properties": {"role": {"const": "assistant"}, "content": {"const": ""}}},
                        "message", metrics=False),
    "error": {"type": "object", "required": ["error"], "additionalProperties": False,
              "properties": {"error": {"type": "string", "minLength": 1}}},
}


def check(shape: str, body: Any) -> Any:
    """Raise jsonschema.ValidationError unless ``body`` has the documented shape ``shape``; returns it."""
    jsonschema.validate(body, SCHEMAS[shape])
    return body


def check_stream(kind: str, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A whole NDJSON stream of /api/generate or /api/chat (``kind``): chunks, then one final object."""
    assert lines, "empty stream"
    for chunk in lines[:-1]:
        check(f"{kind}_chunk", chunk)
    check(f"{kind}_final", lines[-1])
    return lines
