"""The built-in integer-arithmetic word-problem generator behind ``arith:<level>[:<count>[:<seed>]]``.

:func:`generate_arith` makes ``count`` distinct questions of one difficulty level (:data:`ARITH_LEVELS`),
deterministically from a seed, with exact nonnegative integer answers; :func:`parse_arith_spec` reads the
spec string. :func:`spine_ttrl.data.load_examples` calls both, and :mod:`spine_ttrl.data` re-exports them
(``spine_ttrl.data.generate_arith`` keeps working). Each level is a few templates below: one function per
template draws its numbers from the shared ``random.Random`` and returns ``(prompt, answer)``, or None when
a draw breaks a constraint (a negative or inexact result), in which case the generator draws again.

Questions come out as :class:`~spine_ttrl.example.Example` and errors as
:class:`~spine_ttrl.example.DataError` (also importable from :mod:`spine_ttrl.data`).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from .example import DataError, Example

__all__ = ["ARITH_LEVELS", "ARITH_USAGE", "parse_arith_spec", "generate_arith"]

ARITH_LEVELS = {
    1: "one-step bare (What is 37 + 48?)",
    2: "one-step word problem (+, -, x, exact /)",
    3: "two-step bare (What is 12 + 7 * 3?)",
    4: "two-step word problem",
    5: "three-step word problem",
}
"""Difficulty levels of :func:`generate_arith`."""

ARITH_USAGE = "arith:<level>[:<count>[:<seed>]]"


def parse_arith_spec(spec: str) -> tuple[int, int, int]:
    """``arith:<level>[:<count>[:<seed>]]`` -> (level, count, seed); count defaults to 200, seed to 0."""
    parts = spec.split(":")
    if parts[0] != "arith" or not 2 <= len(parts) <= 4:
        raise DataError(f"bad arith spec {spec!r}: expected {ARITH_USAGE}")
    values = []
    for what, text in zip(("level", "count", "seed"), parts[1:]):
        try:
            values.append(int(text))
        except ValueError:
            raise DataError(f"bad arith spec {spec!r}: {what} must be an integer, got {text!r}; expected {ARITH_USAGE}") from None
    level, count, seed = values + [200, 0][len(values) - 1 :]
    if level not in ARITH_LEVELS:
        raise DataError(f"bad arith spec {spec!r}: {_unknown_level(level)}")
    if count < 1:
        raise DataError(f"bad arith spec {spec!r}: count must be >= 1, got {count}")
    return level, count, seed


def _unknown_level(level: int) -> str:
    return f"unknown level {level}; levels: " + "; ".join(f"{k} = {v}" for k, v in ARITH_LEVELS.items())


def generate_arith(level: int, count: int = 200, seed: int = 0) -> list[Example]:
    """``count`` distinct integer-arithmetic questions of difficulty ``level`` (see ARITH_LEVELS).

    Deterministic given (level, count, seed): one ``random.Random(seed)`` draws every number. Answers are
    nonnegative integers written as strings; ids read ``arith<level>-<seed>-<index:04d>``. Bare levels
    (1, 3) are ``What is <expression>?`` with ``+ - * /`` and the usual precedence; ``/`` is always exact.
    """
    if level not in ARITH_LEVELS:
        raise DataError(_unknown_level(level))
    if count < 1:
        raise DataError(f"arith: count must be >= 1, got {count}")
    rng = random.Random(seed)
    makers = _ARITH_MAKERS[level]
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0  # consecutive draws that gave nothing new: many in a row means the level is used up
    while len(out) < count:
        if misses > 20_000:
            raise DataError(f"arith: could only make {len(out)} distinct level-{level} questions, {count} asked")
        made = rng.choice(makers)(rng)
        if made is None or made[0] in seen:  # a broken constraint (negative, inexact) or a repeat
            misses += 1
            continue
        misses = 0
        prompt, answer = made
        assert answer >= 0 and isinstance(answer, int), (prompt, answer)
        seen.add(prompt)
        out.append(Example(prompt=prompt, answer=str(answer), id=f"arith{level}-{seed}-{len(out):04d}"))
    return out


# ------------------------------------------------------------------------------------------ level templates
Made = tuple[str, int] | None  # (prompt, answer), or None when a draw broke a constraint
_NAMES = ("Tom", "Sara", "Ana", "Liam", "Mia", "Ben", "Noah", "Emma", "Omar", "Lena", "Ravi", "Yuki")
_ITEMS = ("apples", "marbles", "stickers", "cookies", "pencils", "shells", "cards", "stamps")


def _people(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_NAMES, k)


# Level 1: one step, bare, + and - on two-digit numbers.
def _l1(rng: random.Random) -> Made:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", a - b


# Level 2: one step, in words.
def _l2_add(rng):
    (n,), item, a, b = _people(rng, 1), rng.choice(_ITEMS), rng.randint(5, 60), rng.randint(5, 60)
    return f"{n} has {a} {item} and buys {b} more. How many {item} does {n} have now?", a + b


def _l2_total(rng):
    item, a, b = rng.choice(_ITEMS), rng.randint(5, 60), rng.randint(5, 60)
    return f"There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in total?", a + b


def _l2_sub(rng):
    (n, m), item, a, b = _people(rng, 2), rng.choice(_ITEMS), rng.randint(10, 90), rng.randint(2, 60)
    if b > a:
        return None
    return f"{n} has {a} {item} and gives {b} of them to {m}. How many {item} does {n} have left?", a - b


def _l2_mul(rng):
    (n,), item, a, b = _people(rng, 1), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(2, 12)
    return f"{n} buys {a} bags of {item} with {b} {item} in each bag. How many {item} does {n} buy?", a * b


def _l2_div(rng):
    (n,), item, k, q = _people(rng, 1), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(2, 12)
    return f"{n} shares {k * q} {item} equally among {k} friends. How many {item} does each friend get?", q


# Level 3: two steps, bare, with precedence and brackets.
def _l3(rng: random.Random) -> Made:
    big = lambda: rng.randint(10, 99)  # noqa: E731
    small = lambda: rng.randint(2, 12)  # noqa: E731
    form = rng.randrange(8)
    if form == 0:
        a, b, c = big(), small(), small()
        return f"What is {a} + {b} * {c}?", a + b * c
    if form == 1:
        a, b, c = small(), small(), big()
        return f"What is {a} * {b} + {c}?", a * b + c
    if form == 2:
        a, b, c = small(), small(), big()
        return (f"What is {a} * {b} - {c}?", a * b - c) if a * b >= c else None
    if form == 3:
        a, b, c = big(), rng.randint(2, 9), rng.randint(2, 9)
        return (f"What is {a} - {b} * {c}?", a - b * c) if a >= b * c else None
    if form == 4:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        return f"What is ({a} + {b}) * {c}?", (a + b) * c
    if form == 5:
        a, b, c = big(), big(), big()
        return (f"What is ({a} - {b}) + {c}?", a - b + c) if a >= b else None
    if form == 6:
        a, b, c = big(), big(), big()
        return (f"What is {a} + {b} - {c}?", a + b - c) if a + b >= c else None
    c, q = rng.randint(2, 9), rng.randint(2, 20)
    a = rng.randint(1, c * q - 1)
    return f"What is ({a} + {c * q - a}) / {c}?", q


# Level 4: two steps, in words.
def _l4_buy_bags(rng):
    (n,), item = _people(rng, 1), rng.choice(_ITEMS)
    a, b, c = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12)
    return (f"{n} has {a} {item}. {n} buys {b} bags with {c} {item} in each bag. "
            f"How many {item} does {n} have now?"), a + b * c


def _l4_give_twice(rng):
    (n, m, k), item = _people(rng, 3), rng.choice(_ITEMS)
    a, b, c = rng.randint(20, 99), rng.randint(2, 40), rng.randint(2, 40)
    if b + c > a:
        return None
    return (f"{n} had {a} {item}. {n} gave {b} {item} to {m} and {c} {item} to {k}. "
            f"How many {item} does {n} have left?"), a - b - c


def _l4_change(rng):
    (n,), a, b, c = _people(rng, 1), rng.randint(2, 9), rng.randint(2, 12), rng.choice((20, 50, 100))
    if a * b > c:
        return None
    return (f"{n} buys {a} notebooks at {b} dollars each and pays with a {c}-dollar bill. "
            f"How many dollars of change does {n} get?"), c - a * b


def _l4_trays(rng):
    a, b, c = rng.randint(2, 9), rng.randint(4, 12), rng.randint(2, 60)
    if c > a * b:
        return None
    return (f"A baker makes {a} trays of muffins with {b} muffins on each tray and sells {c} of them. "
            f"How many muffins are left?"), a * b - c


def _l4_pool_share(rng):
    (n, m), item, k, q = _people(rng, 2), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(2, 15)
    a = rng.randint(2, k * q - 2)  # k * q >= 4: both people hold at least 2
    return (f"{n} has {a} {item} and {m} has {k * q - a} {item}. They put them together and share them "
            f"equally among {k} children. How many {item} does each child get?"), q


# Level 5: three steps, in words.
def _l5_buy_give(rng):
    (n, m), item = _people(rng, 2), rng.choice(_ITEMS)
    a, b, c, d = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 60)
    if d > a + b * c:
        return None
    return (f"{n} has {a} {item}. {n} buys {b} bags with {c} {item} in each bag, then gives {d} {item} "
            f"to {m}. How many {item} does {n} have now?"), a + b * c - d


def _l5_trays(rng):
    a, b, c, d = rng.randint(2, 9), rng.randint(4, 12), rng.randint(2, 40), rng.randint(2, 40)
    if c + d > a * b:
        return None
    return (f"A baker makes {a} trays of muffins with {b} muffins on each tray. The baker sells {c} muffins "
            f"in the morning and {d} in the afternoon. How many muffins are left?"), a * b - c - d


def _l5_wages(rng):
    (n,), a, b, c, d = _people(rng, 1), rng.randint(5, 15), rng.randint(2, 8), rng.randint(2, 8), rng.randint(5, 99)
    if d > a * (b + c):
        return None
    return (f"{n} earns {a} dollars per hour, works {b} hours on Monday and {c} hours on Tuesday, then "
            f"spends {d} dollars on a book. How many dollars of these earnings does {n} have left?"), a * (b + c) - d


def _l5_share_more(rng):
    (n, m), item, k, q, d = _people(rng, 2), rng.choice(_ITEMS), rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 20)
    a = rng.randint(2, k * q - 2)  # k * q >= 4: both people hold at least 2
    return (f"{n} has {a} {item} and {m} has {k * q - a} {item}. They share all of them equally among {k} "
            f"friends, and then each friend finds {d} more. How many {item} does each friend have now?"), q + d


def _l5_two_packs(rng):
    (n,), a, b, c, d = _people(rng, 1), rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    return (f"{n} buys {a} packs of pens with {b} pens in each pack and {c} boxes of pencils with {d} "
            f"pencils in each box. How many pens and pencils does {n} buy in total?"), a * b + c * d


_ARITH_MAKERS: dict[int, tuple[Callable[[random.Random], Any], ...]] = {
    1: (_l1,),
    2: (_l2_add, _l2_total, _l2_sub, _l2_mul, _l2_div),
    3: (_l3,),
    4: (_l4_buy_bags, _l4_give_twice, _l4_change, _l4_trays, _l4_pool_share),
    5: (_l5_buy_give, _l5_trays, _l5_wages, _l5_share_more, _l5_two_packs),
}
