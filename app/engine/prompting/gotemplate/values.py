"""Template values: Go's structs and maps over plain Python, truthiness, printing and JSON.

Values are plain Python: str, int, float, bool, None, list, dict (a Go map: field access by key,
``range`` in sorted key order) and :class:`GoStruct` (a Go struct: fields by Go name, ``json`` by
its JSON tags, printed with its ``String`` form when it has one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

NO_VALUE = "<no value>"


class TemplateExecError(ValueError):
    pass


class _Missing:
    """A map key that does not exist (prints as ``<no value>``, is false)."""

    def __repr__(self) -> str:
        return NO_VALUE


MISSING = _Missing()


@dataclass
class GoStruct:
    """A Go struct value: ``fields`` by Go name; ``json_value`` what encoding/json would produce."""

    fields: dict[str, Any]
    json_value: Any = None
    string: str | None = None  # the value's String() method, if it has one
    type_name: str = "struct"

    def __bool__(self) -> bool:  # a struct is always "non-empty" in Go's truthiness
        return True


@dataclass
class GoMap:
    """A Go map whose String() is JSON (Ollama's tool call arguments)."""

    items: dict[str, Any]
    string: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _BreakSignal(Exception):
    pass


class _ContinueSignal(Exception):
    pass


# -- Go value semantics ---------------------------------------------------------------------
def truth(value: Any) -> bool:
    if value is None or value is MISSING:
        return False
    if isinstance(value, GoStruct):
        return True
    if isinstance(value, GoMap):
        return bool(value.items)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


def go_string(value: Any) -> str:
    """fmt.Sprint of one value."""
    if isinstance(value, str):
        return value
    if value is MISSING:
        return NO_VALUE
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, GoStruct):
        if value.string is not None:
            return value.string
        return "{" + " ".join(go_string(v) for v in value.fields.values()) + "}"
    if isinstance(value, GoMap):
        if value.string is not None:
            return value.string
        return go_string(value.items)
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_string(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{go_string(k)}:{go_string(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def format_float(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" in text:
        mant, exp = text.split("e")
        sign = exp[0] if exp[0] in "+-" else "+"
        digits = exp.lstrip("+-").rjust(2, "0")
        return f"{mant}e{sign}{digits}"
    return text


def go_json(value: Any) -> str:
    """encoding/json.Marshal: compact, HTML-escaped, map keys sorted, structs in field order."""
    text = json.dumps(_json_value(value), ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _json_value(value: Any) -> Any:
    if isinstance(value, GoStruct):
        return _json_value(value.json_value if value.json_value is not None else value.fields)
    if isinstance(value, GoMap):
        return _json_value(value.items)
    if value is MISSING:
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


# -- builtins -----------------------------------------------------------------------------
