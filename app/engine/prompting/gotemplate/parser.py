"""Parser for Go ``text/template``: tokens -> a small tree of nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.engine.prompting.gotemplate.lexer import Lexer, Token


# -- nodes -------------------------------------------------------------------------------
@dataclass
class Text:
    text: str


@dataclass
class Field:
    """``.A.B`` on dot."""

    names: list[str]


@dataclass
class Variable:
    """``$x.A.B`` (``$`` alone is the root)."""

    name: str
    names: list[str] = field(default_factory=list)


@dataclass
class Ident:
    """A function name."""

    name: str
    pos: int


@dataclass
class Literal:
    value: Any


@dataclass
class Dot:
    pass


@dataclass
class Chain:
    """``(pipeline).A.B``."""

    node: Any
    names: list[str]


@dataclass
class Command:
    args: list[Any]
    pos: int


@dataclass
class Pipe:
    decl: list[str]
    is_assign: bool
    cmds: list[Command]
    pos: int


@dataclass
class Action:
    pipe: Pipe


@dataclass
class ListNode:
    nodes: list[Any] = field(default_factory=list)


@dataclass
class Branch:
    kind: str  # if / range / with
    pipe: Pipe
    body: ListNode
    else_body: ListNode | None


@dataclass
class Break:
    pass


@dataclass
class Continue:
    pass


class Parser:
    def __init__(self, src: str) -> None:
        self.lexer = Lexer(src)
        self.tokens = self.lexer.run()
        self.i = 0
        self.range_depth = 0

    # -- token helpers ---------------------------------------------------------------
    def peek(self, offset: int = 0) -> Token:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, what: str) -> Token:
        tok = self.next()
        if tok.kind != kind:
            raise self.lexer.error(f"expected {what}, found {tok.value or tok.kind!r}", tok.pos)
        return tok

    # -- structure ---------------------------------------------------------------------
    def parse(self) -> ListNode:
        body, end = self.parse_list(top=True)
        return body

    def parse_list(self, top: bool = False) -> tuple[ListNode, str]:
        """Parse until ``{{end}}`` / ``{{else}}`` (returned as the terminator) or EOF."""
        out = ListNode()
        while True:
            tok = self.peek()
            if tok.kind == "eof":
                if not top:
                    raise self.lexer.error("unexpected EOF: missing {{end}}", tok.pos)
                return out, "eof"
            if tok.kind == "text":
                self.next()
                out.nodes.append(Text(tok.value))
                continue
            self.expect("open", "{{")
            word = self.peek()
            if word.kind == "ident" and word.value in ("end", "else"):
                if top:
                    raise self.lexer.error(f"unexpected {{{{{word.value}}}}}", word.pos)
                self.next()
                return out, word.value
            if word.kind == "ident" and word.value in ("if", "range", "with"):
                self.next()
                out.nodes.append(self.parse_branch(word.value, word.pos))
                continue
            if word.kind == "ident" and word.value in ("break", "continue"):
                self.next()
                if not self.range_depth:
                    raise self.lexer.error(f"{{{{{word.value}}}}} outside {{{{range}}}}", word.pos)
                self.expect("close", "}}")
                out.nodes.append(Break() if word.value == "break" else Continue())
                continue
            if word.kind == "ident" and word.value in ("define", "template", "block"):
                raise self.lexer.error(f"{{{{{word.value}}}}} is not supported", word.pos)
            out.nodes.append(Action(self.parse_pipe(word.pos, allow_decl=True)))
            self.expect("close", "}}")

    def parse_branch(self, kind: str, pos: int) -> Branch:
        pipe = self.parse_pipe(pos, allow_decl=True, range_decl=kind == "range")
        self.expect("close", "}}")
        if kind == "range":
            self.range_depth += 1
        body, end = self.parse_list()
        if kind == "range":
            self.range_depth -= 1
        else_body = None
        if end == "else":
            nxt = self.peek()
            if nxt.kind == "ident" and nxt.value in ("if", "with") and kind in ("if", "with"):
                # {{else if ...}} / {{else with ...}}: a nested branch that shares our {{end}}
                self.next()
                else_body = ListNode([self.parse_branch(nxt.value, nxt.pos)])
            else:
                self.expect("close", "}}")
                else_body, end = self.parse_list()
                if end != "end":
                    raise self.lexer.error("expected {{end}}", self.peek().pos)
                self.expect("close", "}}")
        else:
            self.expect("close", "}}")
        return Branch(kind, pipe, body, else_body)

    def parse_pipe(self, pos: int, allow_decl: bool = False, range_decl: bool = False) -> Pipe:
        decl: list[str] = []
        is_assign = False
        if allow_decl and self.peek().kind == "var":
            j = 0
            names = []
            while self.peek(j).kind == "var" and self.peek(j + 1).kind in ("comma", "declare", "assign"):
                names.append(self.peek(j).value)
                kind = self.peek(j + 1).kind
                j += 2
                if kind != "comma":
                    if len(names) > (2 if range_decl else 1):
                        raise self.lexer.error("too many declarations", self.peek().pos)
                    decl, is_assign = names, kind == "assign"
                    self.i += j
                    break
        cmds = []
        while True:
            cmds.append(self.parse_command())
            if self.peek().kind == "pipe":
                self.next()
                continue
            break
        return Pipe(decl, is_assign, cmds, pos)

    def parse_command(self) -> Command:
        start = self.peek()
        args: list[Any] = []
        while self.peek().kind not in ("close", "pipe", "rparen", "eof"):
            args.append(self.parse_operand())
        if not args:
            raise self.lexer.error("missing value for command", start.pos)
        return Command(args, start.pos)

    def parse_operand(self) -> Any:
        tok = self.next()
        node: Any
        if tok.kind == "field":
            names = [tok.value]
            while self.peek().kind == "chain":
                names.append(self.next().value)
            return Field(names)
        if tok.kind == "var":
            names = []
            while self.peek().kind == "chain":
                names.append(self.next().value)
            return Variable(tok.value, names)
        if tok.kind == "ident":
            node = Ident(tok.value, tok.pos)
        elif tok.kind == "string":
            node = Literal(tok.value)
        elif tok.kind == "char":
            node = Literal(ord(tok.value) if tok.value else 0)
        elif tok.kind == "bool":
            node = Literal(tok.value == "true")
        elif tok.kind == "nil":
            node = Literal(None)
        elif tok.kind == "number":
            node = Literal(self._number(tok))
        elif tok.kind == "dot":
            node = Dot()
        elif tok.kind == "lparen":
            pipe = self.parse_pipe(tok.pos)
            self.expect("rparen", ")")
            node = pipe
        else:
            raise self.lexer.error(f"unexpected {tok.value or tok.kind!r}", tok.pos)
        names = []
        while self.peek().kind == "chain":
            names.append(self.next().value)
        return Chain(node, names) if names else node

    def _number(self, tok: Token) -> int | float:
        text = tok.value.replace("_", "")
        try:
            return int(text, 0)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise self.lexer.error(f"bad number syntax: {tok.value}", tok.pos) from None


def parse(src: str) -> ListNode:
    return Parser(src).parse()
