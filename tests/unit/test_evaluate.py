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


# ---------------------------------------------------------------- per-source breakdown
def test_source_metrics_hand():
    from spine_ttrl.assessment import source_metrics

    recs = [{"source": "a", "greedy_correct": True, "samples_correct": 2, "maj_correct": True},
            {"source": "a", "greedy_correct": False, "samples_correct": 0, "maj_correct": False},
            {"source": "b/c", "greedy_correct": True, "samples_correct": 4, "maj_correct": True},
            {"source": "b/c"}]  # unlabelled: counted as a question, not in the accuracies
    m = source_metrics(recs, k=4)
    assert m["source/a/questions"] == 2 and m["source/b-c/questions"] == 2
    assert m["source/a/greedy_pass@1"] == 0.5 and m["source/a/greedy_pass@1_se"] == pytest.approx(0.5)  # s=0.7071, /√2
    assert m["source/a/avg@4"] == 0.25 and m["source/a/maj@4"] == 0.5
    assert m["source/b-c/greedy_pass@1"] == 1.0 and math.isnan(m["source/b-c/greedy_pass@1_se"])
    assert m["source/b-c/avg@4"] == 1.0 and m["source/b-c/maj@4"] == 1.0
    assert "source/a/avg@4" not in source_metrics(recs, k=0)  # greedy only
    assert source_metrics([{"source": "a", "greedy_correct": True}, {"greedy_correct": False}], k=0) == {}
    assert source_metrics([{"greedy_correct": True}], k=0) == {}


def test_evaluate_prompts_breaks_down_by_source():
    """Through evaluate_prompts with a scripted sampler: records carry their source, metrics per source."""
    from types import SimpleNamespace

    import torch

    from spine_ttrl.assessment import evaluate_prompts
    from spine_ttrl.data import Example
    from spine_ttrl.engine import SamplingParams

    class Scripted:
        device = "cpu"

        def generate(self, prompts, params, generator=None, progress=None):
            n = params.num_samples
            texts = [f"\\boxed{{{p[0]}}}" if j % 2 == 0 else "\\boxed{9}" for p in prompts for j in range(n)]
            return SimpleNamespace(texts=texts, completion_mask=torch.ones(len(texts), 3, dtype=torch.long),
                                   truncated=torch.zeros(len(texts), dtype=torch.bool))

    exs = [Example("q", answer="1", source="x"), Example("q", answer="2", source="x"), Example("q", answer="9", source="y")]
    res = evaluate_prompts(Scripted(), exs, [[1], [3], [9]], "math",
                           SamplingParams(num_samples=4, max_new_tokens=3, temperature=1.0))
    assert [r["source"] for r in res.records] == ["x", "x", "y"]
    # greedy answers: 1, 3, 9 -> x: 1 of 2 right, y: right. Samples: half the prompt's number, half 9.
    assert res.metrics["source/x/greedy_pass@1"] == 0.5 and res.metrics["source/y/greedy_pass@1"] == 1.0
    assert res.metrics["source/x/avg@4"] == 0.25 and res.metrics["source/y/avg@4"] == 1.0
    assert res.metrics["greedy_pass@1"] == pytest.approx(2 / 3)
