"""Label-free rewards over one question's group of extracted answers.

Every reward here takes the whole group (``answers``: extracted answers in sampling order,
None = unparsed) and returns one float per answer. They share the clustering of
:func:`spine_ttrl.answers.cluster_answers`, so a reward never disagrees with the vote it is
derived from.

    majority_rewards        TTRL: 1 in the winning cluster, else 0
    frequency_rewards       TTRV's frequency term: share of votes for one's answer
    ttrv_rewards            TTRV: frequency + α·Σ p log p of the answer distribution
    leave_one_out_rewards   1 if one's answer matches the vote of the *other* N − 1
    novelty_rewards         EVOL-RL: majority anchor + embedding novelty (needs embeddings)

``torch`` is imported only inside :func:`novelty_rewards`, so the string rewards stay light.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .answers import TASKS, cluster_answers, is_equivalent, majority_vote, winning_cluster

__all__ = [
    "majority_rewards",
    "frequency_rewards",
    "ttrv_rewards",
    "leave_one_out_rewards",
    "novelty_rewards",
    "REWARDS",
    "EMBEDDING_REWARDS",
]


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
    denominator, as in the vote. TTRV adds α·(−H(P)) of the answer distribution: that is
    :func:`ttrv_rewards`.
    """
    clusters = cluster_answers(answers, task=task)
    sizes = Counter(c for c in clusters if c is not None)
    n = len(answers)
    return [sizes[c] / n if c is not None else 0.0 for c in clusters]


def ttrv_rewards(answers: Sequence[str | None], task: str = "math", alpha: float = 0.75) -> list[float]:
    """TTRV's reward: the frequency reward plus α times the negative entropy of the vote.

        r_i = p(a_i) + α · Σ_m p_m log p_m,     p_m = size_m / N,   p(a_i) = p of i's cluster

    over the parsed clusters m of :func:`spine_ttrl.answers.cluster_answers`; N = len(answers)
    counts unparsed answers too, so Σ_m p_m < 1 when some did not parse. An unparsed answer has
    p = 0 but still gets the entropy term (the term belongs to the question, not the answer):
    r = α · Σ_m p_m log p_m. Nothing parsed -> all 0. Example: ["1", "1", "2", None], α = 0.75:
    p = (1/2, 1/4), Σ p log p = 0.5 ln 0.5 + 0.25 ln 0.25 = −0.693147, so
    r = [0.5 − 0.519860, 0.5 − 0.519860, 0.25 − 0.519860, −0.519860].

    The entropy term is the same for every response of a question: per-group advantage
    normalisation (GRPO) cancels it, so it only matters under a batch-level normaliser.
    """
    clusters = cluster_answers(answers, task=task)
    sizes = Counter(c for c in clusters if c is not None)
    n = len(answers)
    neg_entropy = sum((k / n) * math.log(k / n) for k in sizes.values())
    return [(sizes[c] / n if c is not None else 0.0) + alpha * neg_entropy for c in clusters]


