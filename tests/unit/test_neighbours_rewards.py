"""Hand-checked tests for the neighbours' rewards in spine_ttrl.rewards: leave-one-out, TTRV, EVOL-RL."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spine_ttrl.rewards import REWARDS, leave_one_out_rewards, novelty_rewards, ttrv_rewards

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- leave_one_out_rewards
@pytest.mark.parametrize(
    "votes, task, expected",
    [
        # i=0: others {1} vs {2} tie, "1" first -> 1; i=1: the same; i=2: others {1, 1} -> "1" != "2" -> 0
        (["1", "1", "2"], "math", [1.0, 1.0, 0.0]),
        # each answer's only other voter disagrees
        (["1", "2"], "math", [0.0, 0.0]),
        # N = 1: nobody else votes
        (["5"], "math", [0.0]),
        ([], "math", []),
        # unparsed get 0 and do not vote: i=1: others [None, "4", ""] -> "4" -> 1; i=2 likewise
        ([None, "4", "4", ""], "math", [0.0, 1.0, 1.0, 0.0]),
        # equivalence: i=0 others {0.5} vs {3} tie -> "0.5" ≡ 1/2 -> 1; i=1 others -> "1/2" -> 1;
        # i=2 others {1/2, 0.5} -> "1/2" != 3 -> 0
        (["1/2", "0.5", "3"], "math", [1.0, 1.0, 0.0]),
        # 3 wins the full vote, but leaving one 3 out ties {2, 2} vs {3, 3} and 2 came first -> all 0
        (["2", "2", "3", "3", "3"], "math", [0.0, 0.0, 0.0, 0.0, 0.0]),
        # the same votes with 3 first: a left-out 3 still sees the tie go to 3 -> 1; the 2s see 3 -> 0
        (["3", "3", "3", "2", "2"], "math", [1.0, 1.0, 1.0, 0.0, 0.0]),
        # choice: i=0 others {b} vs {C} tie -> "b" ≡ B -> 1; i=1 -> "B" -> 1; i=2 others {B, b} -> 0
        (["B", "b", "C"], "choice", [1.0, 1.0, 0.0]),
        # label: i=0 others {no} vs {yes} tie -> "no" -> 0; i=1 others {Yes, yes} -> 0; i=2 others tie
        # {Yes} vs {no} -> "Yes" ≡ yes -> 1
        (["Yes", "no", "yes"], "label", [0.0, 0.0, 1.0]),
    ],
)
def test_leave_one_out_rewards_hand(votes, task, expected):
    assert leave_one_out_rewards(votes, task=task) == expected


def test_leave_one_out_rewards_unknown_task():
    with pytest.raises(ValueError):
        leave_one_out_rewards([None], task="auto")


@PROPERTY
@given(votes=st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "1.0", ""])), max_size=12))
def test_leave_one_out_rewards_properties(votes):
    rewards = leave_one_out_rewards(votes)
    assert len(rewards) == len(votes) and set(rewards) <= {0.0, 1.0}
    for v, r in zip(votes, rewards):
        if v is None or not v.strip():
            assert r == 0.0
    # an answer nobody else gave ("1" and "1.0" are one answer) is never paid
    key = lambda v: "1" if v == "1.0" else v  # noqa: E731
    for i, v in enumerate(votes):
        if v and all(key(w) != key(v) for j, w in enumerate(votes) if j != i):
            assert rewards[i] == 0.0


# ---------------------------------------------------------------- ttrv_rewards
def test_ttrv_rewards_hand():
    # ["1", "1", "2", None]: p = (2/4, 1/4); Σ p ln p = 0.5 ln 0.5 + 0.25 ln 0.25
    #   = -0.346574 - 0.346574 = -0.693147; α = 0.75 -> -0.519860 on every response:
    # [0.5 - 0.519860, 0.5 - 0.519860, 0.25 - 0.519860, 0 - 0.519860]
    assert ttrv_rewards(["1", "1", "2", None]) == pytest.approx([-0.019860, -0.019860, -0.269860, -0.519860], abs=1e-6)
    # choice, α = 1: {A} 1/4, {b, (B)} 2/4, {C} 1/4: Σ p ln p = 2 * 0.25 ln 0.25 + 0.5 ln 0.5
    #   = -0.693147 - 0.346574 = -1.039721 -> [0.25, 0.5, 0.5, 0.25] - 1.039721
    assert ttrv_rewards(["A", "b", "(B)", "C"], task="choice", alpha=1.0) == pytest.approx(
        [-0.789721, -0.539721, -0.539721, -0.789721], abs=1e-6)
    # one cluster {3, 3.0}: p = 1, ln 1 = 0 -> just the frequency 1
    assert ttrv_rewards(["3", "3.0"]) == pytest.approx([1.0, 1.0])
    # α = 0: the frequency reward alone, 1/3 each for three different answers
    assert ttrv_rewards(["1", "2", "3"], alpha=0.0) == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    # α = 2, three different answers: 3 * (1/3) ln(1/3) = -ln 3 = -1.098612 -> 1/3 - 2.197225 = -1.863891
    assert ttrv_rewards(["1", "2", "3"], alpha=2.0) == pytest.approx([-1.863891] * 3, abs=1e-6)


def test_ttrv_rewards_nothing_parsed():
    # no parsed cluster: no frequency and an empty entropy sum -> 0
    assert ttrv_rewards([None, ""]) == [0.0, 0.0]
    assert ttrv_rewards([]) == []


# ---------------------------------------------------------------- novelty_rewards
def test_novelty_rewards_hand():
    # 2-D embeddings (e3 not unit length: cosine normalises it; e4 points away from e0):
    #   e0 = (1, 0), e1 = (1, 0), e2 = (0.6, 0.8), e3 = (0, 2), e4 = (-1, 0)
    # clipped cosines: S01 = 1, S02 = 0.6, S03 = 0, S04 = 0 (-1 clipped), S12 = 0.6, S13 = 0,
    #   S14 = 0, S23 = 0.8, S24 = 0 (-0.6 clipped), S34 = 0
    # majority {0, 1, 2} ("7" ≡ "7.0"):
    #   i=0: s̄ = (1 + 0.6)/2 = 0.8, s^max = 1 -> u = 1 - 0.9 = 0.1
    #   i=1: s̄ = (1 + 0.6)/2 = 0.8, s^max = 1 -> u = 0.1
    #   i=2: s̄ = (0.6 + 0.6)/2 = 0.6, s^max = 0.8 (S23) -> u = 1 - 0.7 = 0.3
    #   min-max -> ũ = (0, 0, 1) -> 0.5 + 0.5 ũ = (0.5, 0.5, 1.0)
    # others {3}: a group of one -> ũ = 1 -> -1 + 0.5 = -0.5;  unparsed 4 -> -1
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-1.0, 0.0]])
    assert novelty_rewards(["7", "7.0", "7", "3", None], emb) == pytest.approx([0.5, 0.5, 1.0, -0.5, -1.0])


def test_novelty_rewards_hand_two_clusters_outside_the_majority():
    # e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0, 1), e3 = (0.8, 0.6), e4 = (0, 1)
    # S01 = 0.6, S02 = 0, S03 = 0.8, S04 = 0, S12 = 0.8, S13 = 0.48 + 0.48 = 0.96, S14 = 0.8,
    # S23 = 0.6, S24 = 1, S34 = 0.6
    # votes 1, 1, 2, 3, 2: {1} and {2} tie at 2, "1" first -> majority {0, 1}; others {2, 3, 4}
    # majority: i=0: s̄ = 0.6, s^max = 0.8 -> u = 0.3;  i=1: s̄ = 0.6, s^max = 0.96 -> u = 0.22
    #   ũ = (1, 0) -> (1.0, 0.5)
    # others (answers 2 and 3 are one group): i=2: s̄ = (0.6 + 1)/2 = 0.8, s^max = 1 -> u = 0.1
    #   i=3: s̄ = (0.6 + 0.6)/2 = 0.6, s^max = 0.96 -> u = 0.22;  i=4: s̄ = (1 + 0.6)/2 = 0.8,
    #   s^max = 1 -> u = 0.1;  ũ = (0, 1, 0) -> (-1.0, -0.5, -1.0)
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [0.0, 1.0]])
    assert novelty_rewards(["1", "1", "2", "3", "2"], emb) == pytest.approx([1.0, 0.5, -1.0, -0.5, -1.0])


def test_novelty_s_max_includes_unparsed_responses():
    # e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0.8, 0.6) unparsed. S01 = 0.6, S02 = 0.8, S12 = 0.96.
    # i=0: s̄ = 0.6, s^max = 0.8 (the unparsed e2) -> u = 0.3; i=1: s̄ = 0.6, s^max = 0.96 -> u = 0.22
    # ũ = (1, 0) -> (1.0, 0.5). (Ignoring e2, both u would be 0.4 and both rewards 0.75.)
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    assert novelty_rewards(["1", "1", None], emb) == pytest.approx([1.0, 0.5, -1.0])


def test_novelty_similarities_are_clipped_at_zero():
    # e0 = (1, 0), e1 = (-1, 0), e2 = (0.6, 0.8); raw cosines -1, 0.6, -0.6 -> clipped 0, 0.6, 0
    # i=0: s̄ = (0 + 0.6)/2 = 0.3, s^max = 0.6 -> u = 0.55; i=1: s̄ = 0, s^max = 0 -> u = 1;
    # i=2: s̄ = 0.3, s^max = 0.6 -> u = 0.55; ũ = (0, 1, 0) -> (0.5, 1.0, 0.5)
    # (unclipped, u would be (0.8, 1.7, 0.7) and ũ = (0.1, 1, 0))
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    assert novelty_rewards(["1", "1", "1"], emb) == pytest.approx([0.5, 1.0, 0.5])


def test_novelty_rewards_edge_cases():
    # two identical embeddings: u = 1 - (1 + 1)/2 = 0 for both -> all equal -> ũ = 0.5 -> 0.75
    assert novelty_rewards(["2", "2"], torch.tensor([[3.0, 4.0], [3.0, 4.0]])) == pytest.approx([0.75, 0.75])
    # N = 1: a majority of one -> ũ = 1 -> 0.5 + 0.5 = 1.0
    assert novelty_rewards(["2"], torch.tensor([[1.0, 2.0]])) == [1.0]
    # nothing parsed -> all -1
    assert novelty_rewards([None, " "], torch.eye(2)) == [-1.0, -1.0]
    assert novelty_rewards([], torch.zeros(0, 3)) == []
    # choice task clustering: "b" ≡ "(B)" is the majority, "C" is alone;
    # e0 = e1 = (1, 0), e2 = (0, 1): S01 = 1, S02 = S12 = 0
    # majority {0, 1}: u = 1 - (1 + 1)/2 = 0 each -> 0.5 each -> 0.75; "C" alone -> -0.5
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert novelty_rewards(["b", "(B)", "C"], emb, task="choice") == pytest.approx([0.75, 0.75, -0.5])
    with pytest.raises(ValueError):
        novelty_rewards(["1", "2"], torch.zeros(3, 4))  # N mismatch
    with pytest.raises(ValueError):
        novelty_rewards(["1", "2"], torch.zeros(2))  # not (N, d)


# ---------------------------------------------------------------- the REWARDS table
def test_rewards_table_has_the_new_rewards_but_not_novelty():
    # called through the table with (answers, task), as the loop does:
    # leave-one-out of ["1", "1", "2"] is [1, 1, 0] (see above); ttrv of ["3", "4"]:
    # p = (1/2, 1/2), Σ p ln p = ln 0.5 = -0.693147 -> 0.5 - 0.75 * 0.693147 = -0.019860
    assert REWARDS["leave-one-out"](["1", "1", "2"], "math") == [1.0, 1.0, 0.0]
    assert REWARDS["ttrv"](["3", "4"], "math") == pytest.approx([-0.019860, -0.019860], abs=1e-6)
    assert "novelty" not in REWARDS and novelty_rewards not in REWARDS.values()
