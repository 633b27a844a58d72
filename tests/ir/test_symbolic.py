from __future__ import annotations

import pytest

from kiln.ir import symbolic as sym


def test_static_arithmetic_stays_int() -> None:
    assert sym.add(2, 3) == 5 and isinstance(sym.add(2, 3), int)
    assert sym.mul(4, 6) == 24
    assert sym.floordiv(7, 2) == 3
    assert sym.ceildiv(7, 2) == 4
    assert sym.prod([2, 3, 4]) == 24


def test_symbolic_expressions_simplify() -> None:
    n = sym.mul("batch", "seq")
    assert n == "batch*seq"
    total = sym.mul(n, 384)
    assert sym.floordiv(total, n) == 384
    assert sym.sub(sym.add("N", 1), "N") == 1
    assert sym.add("N", "N") == "2*N"


def test_floordiv_of_non_multiple_is_floor() -> None:
    d = sym.floordiv(sym.sub("H", 1), 2)
    assert isinstance(d, str) and "floor" in d
    assert sym.evaluate(d, {"H": 224}) == 111


def test_equal_decides_when_it_can() -> None:
    assert sym.equal("N", "N") is True
    assert sym.equal(sym.add("N", 0), "N") is True
    assert sym.equal("N", 3) is None
    assert sym.equal(3, 4) is False


def test_names_that_sympy_would_misread_are_plain_symbols() -> None:
    # N, E, S, I, beta, pi mean special things to sympy; as dims they must be plain symbols.
    for name in ["N", "E", "S", "I", "Q", "pi", "beta"]:
        assert sym.mul(name, 2) == f"2*{name}"
        assert sym.evaluate(sym.mul(name, 2), {name: 5}) == 10


def test_sanitize() -> None:
    assert sym.sanitize("batch size") == "batch_size"
    assert sym.sanitize("1st") == "d_1st"
    assert sym.sanitize("seq-len") == "seq_len"
    assert sym.sanitize("floor") == "floor_"


def test_evaluate_names_the_missing_symbol() -> None:
    with pytest.raises(KeyError, match="seq"):
        sym.evaluate(sym.mul("batch", "seq"), {"batch": 2})


def test_symbols() -> None:
    assert sym.symbols(3) == set()
    assert sym.symbols("N") == {"N"}
    assert sym.symbols(sym.mul("a", sym.add("b", 1))) == {"a", "b"}
