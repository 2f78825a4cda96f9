"""A Go ``text/template`` renderer for Ollama's prompt templates.

    tmpl = GoTemplate(source)          # raises TemplateSyntaxError naming line and column
    text = tmpl.render({"Messages": [...], "System": "..."})
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

from app.engine.prompting.gotemplate.executor import Executor
from app.engine.prompting.gotemplate.values import MISSING, GoMap, GoStruct, TemplateExecError, go_json, go_string
from app.engine.prompting.gotemplate.lexer import TemplateSyntaxError
from app.engine.prompting.gotemplate.parser import (
    Action, Branch, Chain, Command, Field, ListNode, Pipe, Variable, parse,
)

__all__ = ["GoTemplate", "GoStruct", "GoMap", "TemplateSyntaxError", "TemplateExecError", "go_json", "go_string",
           "MISSING"]


class GoTemplate:
    def __init__(self, source: str, funcs: dict[str, Callable[..., Any]] | None = None,
                 tree: ListNode | None = None) -> None:
        self.source = source
        self.funcs = funcs or {}
        self.tree = tree if tree is not None else parse(source)

    def render(self, data: Any) -> str:
        return Executor(data, self.funcs).run(self.tree)

    def identifiers(self) -> set[str]:
        """Every field name the template mentions (``.Messages``, ``$.Tools``, ``(x).Role``...)."""
        names: set[str] = set()
        for node in _walk(self.tree):
            if isinstance(node, (Field, Variable, Chain)):
                names.update(node.names)
        return names

    def with_response_appended(self) -> "GoTemplate":
        """A copy with ``{{ .Response }}`` added at the end (Ollama does this for legacy templates
        that mention neither ``.Messages`` nor ``.Response``)."""
        tree = copy.deepcopy(self.tree)
        tree.nodes.append(Action(Pipe([], False, [Command([Field(["Response"])], len(self.source))],
                                      len(self.source))))
        return GoTemplate(self.source, self.funcs, tree)

    def cut_at_response(self) -> "GoTemplate":
        """A copy without everything after the first ``.Response`` field (Ollama's legacy last turn)."""
        tree = copy.deepcopy(self.tree)
        state = {"cut": False}
        _cut_list(tree, state)
        return GoTemplate(self.source, self.funcs, tree)


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, ListNode):
        for child in node.nodes:
            yield from _walk(child)
    elif isinstance(node, Action):
        yield from _walk(node.pipe)
    elif isinstance(node, Branch):
        yield from _walk(node.pipe)
        yield from _walk(node.body)
        if node.else_body is not None:
            yield from _walk(node.else_body)
    elif isinstance(node, Pipe):
        for cmd in node.cmds:
            yield from _walk(cmd)
    elif isinstance(node, Command):
        for arg in node.args:
            yield from _walk(arg)
    elif isinstance(node, Chain):
        yield from _walk(node.node)


def _is_response(node: Any) -> bool:
    return isinstance(node, Field) and "Response" in node.names


def _cut_list(lst: ListNode, state: dict[str, bool]) -> None:
    kept = []
    for child in lst.nodes:
        if state["cut"]:
            continue
        if _cut_node(child, state):
            kept.append(child)
    lst.nodes = kept


def _cut_node(node: Any, state: dict[str, bool]) -> bool:
    """Walk like Ollama's deleteNode: keep the node unless the cut already happened.

    Lists and branch bodies are walked (not branch conditions); inside an action the
    ``.Response`` field is kept and sets the cut, so only what comes after it disappears.
    """
    if isinstance(node, Branch):
        _cut_list(node.body, state)
        if node.else_body is not None:
            if state["cut"]:
                node.else_body = None
            else:
                _cut_list(node.else_body, state)
        return True
    if isinstance(node, Action):
        for cmd in node.pipe.cmds:
            for arg in cmd.args:
                if _is_response(arg):
                    state["cut"] = True
        return True
    return True
