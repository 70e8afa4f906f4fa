"""Label-free rewards over one question's group of extracted answers.

Every reward here takes the whole group (``answers``: extracted answers in sampling order,
None = unparsed) and returns one float per answer. They share the clustering of
:func:`spine_ttrl.answers.cluster_answers`, so a reward never disagrees with the vote it is
derived from. Future label-free rewards (EVOL-RL novelty, ...) belong here too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from .answers import cluster_answers, winning_cluster

__all__ = ["majority_rewards", "frequency_rewards", "REWARDS"]


def majority_rewards(answers: Sequence[str | None], task: str = "math") -> list[float]:
    """TTRL's majority reward: r_i = 1 if answer i is in the winning cluster, else 0.

    The winning cluster is the one :func:`spine_ttrl.answers.majority_vote` picks, from the
    same clustering, so sum(r) == Vote.count always. Rewards are not re-derived by comparing
    each answer with the label: equivalence need not be transitive, and an answer that joined
    an earlier cluster could still "match" the label and be paid twice. Unparsed answers get 0;
    if nothing parsed, all rewards are 0.
    """
    clusters = cluster_answers(answers, task=task)
    winner = winning_cluster(clusters)
    return [1.0 if winner is not None and c == winner else 0.0 for c in clusters]


def frequency_rewards(answers: Sequence[str | None], task: str = "math") -> list[float]:
    """TTRV's frequency reward: r_i = (size of answer i's cluster) / len(answers); 0 if unparsed.

    The winning answers get exactly the majority ratio. Unparsed answers count in the
    denominator, as in the vote. TTRV adds α·(−H(P)) of the answer distribution; that term is
    a per-question constant, which per-group advantage normalisation cancels, so it is left to
    a batch-level normaliser rather than added here.
    """
    clusters = cluster_answers(answers, task=task)
    sizes = Counter(c for c in clusters if c is not None)
    n = len(answers)
    return [sizes[c] / n if c is not None else 0.0 for c in clusters]


#: Reward name (the ``--reward`` setting) → function ``(answers, task) -> list[float]``.
#: A new label-free reward is one entry here and one choice in ``SpineConfig.reward``.
REWARDS: dict[str, Callable[..., list[float]]] = {
    "majority": majority_rewards,
    "frequency": frequency_rewards,
}
