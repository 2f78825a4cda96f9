"""Executor for parsed Go templates: walks the tree with Go's scoping, ``range``/``with``/``if`` and pipes."""

from __future__ import annotations

from typing import Any, Callable

from app.engine.prompting.gotemplate.builtins import BUILTINS
from app.engine.prompting.gotemplate.parser import (
    Action, Branch, Break, Chain, Command, Continue, Dot, Field, Ident, ListNode, Literal, Pipe, Text, Variable,
)
from app.engine.prompting.gotemplate.values import (
    MISSING, GoMap, GoStruct, TemplateExecError, _BreakSignal, _ContinueSignal, go_string, truth,
)


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
