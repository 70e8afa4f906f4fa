"""Hand-computed tests for spine_ttrl.evaluate."""

import math
from itertools import combinations

import pytest

from spine_ttrl.evaluate import avg_at_k, maj_at_k, mean_and_stderr, pass_at_k


def test_pass_at_k_hand():
    # n=4, c=1, k=2: 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # pass@1 = c/n
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n − c < k: every subset has a correct sample
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    # n=5, c=2, k=3: 1 − C(3,3)/C(5,3) = 1 − 1/10 = 0.9
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([1] * c + [0] * (n - c), k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_bad_input():
    for args in [(0, 0, 1), (3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_maj_at_k():
    answers = ["3", "4", "\\frac{8}{2}", "3", "4.0"]
    # all five: cluster "4" = {4, \frac{8}{2}, 4.0} has 3 votes -> label 4
    assert maj_at_k(answers, "4") == 1.0
    assert maj_at_k(answers, "3") == 0.0
    # first 1: "3"
    assert maj_at_k(answers, "3", k=1) == 1.0
    # first 4: clusters "3" (2 votes) and "4" (2 votes) tie -> "3" appeared first
    assert maj_at_k(answers, "3", k=4) == 1.0
    assert maj_at_k([None, None], "3") == 0.0
    assert maj_at_k(["3"], None) == 0.0
    assert maj_at_k(["b", "B", "c"], "B", task="choice") == 1.0
    with pytest.raises(ValueError):
        maj_at_k(answers, "3", k=6)


def test_avg_at_k_and_stderr():
    assert avg_at_k([True, False, False, True]) == 0.5
    # values [1, 0, 0, 1]: mean 0.5, sample var = 4·0.25/3 = 1/3, stderr = sqrt(1/3 / 4) = 0.288675
    mean, se = mean_and_stderr([1, 0, 0, 1])
    assert mean == 0.5 and se == pytest.approx(0.288675, abs=1e-6)
    mean, se = mean_and_stderr([0.7])
    assert mean == 0.7 and math.isnan(se)
    with pytest.raises(ValueError):
        mean_and_stderr([])
