"""Evaluation metrics: unbiased pass@k, maj@k, avg@k and their standard errors.

Pure functions over counts and answer strings. The loop that generates the answers lives
elsewhere; these only score them, so every estimator can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .answers import is_equivalent, majority_vote

__all__ = ["pass_at_k", "maj_at_k", "avg_at_k", "mean_and_stderr"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021).

    pass@k = 1 − C(n − c, k) / C(n, k), computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) for
    numerical stability. Equals 1 when n − c < k (every k-subset holds a correct sample);
    pass@1 = c / n.

    Args:
        n: number of samples drawn (n ≥ 1).
        c: number of correct samples (0 ≤ c ≤ n).
        k: subset size (1 ≤ k ≤ n).
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def maj_at_k(
    answers: Sequence[str | None],
    label: str | None,
    k: int | None = None,
    task: str = "math",
) -> float:
    """maj@k: 1.0 if the majority answer of the first k sampled answers equals the label.

    The majority is :func:`spine_ttrl.answers.majority_vote` (equivalence clusters, ties to
    the cluster seen first); the match uses :func:`spine_ttrl.answers.is_equivalent`.
    ``k=None`` uses all answers. No parsed answer, or no label, scores 0.0.

    Args:
        answers: extracted answers of one question (None = unparsed), in sampling order.
        label: the ground-truth answer.
        k: how many of the answers vote (1 ≤ k ≤ len(answers)).
    """
    if k is not None:
        if not 1 <= k <= len(answers):
            raise ValueError(f"maj_at_k needs 1 <= k <= {len(answers)}, got k={k}")
        answers = answers[:k]
    if label is None:
        return 0.0
    vote = majority_vote(list(answers), task=task)
    if vote.label is None:
        return 0.0
    return 1.0 if is_equivalent(vote.label, label, task=task) else 0.0


def avg_at_k(correct: Sequence[bool]) -> float:
    """avg@k: the mean correctness of k sampled answers to one question (= pass@1 estimate).

    avg@k = (1/k) Σ_j 1[answer_j correct]. TTRL reports avg@16 at temperature 0.6.
    """
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one answer")
    return sum(bool(c) for c in correct) / len(correct)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean over questions and its standard error s / √n (s the sample std, ddof = 1).

    For per-question scores x_1..x_n: mean = Σx/n, stderr = sqrt(Σ(x − mean)² / (n − 1)) / √n.
    With one question the standard error is reported as NaN (undefined). Empty input raises.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
