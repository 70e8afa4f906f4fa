"""Hand-checked tests for spine_ttrl.rewards."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spine_ttrl import answers
from spine_ttrl.answers import cluster_answers, majority_vote
from spine_ttrl.rewards import frequency_rewards, majority_rewards

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_majority_rewards_equivalence_cluster():
    # winning cluster {1/2, 0.5, \frac{1}{2}} -> 1; {3, 3} -> 0
    assert majority_rewards(["1/2", "0.5", r"\frac{1}{2}", "3", "3"]) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_majority_rewards_unparsed_get_zero():
    # "5" wins with 2 votes; the unparsed answers earn nothing
    assert majority_rewards([None, "5", "", "5.0", "6"]) == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_majority_rewards_tie_to_first_cluster():
    # {7, 7.0} and {2, 2} tie; 7 appeared first
    assert majority_rewards(["7", "2", "2", "7.0"]) == [1.0, 0.0, 0.0, 1.0]
    assert majority_rewards(["b", "C", "B", "c"], task="choice") == [1.0, 0.0, 1.0, 0.0]


def test_majority_rewards_nothing_parsed():
    assert majority_rewards([None, None, " "]) == [0.0, 0.0, 0.0]
    assert majority_rewards([]) == []
    assert majority_vote([None, None, " "]) == (None, 0, 0.0)


def test_rewards_use_the_vote_clustering_not_the_label(monkeypatch):
    # z ~ x and z ~ y, but x !~ y (not transitive)
    related = {frozenset("xz"), frozenset("yz")}
    monkeypatch.setattr(answers, "is_equivalent", lambda a, b, task="math", **kw: a == b or frozenset(a + b) in related)
    votes = ["x", "y", "y", "y", "z"]
    # clusters: x -> 0; y vs x no -> 1; z vs x yes -> 0  =>  [0, 1, 1, 1, 0]; winner 1 ("y", 3 votes)
    assert majority_vote(votes) == ("y", 3, 0.6)
    # z is equivalent to the label "y" but sits in cluster 0: re-comparing with the label would
    # pay it too (sum 4 != count 3)
    assert majority_rewards(votes) == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_frequency_rewards():
    # clusters {1/2, 0.5} (2 of 4 answers), {3} (1 of 4), None -> [2/4, 2/4, 1/4, 0]
    assert frequency_rewards(["1/2", "0.5", "3", None]) == pytest.approx([0.5, 0.5, 0.25, 0.0])
    assert frequency_rewards([None, None]) == [0.0, 0.0]
    assert frequency_rewards([]) == []


# Hand-worked groups: (answers, clusters, majority rewards, frequency rewards, vote). Each row is
# derived by hand from the rule (cluster by equivalence in order of first appearance; the largest
# cluster wins, ties to the first; unparsed answers join nothing but count in the denominator).
HAND_GROUPS = [
    # 3 ~ 3.0 (cluster 0, 2 votes); 1/2 ~ 0.5 ~ \frac{1}{2} (cluster 1, 3 votes); -3 alone (cluster 2).
    # Winner cluster 1: rewards on positions 1, 3, 4; frequencies 2/7, 3/7, 2/7, 3/7, 3/7, 0, 1/7.
    (["3", "1/2", "3.0", "0.5", r"\frac{1}{2}", None, "-3"],
     [0, 1, 0, 1, 1, None, 2],
     [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
     [2 / 7, 3 / 7, 2 / 7, 3 / 7, 3 / 7, 0.0, 1 / 7],
     ("1/2", 3, 3 / 7)),
    # 2 ~ \sqrt{4} (symbolic, cluster 0) and x+1 ~ 1+x (cluster 1) tie at 2 votes: cluster 0 came first.
    # "" is unparsed: reward 0, but it counts in every denominator (2/5).
    (["2", r"\sqrt{4}", "x+1", "1+x", ""],
     [0, 0, 1, 1, None],
     [1.0, 1.0, 0.0, 0.0, 0.0],
     [2 / 5, 2 / 5, 2 / 5, 2 / 5, 0.0],
     ("2", 2, 2 / 5)),
    # -3 and 3 differ: two clusters of one; the first wins. Two unparsed answers: 1/4 each, not 1/2.
    (["-3", "3", "", None],
     [0, 1, None, None],
     [1.0, 0.0, 0.0, 0.0],
     [1 / 4, 1 / 4, 0.0, 0.0],
     ("-3", 1, 1 / 4)),
]

HAND_GROUPS_CHOICE = [
    # b ~ (B) (cluster 0, 2 votes), C ~ c ~ C (cluster 1, 3 votes), a (cluster 2): cluster 1 wins.
    (["b", "(B)", "C", "c", "C", None, "a"],
     [0, 0, 1, 1, 1, None, 2],
     [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
     [2 / 7, 2 / 7, 3 / 7, 3 / 7, 3 / 7, 0.0, 1 / 7],
     ("C", 3, 3 / 7)),
    # {A, a} and {b, B} tie at 2: A came first.
    (["A", "b", "B", "a"],
     [0, 1, 1, 0],
     [1.0, 0.0, 0.0, 1.0],
     [1 / 2, 1 / 2, 1 / 2, 1 / 2],
     ("A", 2, 1 / 2)),
]


@pytest.mark.parametrize(
    "task, votes, clusters, majority, frequency, vote",
    [("math", *row) for row in HAND_GROUPS] + [("choice", *row) for row in HAND_GROUPS_CHOICE],
)
def test_rewards_of_hand_worked_groups(task, votes, clusters, majority, frequency, vote):
    assert cluster_answers(votes, task=task) == clusters
    assert majority_rewards(votes, task=task) == majority
    assert frequency_rewards(votes, task=task) == pytest.approx(frequency)
    assert majority_vote(votes, task=task) == vote  # ratio: the same float division, exact


POOL = ["1/2", "0.5", r"\frac{1}{2}", "3", "3.0", "-3", "2", r"\sqrt{4}", "x+1", "1+x", ""]


@PROPERTY
@given(votes=st.lists(st.one_of(st.none(), st.sampled_from(POOL)), max_size=24), task=st.sampled_from(["math"]))
def test_reward_properties(votes, task):
    rewards = majority_rewards(votes, task=task)
    freq = frequency_rewards(votes, task=task)
    assert len(rewards) == len(freq) == len(votes)
    assert set(rewards) <= {0.0, 1.0}
    assert all(0.0 <= f <= 1.0 for f in freq)
    # unparsed answers never earn a reward of either kind
    for v, r, f in zip(votes, rewards, freq):
        if v is None or not v.strip():
            assert r == 0.0 and f == 0.0
    # some answer is paid exactly when some answer parsed
    assert (1.0 in rewards) == any(v is not None and v.strip() for v in votes)


@PROPERTY
@given(votes=st.lists(st.one_of(st.none(), st.sampled_from(list("ABCDabcd") + ["(B)", ""])), max_size=40))
def test_reward_properties_choice(votes):
    rewards = majority_rewards(votes, task="choice")
    assert set(rewards) <= {0.0, 1.0}
    # a letter's reward depends only on the letter: "b", "B" and "(B)" are one answer
    paid = {v.strip("()").upper() for v, r in zip(votes, rewards) if r == 1.0}
    assert len(paid) <= 1
