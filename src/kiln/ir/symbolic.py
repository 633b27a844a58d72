"""Symbolic dimensions.

A dim is an `int` (static) or a `str` (symbolic): a name such as ``"batch"`` or an expression over names such as
``"2*seq + 1"``. Arithmetic on dims goes through sympy (already a torch dependency) so expressions simplify
(``batch*seq*384 / (batch*seq)`` is ``384``) and stay readable; results that are integers come back as ints.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

Dim = int | str

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FUNCS = {"floor", "ceiling", "Mod", "Max", "Min", "Abs"}


def sanitize(name: str) -> str:
    """A symbol name safe to use in expressions, close to the given one."""
    s = re.sub(r"[^A-Za-z0-9_]", "_", name.strip()) or "dim"
    if s[0].isdigit():
        s = "d_" + s
    if s in _FUNCS:
        s = s + "_"
    return s


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


@functools.lru_cache(maxsize=65536)
def _parse(expr: str) -> Any:
    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    names = {m for m in _IDENT.findall(expr) if m not in _FUNCS}
    local = {n: sympy.Symbol(n, integer=True, positive=True) for n in names}
    local.update({"floor": sympy.floor, "ceiling": sympy.ceiling, "Mod": sympy.Mod, "Max": sympy.Max,
                  "Min": sympy.Min, "Abs": sympy.Abs})
    return parse_expr(expr, local_dict=local, evaluate=True)


def _to_sym(d: Dim) -> Any:
    import sympy

    if isinstance(d, bool):
        raise TypeError("bool is not a dim")
    if isinstance(d, int):
        return sympy.Integer(d)
    return _parse(d)


def _from_sym(e: Any) -> Dim:

    if e.is_Integer:
        return int(e)
    if e.is_number:
        raise ValueError(f"dim expression is not an integer: {e}")
    return str(e).replace(" ", "")


def _binop(a: Dim, b: Dim, op: str) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "//":
            return a // b
        if op == "%":
            return a % b
        raise ValueError(op)
    return _sym_binop(a, b, op)


@functools.lru_cache(maxsize=65536)
def _sym_binop(a: Dim, b: Dim, op: str) -> Dim:
    import sympy

    x, y = _to_sym(a), _to_sym(b)
    if op == "+":
        r = x + y
    elif op == "-":
        r = x - y
    elif op == "*":
        r = x * y
    elif op == "//":
        q = sympy.cancel(x / y)
        r = q if q.is_polynomial() and _integral_coeffs(q) else sympy.floor(x / y)
    elif op == "%":
        r = sympy.Mod(x, y)
    else:
        raise ValueError(op)
    return _from_sym(r)


def _integral_coeffs(e: Any) -> bool:
    import sympy

    if e.is_number:
        return bool(e.is_Integer)
    try:
        return all(c.is_Integer for c in sympy.Poly(e).coeffs())
    except sympy.PolynomialError:
        return False


def add(a: Dim, b: Dim) -> Dim:
    return _binop(a, b, "+")


def sub(a: Dim, b: Dim) -> Dim:
    return _binop(a, b, "-")


def mul(a: Dim, b: Dim) -> Dim:
    return _binop(a, b, "*")


def floordiv(a: Dim, b: Dim) -> Dim:
    return _binop(a, b, "//")


def ceildiv(a: Dim, b: Dim) -> Dim:
    """ceil(a / b) for positive b."""
    return floordiv(add(a, sub(b, 1)), b)


def mod(a: Dim, b: Dim) -> Dim:
    return _binop(a, b, "%")


def prod(dims: Iterable[Dim]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def equal(a: Dim, b: Dim) -> bool | None:
    """True/False when decidable, None when it depends on symbol values."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    diff = sub(a, b)
    if isinstance(diff, int):
        return diff == 0
    return None


def evaluate(d: Dim, bindings: dict[str, int]) -> int:
    """The value of a dim once its symbols are bound; raises KeyError naming a missing symbol."""
    if isinstance(d, int):
        return d
    if d in bindings:
        return bindings[d]
    e = _parse(d)
    missing = [str(s) for s in e.free_symbols if str(s) not in bindings]
    if missing:
        raise KeyError(missing[0])
    v = e.subs({s: bindings[str(s)] for s in e.free_symbols})
    return int(v)


def symbols(d: Dim) -> set[str]:
    if isinstance(d, int):
        return set()
    if _IDENT.fullmatch(d):
        return {d}
    return {str(s) for s in _parse(d).free_symbols}
