"""The builtin functions of Go's text/template (``eq``, ``len``, ``index``, ``printf``, ``json``...)."""

from __future__ import annotations

import json
from typing import Any, Callable

from app.engine.prompting.gotemplate.values import (
    MISSING, GoMap, TemplateExecError, format_float, go_json, go_string, truth,
)


def _eq(a: Any, *others: Any) -> bool:
    if not others:
        raise TemplateExecError("missing argument for comparison")
    return any(_basic(a) == _basic(b) for b in others)


def _basic(v: Any) -> Any:
    if v is MISSING:
        return None
    if isinstance(v, bool):
        return v
    return v


def _cmp(name: str, op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        a, b = _basic(a), _basic(b)
        if isinstance(a, bool) or isinstance(b, bool) or type(a) is not type(b) and not (
                isinstance(a, (int, float)) and isinstance(b, (int, float))):
            raise TemplateExecError(f"{name}: incompatible types for comparison")
        return op(a, b)
    return compare


def _len(v: Any) -> int:
    if isinstance(v, GoMap):
        return len(v.items)
    if isinstance(v, (str,)):
        return len(v.encode("utf-8"))
    if isinstance(v, (list, tuple, dict)):
        return len(v)
    raise TemplateExecError(f"len of type {type(v).__name__}")


def _index(v: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(v, GoMap):
            v = v.items
        if isinstance(v, dict):
            v = v.get(key, MISSING)
        elif isinstance(v, (list, tuple, str)):
            if not isinstance(key, int) or not 0 <= key < len(v):
                raise TemplateExecError(f"index out of range: {key}")
            v = v[key] if not isinstance(v, str) else v.encode()[key]
        else:
            raise TemplateExecError(f"can't index item of type {type(v).__name__}")
    return v


def _slice(v: Any, *idx: Any) -> Any:
    if len(idx) > 3:
        raise TemplateExecError("too many slice indexes")
    if isinstance(v, str):
        raw = v.encode("utf-8")
        start = idx[0] if idx else 0
        end = idx[1] if len(idx) > 1 else len(raw)
        if not 0 <= start <= end <= len(raw):
            raise TemplateExecError(f"slice index out of range: {start}:{end}")
        return raw[start:end].decode("utf-8", errors="replace")
    if isinstance(v, (list, tuple)):
        start = idx[0] if idx else 0
        end = idx[1] if len(idx) > 1 else len(v)
        if not 0 <= start <= end <= len(v):
            raise TemplateExecError(f"slice index out of range: {start}:{end}")
        return list(v[start:end])
    raise TemplateExecError(f"can't slice item of type {type(v).__name__}")


def _sprint(*args: Any) -> str:
    out = []
    for i, a in enumerate(args):
        if i > 0 and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(go_string(a))
    return "".join(out)


def _sprintln(*args: Any) -> str:
    return " ".join(go_string(a) for a in args) + "\n"


def _sprintf(fmt: str, *args: Any) -> str:
    out = []
    i = 0
    arg_i = 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        j = i + 1
        while j < len(fmt) and fmt[j] in "+-# 0123456789.":
            j += 1
        if j >= len(fmt):
            out.append("%!(NOVERB)")
            break
        verb, flags = fmt[j], fmt[i + 1:j]
        i = j + 1
        if verb == "%":
            out.append("%")
            continue
        if arg_i >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        a = args[arg_i]
        arg_i += 1
        if verb in "sv":
            text = go_string(a) if not (verb == "v" and "+" in flags) else go_string(a)
        elif verb == "q":
            text = json.dumps(go_string(a), ensure_ascii=False)
        elif verb == "d" and isinstance(a, int) and not isinstance(a, bool):
            text = str(a)
        elif verb in "fFeg" and isinstance(a, (int, float)) and not isinstance(a, bool):
            prec = flags.split(".")[1] if "." in flags else None
            text = format(float(a), f".{prec or 6}{'f' if verb in 'fF' else verb}") if verb != "g" or prec else \
                format_float(float(a))
        elif verb == "t" and isinstance(a, bool):
            text = "true" if a else "false"
        elif verb in "xX" and isinstance(a, (int, str)):
            text = format(a, verb) if isinstance(a, int) else a.encode().hex()
            text = text.upper() if verb == "X" else text
        elif verb == "c" and isinstance(a, int):
            text = chr(a)
        else:
            text = f"%!{verb}({go_string(a)})"
        width = flags.lstrip("+-# 0").split(".")[0]
        if width.isdigit():
            text = text.ljust(int(width)) if "-" in flags else text.rjust(int(width), "0" if flags.startswith("0") else " ")
        out.append(text)
    if arg_i < len(args):
        out.append("%!(EXTRA " + ", ".join(go_string(a) for a in args[arg_i:]) + ")")
    return "".join(out)


def _html(*args: Any) -> str:
    s = _sprint(*args)
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&#34;").replace("\0", "\uFFFD"))


def _urlquery(*args: Any) -> str:
    from urllib.parse import quote_plus

    return quote_plus(_sprint(*args))


BUILTINS: dict[str, Callable[..., Any]] = {
    "eq": _eq,
    "ne": lambda a, b: _basic(a) != _basic(b),
    "lt": _cmp("lt", lambda a, b: a < b),
    "le": _cmp("le", lambda a, b: a <= b),
    "gt": _cmp("gt", lambda a, b: a > b),
    "ge": _cmp("ge", lambda a, b: a >= b),
    "not": lambda a: not truth(a),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "print": _sprint,
    "println": _sprintln,
    "printf": _sprintf,
    "html": _html,
    "urlquery": _urlquery,
    "json": go_json,
}
