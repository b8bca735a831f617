"""A small safe evaluator for the conversion and condition expressions of mioty Blueprints.
No eval and no JavaScript engine: a tokenizer, a precedence-climbing parser and a tree walker with hard limits."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

__all__ = ["MAX_SOURCE", "Expr", "ExprError", "compile_expr"]

MAX_SOURCE = 1000  # characters; blueprint functions are one-liners
_MAX_DEPTH = 32  # nesting of parentheses, unary operators and conditionals while parsing
_MAX_TREE = 100  # depth of the parsed tree (a long chain like 1+1+1+... is left-deep)
_MAX_INT_BITS = 256  # an integer result beyond this is an error, not a slow bignum
_MAX_SHIFT = 256

Number = int | float | bool

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ref>\$[A-Za-z_][A-Za-z0-9_]*|\$)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>>>>|===|!==|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^~!<>?:(),])
    )""",
    re.VERBOSE,
)

# Binary operators by precedence, lowest first (as in JavaScript).
_LEVELS: tuple[tuple[str, ...], ...] = (
    ("||",),
    ("&&",),
    ("|",),
    ("^",),
    ("&",),
    ("==", "!=", "===", "!=="),
    ("<", "<=", ">", ">="),
    ("<<", ">>", ">>>"),
    ("+", "-"),
    ("*", "/", "%"),
)
_PRECEDENCE = {op: i for i, ops in enumerate(_LEVELS) for op in ops}


class ExprError(ValueError):
    """An expression that cannot be parsed or evaluated; the message says why in one line."""


