"""Tool calls out of model text, per format: the pieces of one call, and a whole output at once.

Each function here either returns the calls it found or None when the text is not a well-formed call
(the caller then keeps that text as content: a malformed call is never an error).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.engine.tools.formats import ToolFormat


@dataclass(frozen=True)
class ParsedToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


_DECODER = json.JSONDecoder()
_XML_FUNCTION = re.compile(r"<function=(?P<name>[^>\n]+)>(?P<body>.*?)(?:</function>|$)", re.S)
_XML_PARAMETER = re.compile(r"<parameter=(?P<name>[^>\n]+)>\n?(?P<value>.*?)\n?(?:</parameter>|(?=<parameter=)|$)",
                            re.S)


def call_from_object(obj: Any) -> ParsedToolCall | None:
    """``{"name": ..., "arguments"|"parameters": {...}}`` as a call (arguments may be JSON text)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI's own shape, as some models echo it
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(name.strip(), json.dumps(args, ensure_ascii=False))


def json_values(text: str) -> list[Any] | None:
    """The JSON values in ``text``, one after another (separated by whitespace, ``;`` or ``,``), or None
    when anything else is in it."""
    values, pos, text = [], 0, text.strip()
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
        if pos >= len(text):
            break
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)
    return values


_PARTIAL_SCALAR = re.compile(r"-?[0-9.eE+-]*")
#: what is left of a \\uXXXX escape cut by the end of the text so far (json says "Invalid \\uXXXX escape")
_PARTIAL_ESCAPE = re.compile(r"u[0-9a-fA-F]{0,4}(\\(u[0-9a-fA-F]{0,3})?)?")  # also a surrogate pair's first half


def bare_json_verdict(text: str) -> bool | None:
    """Whether the JSON value that ``text`` opens with is a call (an object, or an array of them):
    None while it is incomplete; False as soon as it is complete and not a call, or not JSON at all."""
    try:
        value, _ = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        rest = text[exc.pos:].rstrip()
        incomplete = (exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
                      or (exc.msg.startswith("Invalid \\uXXXX escape") and _PARTIAL_ESCAPE.fullmatch(rest) is not None)
                      or any(word.startswith(rest) for word in ("true", "false", "null"))
                      or _PARTIAL_SCALAR.fullmatch(rest) is not None)
        return None if incomplete else False
    objects = value if isinstance(value, list) else [value]
    return bool(objects) and all(call_from_object(o) is not None for o in objects)


def calls_from_json(text: str) -> list[ParsedToolCall] | None:
    """Calls written as JSON objects, or as JSON arrays of them; None unless all of ``text`` is calls."""
    values = json_values(text)
    if not values:
        return None
    objects = [o for v in values for o in (v if isinstance(v, list) else [v])]
    calls = [call_from_object(o) for o in objects]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _xml_value(raw: str, schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "string" or (isinstance(kind, list) and "string" in kind and len(kind) == 1):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def calls_from_xml(text: str, tools: list[dict[str, Any]] | None = None) -> list[ParsedToolCall] | None:
    """Qwen3-coder's ``<function=NAME><parameter=P>value</parameter></function>``; values typed by the
    tool's parameter schema when it is known (else JSON when they parse as JSON, else text)."""
    found = list(_XML_FUNCTION.finditer(text))
    if not found or _XML_FUNCTION.sub("", text).strip():
        return None
    calls = []
    for match in found:
        name = match.group("name").strip()
        props = _tool_properties(tools, name)
        args = {p.group("name").strip(): _xml_value(p.group("value"), props.get(p.group("name").strip()))
                for p in _XML_PARAMETER.finditer(match.group("body"))}
        calls.append(ParsedToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls


def _tool_properties(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """The parameter schemas of the tool ``name`` (parts that are not objects are left out)."""
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            return props if isinstance(props, dict) else {}
    return {}


def calls_in_block(inner: str, tools: list[dict[str, Any]] | None = None) -> list[ParsedToolCall] | None:
    """What one ``<tool_call>...</tool_call>`` holds: JSON (Hermes) or XML (Qwen3-coder)."""
    if inner.lstrip().startswith("<function="):
        return calls_from_xml(inner, tools)
    return calls_from_json(inner)


def mistral_calls(text: str) -> list[ParsedToolCall] | None:
    """After ``[TOOL_CALLS]``: a JSON array (v3), or ``NAME[ARGS]{json}`` (v11 and later, with an
    optional ``[CALL_ID]id``), several joined by further ``[TOOL_CALLS]``."""
    calls: list[ParsedToolCall] = []
    for part in (p for p in text.split("[TOOL_CALLS]") if p.strip()):
        if "[ARGS]" in part:
            name, _, args = part.partition("[ARGS]")
            values = json_values(args)
            call = call_from_object({"name": name.split("[CALL_ID]")[0], "arguments": values[0]}) \
                if values and len(values) == 1 else None
            found = None if call is None else [call]
        else:
            found = calls_from_json(part)
        if found is None:
            return None
        calls += found
    return calls or None


def parse_tool_calls(text: str, fmt: ToolFormat, tools: list[dict[str, Any]] | None = None
                     ) -> tuple[str, list[ParsedToolCall]]:
    """A whole output as (content, calls): the text outside well-formed calls stays content."""
    from app.engine.tools.stream import ToolCallStream

    stream = ToolCallStream(fmt, tools)
    pieces = [*stream.feed(text), *stream.finish()]
    content = "".join(p for p in pieces if isinstance(p, str))
    return content, [p for p in pieces if isinstance(p, ParsedToolCall)]
