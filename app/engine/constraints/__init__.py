"""Constrained decoding: grammars (JSON schemas, tool calls) as plain text that a job carries, and their
per-token masks, through one library (llguidance) used the same way by every backend."""

from app.engine.constraints.grammars import (
    GrammarError, check_grammar, json_object_grammar, json_schema_grammar, tool_call_grammar,
)

__all__ = ["GrammarError", "check_grammar", "json_object_grammar", "json_schema_grammar", "tool_call_grammar"]
