"""GBNF (llama.cpp's grammar format) → byte automaton.

The syntax is llama.cpp's (`grammars/README.md`, `src/llama-grammar.cpp`): rules `name ::= alternatives`,
names of letters, digits, `-` and `_`; terminals as "literals" (escapes `\\n \\r \\t \\\\ \\" \\[ \\] \\xHH
\\uHHHH \\UHHHHHHHH`), `[classes]` with ranges and `^` negation, `.` for any character; groups `( )`,
alternation `|`, repetition `* + ? {m} {m,} {m,n}` applied to the preceding symbol (a whole literal counts as
one); `#` comments. A rule ends at a newline unless inside parentheses or right after `|`. The start rule is
`root`. Token references (`<[id]>`, `<think>`, `!<...>`) are not supported: the automaton reads bytes, not
token ids. Undefined or duplicate rules, a missing root, and left recursion are compile errors.
"""

from __future__ import annotations

from nbllm.constrain.automaton import Automaton, content_key, deep_recursion
from nbllm.constrain.errors import SchemaError
from nbllm.constrain.ir import EMPTY, MAX_CODE_POINT, Node, Ref, Repeat, alt, char_set, complement_ranges, literal, seq

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def compile_grammar(gbnf: str) -> Automaton:
    """A grammar for the strings the GBNF grammar's `root` rule derives."""
    if not isinstance(gbnf, str):
        raise SchemaError(f"gbnf: expected the grammar text, got {type(gbnf).__name__}")
    with deep_recursion("gbnf"):
        rules = _Parser(gbnf).rules()
    return Automaton(rules, "root", key=content_key("gbnf", gbnf), what="gbnf")


def _is_name_char(c: str) -> bool:
    return len(c) == 1 and c.isascii() and (c.isalnum() or c in "-_")


class _Parser:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def error(self, message: str) -> SchemaError:
        line = self.s.count("\n", 0, self.i) + 1
        column = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        return SchemaError(f"gbnf line {line}, column {column}: {message}")

    def peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.s[j] if j < len(self.s) else ""

    def space(self, newlines: bool) -> None:
        """Skip blanks and comments (and newlines where the grammar allows them)."""
        while self.peek() and (self.peek() in " \t#" or (newlines and self.peek() in "\r\n")):
            if self.peek() == "#":
                while self.peek() and self.peek() not in "\r\n":
                    self.i += 1
            else:
                self.i += 1

    def rules(self) -> dict[str, Node]:
        rules: dict[str, Node] = {}
        self.space(newlines=True)
        while self.i < len(self.s):
            start = self.i
            name = self.name()
            self.space(newlines=False)
            if not self.s.startswith("::=", self.i):
                raise self.error("expecting '::='")
            self.i += 3
            self.space(newlines=True)
            body = self.alternatives(nested=False)
            if self.peek() and self.peek() not in "\r\n":
                raise self.error(f"unexpected {self.peek()!r}")
            if name in rules:
                self.i = start
                raise self.error(f"rule {name!r} is defined twice")
            rules[name] = body
            self.space(newlines=True)
        if "root" not in rules:
            raise SchemaError("gbnf: the grammar has no 'root' rule")
        return rules

    def name(self) -> str:
        start = self.i
        while _is_name_char(self.peek()):
            self.i += 1
        if self.i == start:
            raise self.error("expecting a rule name")
        return self.s[start:self.i]

    def alternatives(self, nested: bool) -> Node:
        options = [self.sequence(nested)]
        while self.peek() == "|":
            self.i += 1
            self.space(newlines=True)
            options.append(self.sequence(nested))
        return alt(*options)

    def sequence(self, nested: bool) -> Node:
        items: list[Node] = []
        while True:
            c = self.peek()
            if c == '"':
                self.i += 1
                items.append(self.literal())
            elif c == "[":
                self.i += 1
                items.append(char_set(self.char_class()))
            elif c == ".":
                self.i += 1
                items.append(char_set([(0, MAX_CODE_POINT)]))
            elif c == "(":
                self.i += 1
                self.space(newlines=True)
                items.append(self.alternatives(nested=True))
                if self.peek() != ")":
                    raise self.error("expecting ')'")
                self.i += 1
            elif _is_name_char(c):
                items.append(Ref(self.name()))
            elif c in ("*", "+", "?", "{"):
                if not items:
                    raise self.error(f"{c!r} has nothing before it to repeat")
                items[-1] = self.repeat(items[-1], nested)
            elif c == "<" or (c == "!" and self.peek(1) == "<"):
                raise self.error("token references (<...>) are not supported: constraints read bytes")
            else:
                break
            self.space(newlines=nested)
        return seq(*items) if items else EMPTY

    def repeat(self, item: Node, nested: bool) -> Node:
        c = self.peek()
        self.i += 1
        if c != "{":
            return Repeat(item, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
        self.space(nested)
        lo = self.integer()
        self.space(nested)
        hi: int | None = lo
        if self.peek() == ",":
            self.i += 1
            self.space(nested)
            hi = self.integer() if self.peek().isdigit() else None
            self.space(nested)
        if self.peek() != "}":
            raise self.error("expecting '}'")
        self.i += 1
        if hi is not None and hi < lo:
            raise self.error(f"repetition {{{lo},{hi}}} has max below min")
        return Repeat(item, lo, hi)

    def integer(self) -> int:
        start = self.i
        while self.peek().isascii() and self.peek().isdigit():
            self.i += 1
        if self.i == start:
            raise self.error("expecting an integer")
        return int(self.s[start:self.i])

    def char(self) -> int:
        """One code point of a literal or class, with escapes."""
        c = self.peek()
        if not c:
            raise self.error("unexpected end of grammar")
        self.i += 1
        if c != "\\":
            return ord(c)
        e = self.peek()
        self.i += 1
        if e in _ESCAPES:
            return ord(_ESCAPES[e])
        if e in _HEX_DIGITS:
            digits = self.s[self.i:self.i + _HEX_DIGITS[e]]
            if len(digits) != _HEX_DIGITS[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad \\{e} escape")
            self.i += len(digits)
            code = int(digits, 16)
            if code > MAX_CODE_POINT:
                raise self.error("code point out of range")
            return code
        raise self.error(f"unknown escape \\{e}")

    def literal(self) -> Node:
        chars = []
        while self.peek() != '"':
            if self.peek() in ("", "\n", "\r"):
                raise self.error("unterminated literal")
            chars.append(chr(self.char()))
        self.i += 1
        try:
            return literal("".join(chars))
        except UnicodeEncodeError:
            raise self.error("a literal holds a surrogate code point, which UTF-8 cannot encode") from None

    def char_class(self) -> list[tuple[int, int]]:
        negate = self.peek() == "^"
        self.i += negate
        ranges = []
        while self.peek() != "]":
            if not self.peek():
                raise self.error("unterminated character class")
            lo = self.char()
            hi = lo
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.char()
                if hi < lo:
                    raise self.error("character range is reversed")
            ranges.append((lo, hi))
        self.i += 1
        return complement_ranges(ranges) if negate else ranges