def leave_one_out_rewards(answers: Sequence[str | None], task: str = "math") -> list[float]:
    """Leave-one-out majority reward: is answer i what the *other* answers vote for?

        r_i = 1 if is_equivalent(a_i, majority_vote(a_{-i}).label) else 0,
        a_{-i} = the N − 1 answers other than i, in sampling order

    with :func:`spine_ttrl.answers.majority_vote`'s clustering and tie rule (largest cluster,
    ties to the one seen first). An answer never votes for itself, so a lone answer is never
    paid: with N = 1 the others are empty and r = [0.0]. Unparsed answers get 0, and do not
    vote. Example: ["1", "1", "2"] -> [1, 1, 0]: without answer 0 the others tie {1} vs {2}
    and "1" came first; ["1", "2"] -> [0, 0].
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    answers = list(answers)
    rewards = []
    for i, answer in enumerate(answers):
        if answer is None or not answer.strip():
            rewards.append(0.0)
            continue
        label = majority_vote(answers[:i] + answers[i + 1:], task=task).label
        rewards.append(1.0 if label is not None and is_equivalent(answer, label, task=task) else 0.0)
    return rewards


def _cosine_similarities(embeddings: Any, n: int) -> list[list[float]]:
    """(N, N) cosine similarities clipped to [0, 1], in float64, as nested lists."""
    import torch  # here, not at the top: the other rewards need no torch

    e = torch.as_tensor(embeddings).detach().to(torch.float64)
    if e.dim() != 2 or e.shape[0] != n:
        raise ValueError(f"embeddings must be (N, d) with N = {n} answers, got shape {tuple(e.shape)}")
    e = e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)  # a zero vector is similar to nothing
    return (e @ e.T).clamp(0.0, 1.0).tolist()


def _min_max(u: list[float]) -> list[float]:
    """Min-max normalise within a group: one member -> [1.0]; all equal (spread ≤ 1e-9) -> 0.5 each."""
    if len(u) == 1:
        return [1.0]
    lo, hi = min(u), max(u)
    if hi - lo <= 1e-9:
        return [0.5] * len(u)
    return [(x - lo) / (hi - lo) for x in u]


def novelty_rewards(answers: Sequence[str | None], embeddings: Any, task: str = "math") -> list[float]:
    """EVOL-RL's reward: a majority anchor plus a novelty bonus from response embeddings.

    S_ij = clip(cos(e_i, e_j), 0, 1). Two groups: the majority cluster (the winning cluster of
    :func:`spine_ttrl.answers.majority_vote`) and every other *parsed* answer. For i in group G:

        s̄_i    = mean_{j ∈ G, j ≠ i} S_ij        (0 when i is alone in G)
        s^max_i = max_{j ≠ i} S_ij                over all N responses, parsed or not (0 if N = 1)
        u_i     = 1 − (s̄_i + s^max_i) / 2
        ũ_i     = (u_i − min_G u) / (max_G u − min_G u)   (G of one: 1; all u equal: 0.5)
        r_i     = 0.5 + 0.5·ũ_i   in the majority,   −1 + 0.5·ũ_i   otherwise,   −1 if unparsed.

    Nothing parsed -> all −1. "All u equal" means a spread ≤ 1e-9 (similarities in float64), so
    identical embeddings are not split by rounding noise. Every majority reward (≥ 0.5) beats
    every other one (≤ −0.5): novelty ranks responses only within their group.

    Shapes: answers N strings/None; embeddings (N, d) tensor (or anything ``torch.as_tensor``
    takes); returns N floats. Not in :data:`REWARDS`: it needs the embeddings, so it is in
    :data:`EMBEDDING_REWARDS`.
    """
    n = len(answers)
    if n == 0:
        return []
    sim = _cosine_similarities(embeddings, n)
    clusters = cluster_answers(answers, task=task)
    winner = winning_cluster(clusters)
    rewards = [-1.0] * n
    if winner is None:
        return rewards
    majority = [i for i, c in enumerate(clusters) if c == winner]
    others = [i for i, c in enumerate(clusters) if c is not None and c != winner]
    for group, base in ((majority, 0.5), (others, -1.0)):
        if not group:
            continue
        u = []
        for i in group:
            peers = [sim[i][j] for j in group if j != i]
            s_bar = sum(peers) / len(peers) if peers else 0.0
            s_max = max((sim[i][j] for j in range(n) if j != i), default=0.0)
            u.append(1.0 - (s_bar + s_max) / 2)
        for i, u_tilde in zip(group, _min_max(u)):
            rewards[i] = base + 0.5 * u_tilde
    return rewards


#: Reward name (the ``--reward`` setting) → function ``(answers, task) -> list[float]``.
#: A new label-free reward is one entry here and one choice in ``SpineConfig.reward``.
#: (novelty_rewards is not here: it also needs the responses' embeddings; see
#: :data:`EMBEDDING_REWARDS`.)
REWARDS: dict[str, Callable[..., list[float]]] = {
    "majority": majority_rewards,
    "frequency": frequency_rewards,
    "leave-one-out": leave_one_out_rewards,
    "ttrv": ttrv_rewards,
}

#: Rewards that also need each response's sentence embedding → function
#: ``(answers, embeddings (N, d), task) -> list[float]``. The loop embeds the group's completion
#: texts (:mod:`spine_ttrl.embeddings`) and passes them; ``SpineConfig.reward``'s choices are
#: :data:`REWARDS` and this table.
EMBEDDING_REWARDS: dict[str, Callable[..., list[float]]] = {
    "novelty": novelty_rewards,
}
