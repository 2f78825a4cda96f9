"""Lexer for Go ``text/template`` source: text and ``{{ actions }}`` -> tokens with line and column."""

from __future__ import annotations

from dataclasses import dataclass

SPACE = " \t\r\n"


class TemplateSyntaxError(ValueError):
    """A parse error; the message names the line and column."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(f"template syntax error at line {line}, column {col}: {message}")
        self.line = line
        self.col = col


@dataclass(frozen=True)
class Token:
    kind: str  # text, open, close, ident, field, var, string, number, char, bool, nil, pipe, lparen,
    #            rparen, declare, assign, comma, dot, eof
    value: str
    pos: int


class Lexer:
    def __init__(self, src: str) -> None:
        self.src = src
        self.tokens: list[Token] = []

    def where(self, pos: int) -> tuple[int, int]:
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return line, col

    def error(self, message: str, pos: int) -> TemplateSyntaxError:
        return TemplateSyntaxError(message, *self.where(pos))

    def run(self) -> list[Token]:
        src = self.src
        i = 0
        trim_next = False
        n = len(src)
        while i < n:
            start = src.find("{{", i)
            text_end = n if start == -1 else start
            text = src[i:text_end]
            if trim_next:
                text = text.lstrip(SPACE)
                trim_next = False
            if start == -1:
                if text:
                    self.tokens.append(Token("text", text, i))
                break
            j = start + 2
            if src.startswith("- ", j) or (src.startswith("-", j) and j + 1 < n and src[j + 1] in SPACE):
                text = text.rstrip(SPACE)
                j += 2
            if text:
                self.tokens.append(Token("text", text, i))
            # comment
            k = j
            while k < n and src[k] in SPACE:
                k += 1
            if src.startswith("/*", k):
                end = src.find("*/", k + 2)
                if end == -1:
                    raise self.error("unclosed comment", k)
                after = end + 2
                while after < n and src[after] in SPACE:
                    after += 1
                if src.startswith("-}}", after) and src[after - 1] in SPACE:
                    trim_next = True
                    i = after + 3
                elif src.startswith("}}", after):
                    i = after + 2
                else:
                    raise self.error("comment ends before closing delimiter", end)
                continue
            self.tokens.append(Token("open", "{{", start))
            i, trim_next = self._action(j)
        self.tokens.append(Token("eof", "", n))
        return self.tokens

    def _action(self, i: int) -> tuple[int, bool]:
        src, n = self.src, len(self.src)
        parens = 0
        while True:
            while i < n and src[i] in SPACE:
                i += 1
            if i >= n:
                raise self.error("unclosed action", i)
            if src.startswith("-}}", i) and src[i - 1] in SPACE:
                self.tokens.append(Token("close", "}}", i))
                return i + 3, True
            if src.startswith("}}", i):
                if parens:
                    raise self.error("unclosed left paren", i)
                self.tokens.append(Token("close", "}}", i))
                return i + 2, False
            c = src[i]
            if c == "|":
                self.tokens.append(Token("pipe", "|", i))
                i += 1
            elif c == "(":
                parens += 1
                self.tokens.append(Token("lparen", "(", i))
                i += 1
            elif c == ")":
                parens -= 1
                if parens < 0:
                    raise self.error("unexpected right paren", i)
                self.tokens.append(Token("rparen", ")", i))
                i += 1
            elif c == ",":
                self.tokens.append(Token("comma", ",", i))
                i += 1
            elif src.startswith(":=", i):
                self.tokens.append(Token("declare", ":=", i))
                i += 2
            elif c == "=":
                self.tokens.append(Token("assign", "=", i))
                i += 1
            else:
                i = self._operand(i)

    def _operand(self, i: int) -> int:
        """One operand of an action at ``i`` (a string, number, variable, field chain or word)."""
        src, n = self.src, len(self.src)
        c = src[i]
        if c == '"':
            i = self._quoted(i)
        elif c == "`":
            end = src.find("`", i + 1)
            if end == -1:
                raise self.error("unterminated raw quoted string", i)
            self.tokens.append(Token("string", src[i + 1:end], i))
            i = end + 1
        elif c == "'":
            end = i + 1
            while end < n and src[end] != "'":
                end += 2 if src[end] == "\\" else 1
            if end >= n:
                raise self.error("unterminated character constant", i)
            self.tokens.append(Token("char", _unquote(src[i + 1:end], self, i), i))
            i = end + 1
        elif c == "$":
            end = i + 1
            while end < n and (src[end].isalnum() or src[end] == "_"):
                end += 1
            self.tokens.append(Token("var", src[i:end], i))
            i = self._field_chain(end)
        elif c == ".":
            if i + 1 < n and (src[i + 1].isalpha() or src[i + 1] == "_"):
                i = self._field_chain(i, first=True)
            elif i + 1 < n and src[i + 1].isdigit():
                i = self._number(i)
            else:
                self.tokens.append(Token("dot", ".", i))
                i += 1
        elif c.isdigit() or (c in "+-" and i + 1 < n and (src[i + 1].isdigit() or src[i + 1] == ".")):
            i = self._number(i)
        elif c.isalpha() or c == "_":
            end = i
            while end < n and (src[end].isalnum() or src[end] == "_"):
                end += 1
            word = src[i:end]
            kind = "bool" if word in ("true", "false") else "nil" if word == "nil" else "ident"
            self.tokens.append(Token(kind, word, i))
            i = self._field_chain(end)
        else:
            raise self.error(f"unexpected {c!r} in action", i)
        return i

    def _field_chain(self, i: int, first: bool = False) -> int:
        """Fields like ``.A.B`` directly after a value (or on their own when ``first``)."""
        src, n = self.src, len(self.src)
        while i < n and src[i] == "." and i + 1 < n and (src[i + 1].isalpha() or src[i + 1] == "_"):
            end = i + 1
            while end < n and (src[end].isalnum() or src[end] == "_"):
                end += 1
            self.tokens.append(Token("field" if first else "chain", src[i + 1:end], i))
            first = False
            i = end
        return i

    def _number(self, i: int) -> int:
        src, n = self.src, len(self.src)
        end = i + 1
        while end < n and (src[end].isalnum() or src[end] in "._+-"):
            if src[end] in "+-" and src[end - 1] not in "eEpP":
                break
            end += 1
        self.tokens.append(Token("number", src[i:end], i))
        return end

    def _quoted(self, i: int) -> int:
        src, n = self.src, len(self.src)
        end = i + 1
        while end < n and src[end] != '"':
            if src[end] == "\n":
                raise self.error("unterminated quoted string", i)
            end += 2 if src[end] == "\\" else 1
        if end >= n:
            raise self.error("unterminated quoted string", i)
        self.tokens.append(Token("string", _unquote(src[i + 1:end], self, i), i))
        return end + 1


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v", "0": "\0"}


def _unquote(body: str, lexer: Lexer, pos: int) -> str:
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1] if i + 1 < len(body) else ""
        if nxt in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            digits = body[i + 2:i + 2 + width]
            try:
                out.append(chr(int(digits, 16)))
            except ValueError:
                raise lexer.error(f"invalid escape \\{nxt}{digits}", pos) from None
            i += 2 + width
        elif nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            raise lexer.error(f"unknown escape sequence \\{nxt}", pos)
    return "".join(out)
