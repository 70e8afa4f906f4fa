"""One step's vote: extract answers, vote per question, reward, and keep the trained subset.

Labels, where the data has them, are used only for diagnostics (label accuracy, reward
accuracy, sampled accuracy), never in the reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .answers import DEFAULT_LABELS, Vote, extract_answer, is_equivalent, majority_vote


@dataclass
class StepVotes:
    """The outcome of one step's votes (rows ``j*N .. j*N+N-1`` answer question j, N votes).

    ``answers``: extracted answer per row (None = unparsed); ``votes``: the :class:`Vote` of each
    question; ``keep_rows`` / ``rewards``: the rows kept for the update (G per voted question,
    in row order within a question) and their rewards; ``skipped``: questions where nothing
    parsed (no pseudo-label, not trained). Diagnostics with labels: ``label_hits`` (majority
    equals label, per voted question), ``sample_hits`` (each vote correct), ``reward_hits``
    (reward agrees with the true reward, for binary rewards only).
    """

    answers: list[str | None]
    votes: list[Vote] = field(default_factory=list)
    keep_rows: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    skipped: int = 0
    label_hits: list[float] = field(default_factory=list)
    reward_hits: list[float] = field(default_factory=list)
    sample_hits: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """``reward/*``, ``vote/*`` and ``questions/skipped`` (see docs/metrics.md)."""
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        m = {"reward/mean": mean(self.rewards) if self.rewards else float("nan"),
             "vote/majority_ratio": mean([v.ratio for v in self.votes]),
             "vote/parsed_fraction": sum(a is not None for a in self.answers) / len(self.answers),
             "questions/skipped": float(self.skipped)}
        m.update(hit_metrics(self.label_hits, self.reward_hits, self.sample_hits))
        return m


def label_hits(answers: Sequence[str | None], label: str, vote_label: str | None,
               rewards: Sequence[float] | None, task: str) -> tuple[list[float], float | None, list[float]]:
    """One question's label diagnostics (labels never enter the reward): ``truth`` = 1 for each vote
    equivalent to ``label`` (None = unparsed = 0); the majority's hit, 1 if ``vote_label`` is
    equivalent to ``label`` (None when nothing was voted); and, for binary ``rewards`` only, 1 for
    each vote whose reward equals its truth. Example: answers ("3", "3", "5"), label "3", vote "3",
    rewards (1, 1, 0) -> ([1, 1, 0], 1.0, [1, 1, 1])."""
    truth = [float(a is not None and is_equivalent(a, label, task)) for a in answers]
    hit = None if vote_label is None else float(is_equivalent(vote_label, label, task))
    binary = rewards is not None and all(r in (0.0, 1.0) for r in rewards)
    return truth, hit, [float(r == t) for r, t in zip(rewards, truth)] if binary else []


def hit_metrics(label: Sequence[float], reward: Sequence[float], sample: Sequence[float]) -> dict[str, float]:
    """``vote/label_accuracy``, ``reward/accuracy``, ``vote/sample_accuracy``: the mean of each list
    of hits (:func:`label_hits`), a key left out when its list is empty."""
    return {key: sum(hits) / len(hits) for key, hits in (("vote/label_accuracy", label), ("reward/accuracy", reward),
                                                          ("vote/sample_accuracy", sample)) if hits}


def vote_and_reward(texts: Sequence[str], labels: Sequence[str | None], *, num_votes: int, num_train: int,
                    task: str, reward_fn: Callable[..., list[float]],
                    generator: torch.Generator, label_sets: Sequence[Sequence[str] | None] | None = None,
                    embed: Callable[[Sequence[str]], object] | None = None) -> StepVotes:
    """Vote over each question's ``num_votes`` completions and keep ``num_train`` of them.

    ``texts``: completions, question j's at rows j·N … j·N + N − 1; ``labels``: each question's
    answer or None (diagnostics only); ``reward_fn(answers, task) -> list[float]`` one of
    :data:`spine_ttrl.rewards.REWARDS`, or, with ``embed`` (texts -> (N, d) embeddings), one of
    :data:`spine_ttrl.rewards.EMBEDDING_REWARDS`, called as ``reward_fn(answers, embed(texts),
    task)`` on each voted question's completions. ``label_sets``: each question's labels for
    ``task="label"`` (None = yes / no / maybe). The kept rows are a uniformly random subset (drawn
    with ``generator``) chosen before any forward pass, so no compute is spent on dropped votes.
    """
    sets = label_sets or [None] * len(labels)
    out = StepVotes(answers=[extract_answer(t, task, sets[i // num_votes] or DEFAULT_LABELS)
                             for i, t in enumerate(texts)])
    for j, label in enumerate(labels):
        rows = list(range(j * num_votes, (j + 1) * num_votes))
        ans = [out.answers[r] for r in rows]
        vote = majority_vote(ans, task)
        out.votes.append(vote)
        rewards = None
        if vote.label is not None:
            rewards = reward_fn(ans, task) if embed is None else reward_fn(ans, embed([texts[r] for r in rows]), task)
        if label is not None:
            truth, hit, reward_hits = label_hits(ans, label, vote.label, rewards, task)
            out.sample_hits.extend(truth)
            out.label_hits.extend([] if hit is None else [hit])
            out.reward_hits.extend(reward_hits)
        if vote.label is None:
            out.skipped += 1
            continue
        pick = torch.randperm(num_votes, generator=generator)[:num_train].sort().values.tolist()
        out.keep_rows.extend(rows[i] for i in pick)
        out.rewards.extend(rewards[i] for i in pick)
    return out
