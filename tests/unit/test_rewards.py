"""Hand-checked tests for spine_ttrl.rewards."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spine_ttrl import answers
from spine_ttrl.answers import majority_vote
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


POOL = ["1/2", "0.5", r"\frac{1}{2}", "3", "3.0", "-3", "2", r"\sqrt{4}", "x+1", "1+x", ""]


@PROPERTY
@given(votes=st.lists(st.one_of(st.none(), st.sampled_from(POOL)), max_size=24), task=st.sampled_from(["math"]))
def test_reward_properties(votes, task):
    vote = majority_vote(votes, task=task)
    rewards = majority_rewards(votes, task=task)
    assert len(rewards) == len(votes)
    assert set(rewards) <= {0.0, 1.0}
    assert sum(rewards) == vote.count
    assert vote.ratio == (vote.count / len(votes) if votes else 0.0)
    assert rewards == majority_rewards(votes, task=task)  # deterministic
    # unparsed answers never earn a reward
    assert all(r == 0.0 for v, r in zip(votes, rewards) if v is None or not v.strip())
    # the winners' frequency reward is the majority ratio; nobody has more
    freq = frequency_rewards(votes, task=task)
    assert all(f == pytest.approx(vote.ratio) for f, r in zip(freq, rewards) if r == 1.0)
    assert all(f <= vote.ratio + 1e-12 for f in freq)


@PROPERTY
@given(votes=st.lists(st.one_of(st.none(), st.sampled_from(list("ABCDabcd") + ["(B)", ""])), max_size=40))
def test_reward_properties_choice(votes):
    vote = majority_vote(votes, task="choice")
    rewards = majority_rewards(votes, task="choice")
    assert sum(rewards) == vote.count
    assert set(rewards) <= {0.0, 1.0}
