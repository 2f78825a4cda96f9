"""Executor for parsed Go templates, with Go's truthiness, printing and the builtin functions.

Values are plain Python: str, int, float, bool, None, list, dict (a Go map: field access by key,
``range`` in sorted key order) and :class:`GoStruct` (a Go struct: fields by Go name, ``json`` by
its JSON tags, printed with its ``String`` form when it has one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from app.engine.prompting.gotemplate.parser import (
    Action, Branch, Break, Chain, Command, Continue, Dot, Field, Ident, ListNode, Literal, Pipe, Text, Variable,
)

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


# -- execution ------------------------------------------------------------------------------
class Executor:
    def __init__(self, root: Any, funcs: dict[str, Callable[..., Any]] | None = None) -> None:
        self.root = root
        self.funcs = {**BUILTINS, **(funcs or {})}
        self.out: list[str] = []
        self.vars: list[list[Any]] = [["$", root]]

    def run(self, tree: ListNode) -> str:
        self.walk_list(tree, self.root)
        return "".join(self.out)

    def walk_list(self, node: ListNode, dot: Any) -> None:
        for child in node.nodes:
            self.walk(child, dot)

    def walk(self, node: Any, dot: Any) -> None:
        if isinstance(node, Text):
            self.out.append(node.text)
        elif isinstance(node, Action):
            value = self.eval_pipe(node.pipe, dot)
            if not node.pipe.decl:
                self.out.append(go_string(value))
        elif isinstance(node, Branch):
            self.walk_branch(node, dot)
        elif isinstance(node, Break):
            raise _BreakSignal()
        elif isinstance(node, Continue):
            raise _ContinueSignal()
        else:  # pragma: no cover - the parser makes no other nodes
            raise TemplateExecError(f"unknown node {node!r}")

    def walk_branch(self, node: Branch, dot: Any) -> None:
        mark = len(self.vars)
        try:
            if node.kind == "range":
                self.walk_range(node, dot)
                return
            value = self.eval_pipe(node.pipe, dot, declare_range=False)
            if truth(value):
                self.walk_list(node.body, value if node.kind == "with" else dot)
            elif node.else_body is not None:
                self.walk_list(node.else_body, dot)
        finally:
            del self.vars[mark:]

    def walk_range(self, node: Branch, dot: Any) -> None:
        value = self.eval_pipe(node.pipe, dot, declare_range=True)
        if isinstance(value, GoMap):
            value = value.items
        if isinstance(value, dict):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            items = [(i, i) for i in range(value)]
        elif value is None or value is MISSING:
            items = []
        else:
            raise TemplateExecError(f"range can't iterate over {go_string(value)}")
        if not items:
            if node.else_body is not None:
                self.walk_list(node.else_body, dot)
            return
        decl = node.pipe.decl
        mark = len(self.vars)
        for key, elem in items:
            if len(decl) == 1:
                self.vars.append([decl[0], elem])
            elif len(decl) == 2:
                self.vars.append([decl[0], key])
                self.vars.append([decl[1], elem])
            try:
                self.walk_list(node.body, elem)
            except _BreakSignal:
                break
            except _ContinueSignal:
                pass
            finally:
                del self.vars[mark:]

    def eval_pipe(self, pipe: Pipe, dot: Any, declare_range: bool = False) -> Any:
        value: Any = MISSING
        first = True
        for cmd in pipe.cmds:
            value = self.eval_command(cmd, dot, None if first else value, not first)
            first = False
        if pipe.decl and not declare_range:
            name = pipe.decl[0]
            if pipe.is_assign:
                self.set_var(name, value)
            else:
                self.vars.append([name, value])
        return value

    def eval_command(self, cmd: Command, dot: Any, final: Any, has_final: bool) -> Any:
        head = cmd.args[0]
        if isinstance(head, Ident):
            fn = self.funcs.get(head.name)
            if fn is None:
                raise TemplateExecError(f'function "{head.name}" not defined')
            if head.name in ("and", "or"):
                return self.eval_logic(head.name, cmd.args[1:], dot, final, has_final)
            args = [self.eval_arg(a, dot) for a in cmd.args[1:]]
            if has_final:
                args.append(final)
            try:
                return fn(*args)
            except TemplateExecError:
                raise
            except TypeError as exc:
                raise TemplateExecError(f"wrong arguments for {head.name}: {exc}") from None
        if len(cmd.args) > 1 or has_final:
            raise TemplateExecError(f"can't give argument to non-function {self._describe(head)}")
        return self.eval_arg(head, dot)

    def eval_logic(self, name: str, args: list[Any], dot: Any, final: Any, has_final: bool) -> Any:
        values: list[Callable[[], Any]] = [lambda a=a: self.eval_arg(a, dot) for a in args]
        if has_final:
            values.append(lambda: final)
        if not values:
            raise TemplateExecError(f"missing argument for {name}")
        result: Any = None
        for get in values:
            result = get()
            if name == "and" and not truth(result):
                return result
            if name == "or" and truth(result):
                return result
        return result

    def eval_arg(self, node: Any, dot: Any) -> Any:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Dot):
            return dot
        if isinstance(node, Field):
            return self.fields(dot, node.names)
        if isinstance(node, Variable):
            return self.fields(self.get_var(node.name), node.names)
        if isinstance(node, Pipe):
            return self.eval_pipe(node, dot)
        if isinstance(node, Chain):
            return self.fields(self.eval_arg(node.node, dot), node.names)
        if isinstance(node, Ident):
            fn = self.funcs.get(node.name)
            if fn is None:
                raise TemplateExecError(f'function "{node.name}" not defined')
            if node.name in ("and", "or"):
                raise TemplateExecError(f"missing argument for {node.name}")
            return fn()
        raise TemplateExecError(f"can't evaluate {node!r}")  # pragma: no cover

    def fields(self, value: Any, names: list[str]) -> Any:
        for name in names:
            if isinstance(value, GoStruct):
                if name not in value.fields:
                    raise TemplateExecError(f"can't evaluate field {name} in type {value.type_name}")
                value = value.fields[name]
            elif isinstance(value, GoMap):
                value = value.items.get(name, MISSING)
            elif isinstance(value, dict):
                value = value.get(name, MISSING)
            elif value is None or value is MISSING:
                raise TemplateExecError(f"nil pointer evaluating .{name}")
            else:
                raise TemplateExecError(f"can't evaluate field {name} in type {type(value).__name__}")
        return value

    def get_var(self, name: str) -> Any:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        raise TemplateExecError(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        raise TemplateExecError(f"undefined variable: {name}")

    @staticmethod
    def _describe(node: Any) -> str:
        if isinstance(node, Field):
            return "." + ".".join(node.names)
        if isinstance(node, Variable):
            return node.name
        return type(node).__name__


BUILTINS["and"] = lambda *a: a[-1]
BUILTINS["or"] = lambda *a: a[-1]
