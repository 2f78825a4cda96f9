"""Validate bodies and stream chunks against OpenAI's published OpenAPI schema (../shared/conformance/openai)."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

SPEC = Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "openai" / "openapi.json"


def _denull(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 ``nullable: true`` as ``anyOf: [schema, {type: null}]``."""
    if isinstance(node, dict):
        node = {k: _denull(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_denull(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = _denull(json.loads(SPEC.read_text()))
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    return doc, Registry().with_resource("urn:openai", resource)


def validate(schema_name: str, instance: Any) -> None:
    if not SPEC.is_file():
        pytest.skip(f"OpenAI schema not found at {SPEC}")
    from jsonschema import Draft202012Validator

    doc, registry = _registry()
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    Draft202012Validator(schema, registry=registry).validate(copy.deepcopy(instance))


def have_schema() -> bool:
    return SPEC.is_file()


def validate_completion_chunk(instance: Any) -> None:
    """A /v1/completions stream chunk.

    The spec has no chunk schema for the legacy completions API and its CreateCompletionResponse
    requires a string ``finish_reason``; OpenAI's own streams send ``null`` until the last chunk.
    Intermediate chunks are checked with that one field relaxed; the last chunk strictly.
    """
    chunk = copy.deepcopy(instance)
    for choice in chunk.get("choices", []):
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "stop"
    validate("CreateCompletionResponse", chunk)
