"""The integer-arithmetic generator (spine_ttrl.arith): spec parsing, determinism, exact answers.

How ``load_examples("arith:...")`` reaches it, and its error messages through the loader, are tested in
test_data.py.
"""

import re
from fractions import Fraction

import pytest

from spine_ttrl.arith import ARITH_LEVELS, generate_arith, parse_arith_spec
from spine_ttrl.data import DataError


def test_arith_spec_parsing():
    assert parse_arith_spec("arith:2:300:7") == (2, 300, 7)
    assert parse_arith_spec("arith:3") == (3, 200, 0)
    assert parse_arith_spec("arith:1:50") == (1, 50, 0)


@pytest.mark.parametrize("level", sorted(ARITH_LEVELS))
def test_arith_determinism_count_distinct(level):
    a, b = generate_arith(level, 150, seed=3), generate_arith(level, 150, seed=3)
    assert a == b
    assert a != generate_arith(level, 150, seed=4)
    assert len(a) == 150 and len({e.prompt for e in a}) == 150 and len({e.id for e in a}) == 150
    assert generate_arith(level, 20, seed=3) == a[:20]  # count only stops the draw earlier
    for e in a:
        assert re.fullmatch(r"\d+", e.answer), e  # nonnegative integer
        assert e.choices is None


def _evaluate(expr: str) -> Fraction:
    """A small recursive-descent evaluator (+ - * / and brackets), independent of the generator."""
    tokens = re.findall(r"\d+|[-+*/()]", expr)
    assert "".join(tokens) == expr.replace(" ", "")
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            value = additive()
            assert tokens[pos] == ")"
            pos += 1
            return value
        return Fraction(int(tok))

    def term():
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] in "*/":
            op = tokens[pos]
            pos += 1
            value = value * atom() if op == "*" else value / atom()
        return value

    def additive():
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value

    result = additive()
    assert pos == len(tokens)
    return result


def test_evaluate_helper():
    assert _evaluate("12 + 7 * 3") == 33 and _evaluate("(45 - 17) + 26") == 54 and _evaluate("(7 + 57) / 8") == 8


@pytest.mark.parametrize("level, n_ops", [(1, 1), (3, 2)])
def test_arith_bare_answers_match_expression(level, n_ops):
    for e in generate_arith(level, 300, seed=11):
        m = re.fullmatch(r"What is (.+)\?", e.prompt)
        assert m, e.prompt
        expr = m.group(1)
        assert len(re.findall(r"[-+*/]", expr)) == n_ops, expr
        value = _evaluate(expr)
        assert value.denominator == 1 and value >= 0  # exact division, nonnegative
        assert e.answer == str(value.numerator), e
    if level == 1:
        assert all(re.fullmatch(r"What is \d\d [-+] \d\d\?", e.prompt) for e in generate_arith(1, 50))


def test_arith_unknown_level():
    with pytest.raises(DataError, match="levels: 1 = "):
        generate_arith(6)
    # Level 1 holds 90 * 90 sums + 90 * 91 / 2 differences = 12,195 questions.
    with pytest.raises(DataError, match="could only make .* distinct level-1 questions, 13000 asked"):
        generate_arith(1, 13_000)