def _integer(value: Number, op: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if math.isfinite(value) and value == int(value):
        return int(value)
    raise ExprError(f"operator {op!r} needs whole numbers, got {value!r}")


def _checked(value: Number) -> Number:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise ExprError("integer result too large")
        return value
    if not math.isfinite(value):
        raise ExprError("result is not a finite number")
    return value


def _div(a: Number, b: Number) -> Number:
    if b == 0:
        raise ExprError("division by zero")
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and a % b == 0:
        return a // b
    try:
        return a / b
    except OverflowError:
        raise ExprError("result is not a finite number") from None


def _mod(a: Number, b: Number) -> Number:
    if b == 0:
        raise ExprError("division by zero")
    if isinstance(a, float) or isinstance(b, float):
        return math.fmod(a, b)
    rest = abs(a) % abs(b)  # JavaScript: the sign of the dividend
    return -rest if a < 0 else rest


def _shift_left(a: Number, b: Number) -> int:
    count = _integer(b, "<<")
    if not 0 <= count <= _MAX_SHIFT:
        raise ExprError(f"shift by {count} is out of range")
    return _integer(a, "<<") << count


def _shift_right(a: Number, b: Number) -> int:
    count = _integer(b, ">>")
    if not 0 <= count <= _MAX_SHIFT:
        raise ExprError(f"shift by {count} is out of range")
    return _integer(a, ">>") >> count


def _shift_right_unsigned(a: Number, b: Number) -> int:
    # JavaScript's >>> works on 32-bit unsigned values.
    return (_integer(a, ">>>") & 0xFFFFFFFF) >> (_integer(b, ">>>") & 31)


_BINARY: dict[str, Callable[[Number, Number], Number]] = {
    "|": lambda a, b: _integer(a, "|") | _integer(b, "|"),
    "^": lambda a, b: _integer(a, "^") ^ _integer(b, "^"),
    "&": lambda a, b: _integer(a, "&") & _integer(b, "&"),
    "==": lambda a, b: a == b,
    "===": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "!==": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<<": _shift_left,
    ">>": _shift_right,
    ">>>": _shift_right_unsigned,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": _div,
    "%": _mod,
}


def _round(value: Number, digits: Number = 0) -> Number:
    n = _integer(digits, "round")
    if not 0 <= n <= 15:
        raise ExprError("round: digits must be 0..15")
    return round(value, n) if n else math.floor(value + 0.5)


def _finite(value: Number, name: str) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise ExprError(f"{name}: argument is not a finite number")
    return value


_FUNCTIONS: dict[str, tuple[int, int, Callable[..., Number]]] = {
    # name: (fewest arguments, most arguments, function)
    "abs": (1, 1, abs),
    "min": (1, 8, min),
    "max": (1, 8, max),
    "round": (1, 2, _round),
    "floor": (1, 1, lambda x: math.floor(_finite(x, "floor"))),
    "ceil": (1, 1, lambda x: math.ceil(_finite(x, "ceil"))),
    "trunc": (1, 1, lambda x: math.trunc(_finite(x, "trunc"))),
}
_CONSTANTS: dict[str, Number] = {"true": True, "false": False}


# The parsed tree: tuples, tagged by their first element.
Node = tuple[Any, ...]


@attrs.frozen
class Expr:
    """A parsed expression; `evaluate` runs it against the values it may reference."""

    source: str
    tree: Node = attrs.field(repr=False)
    references: frozenset[str]
    """Names referenced as $name ("" stands for the bare `$`, the field's own raw value)."""

    def evaluate(self, values: Mapping[str, Number]) -> Number:
        """The expression's value; ExprError for an unknown reference or an arithmetic problem."""
        return _checked(_evaluate(self.tree, values))


def _evaluate(node: Node, values: Mapping[str, Number]) -> Number:
    kind = node[0]
    if kind == "num":
        return node[1]  # type: ignore[no-any-return]
    if kind == "ref":
        name = node[1]
        if name not in values:
            raise ExprError(f"${name} is not known here" if name else "$ has no value here")
        return values[name]
    if kind == "unary":
        value = _evaluate(node[2], values)
        op = node[1]
        if op == "-":
            return _checked(-value)
        if op == "+":
            return value
        if op == "!":
            return not value
        return ~_integer(value, "~")
    if kind == "binary":
        op = node[1]
        left = _evaluate(node[2], values)
        if op == "&&":
            return bool(left) and bool(_evaluate(node[3], values))
        if op == "||":
            return bool(left) or bool(_evaluate(node[3], values))
        right = _evaluate(node[3], values)
        try:
            return _checked(_BINARY[op](left, right))
        except OverflowError:
            raise ExprError("result is not a finite number") from None
    if kind == "cond":
        return _evaluate(node[2] if _evaluate(node[1], values) else node[3], values)
    # call
    name, args = node[1], [_evaluate(a, values) for a in node[2]]
    try:
        return _checked(_FUNCTIONS[name][2](*args))
    except (OverflowError, ValueError) as e:
        if isinstance(e, ExprError):
            raise
        raise ExprError(f"{name}: {e}") from None


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = self._tokenize(source)
        self.pos = 0
        self.depth = 0
        self.refs: set[str] = set()

    @staticmethod
    def _tokenize(source: str) -> list[tuple[str, str]]:
        tokens = []
        pos = 0
        end = len(source.rstrip())
        while pos < end:
            match = _TOKEN.match(source, pos)
            if match is None or match.end() == pos:
                raise ExprError(f"unexpected character {source[pos:].lstrip()[:1]!r} at {pos}")
            kind = match.lastgroup
            assert kind is not None
            tokens.append((kind, match.group(kind)))
            pos = match.end()
        return tokens

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, op: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ExprError("the expression ends too early" + (f" (expected {op!r})" if op else ""))
        if op is not None and token != ("op", op):
            raise ExprError(f"expected {op!r}, found {token[1]!r}")
        self.pos += 1
        return token

    def parse(self) -> Node:
        if not self.tokens:
            raise ExprError("empty expression")
        node = self.expression()
        token = self.peek()
        if token is not None:
            raise ExprError(f"unexpected {token[1]!r}")
        return node

    def expression(self) -> Node:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ExprError("expression nested too deeply")
        node = self.binary(0)
        if self.peek() == ("op", "?"):
            self.take()
            yes = self.expression()
            self.take(":")
            node = ("cond", node, yes, self.expression())
        self.depth -= 1
        return node

    def binary(self, level: int) -> Node:
        if level == len(_LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while True:
            token = self.peek()
            if token is None or token[0] != "op" or token[1] not in _LEVELS[level]:
                return node
            self.take()
            node = ("binary", token[1], node, self.binary(level + 1))

    def unary(self) -> Node:
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] in ("-", "+", "!", "~"):
            self.take()
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise ExprError("expression nested too deeply")
            node = ("unary", token[1], self.unary())
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> Node:
        kind, text = self.take()
        if kind == "num":
            return ("num", _number(text))
        if kind == "ref":
            name = text[1:]
            name = "" if name == "value" else name
            self.refs.add(name)
            return ("ref", name)
        if kind == "name":
            if text in _CONSTANTS:
                return ("num", _CONSTANTS[text])
            text = text.removeprefix("Math_")
            if text not in _FUNCTIONS:
                raise ExprError(f"unknown name {text!r}")
            return self.call(text)
        if text == "(":
            node = self.expression()
            self.take(")")
            return node
        raise ExprError(f"unexpected {text!r}")

    def call(self, name: str) -> Node:
        self.take("(")
        args = []
        if self.peek() != ("op", ")"):
            args.append(self.expression())
            while self.peek() == ("op", ","):
                self.take()
                args.append(self.expression())
        self.take(")")
        low, high, _ = _FUNCTIONS[name]
        if not low <= len(args) <= high:
            raise ExprError(f"{name} takes {low}..{high} arguments, got {len(args)}")
        return ("call", name, tuple(args))


def _number(text: str) -> Number:
    lower = text.lower()
    if lower.startswith("0x"):
        return int(text, 16)
    if lower.startswith("0b"):
        return int(text[2:], 2)
    if any(c in lower for c in ".e"):
        value = float(text)
        if not math.isfinite(value):
            raise ExprError(f"number {text!r} is too large")
        return value
    if len(text) > 80:
        raise ExprError(f"number {text[:20]}… is too large")
    return int(text)


def _tree_depth(tree: Node) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node[2:] if node[0] in ("unary", "binary") else node[1:] if node[0] == "cond" else \
            node[2] if node[0] == "call" else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, tuple))
    return deepest


def compile_expr(source: str) -> Expr:
    """Parse `source` once: `$` (or `$value`) is the field's own raw value, `$name` an earlier field's value.
    Arithmetic (+ - * / %), bit operations (& | ^ ~ << >> >>>), comparisons, && || !, `a ? b : c`,
    abs/min/max/round/floor/ceil/trunc (also as Math.abs etc.). Raises ExprError with the reason."""
    if not isinstance(source, str):
        raise ExprError("an expression must be a string")
    if len(source) > MAX_SOURCE:
        raise ExprError(f"expression longer than {MAX_SOURCE} characters")
    parser = _Parser(source.replace("Math.", "Math_"))
    tree = parser.parse()
    if _tree_depth(tree) > _MAX_TREE:
        raise ExprError("expression nested too deeply")
    return Expr(source, tree, frozenset(parser.refs))
