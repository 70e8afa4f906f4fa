"""Hand-checked tests for spine_ttrl.answers with task="label" (PubMedQA-style yes / no / maybe)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spine_ttrl.answers import TASKS, Vote, cluster_answers, extract_answer, is_equivalent, majority_vote

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_label_is_a_task():
    assert "label" in TASKS
    assert TASKS[:2] == ("math", "choice")  # the existing tasks keep their places


@pytest.mark.parametrize(
    "text, expected",
    [
        # one label, any case -> the canonical lower-case entry
        ("Yes", "yes"),
        ("MAYBE.", "maybe"),
        # the last standalone label wins when there is no box or anchor
        ("At first I thought no, but yes.", "yes"),
        # whole words only: "know", "note", "nobody", "yesterday", "maybes" are not labels -> "no"
        ("I know this note; nobody said so yesterday. maybes. No", "no"),
        # a box beats a later label in prose
        (r"\boxed{No} -- though some say yes", "no"),
        (r"$\boxed{\text{Maybe}}$, yes", "maybe"),
        # the last box holding a label; a later box without one is skipped
        (r"\boxed{yes} then \boxed{no} and \boxed{42}", "no"),
        # "answer is X" beats a later standalone label
        ("The answer is no. Yes, I am sure.", "no"),
        ("**Final Answer:** Maybe\nyes?", "maybe"),
        ("Answer: (Yes)", "yes"),
        (r"final answer: $\text{no}$, but maybe", "no"),
        # the anchor must be followed by a label: "not" is not "no", so the last word counts
        ("The answer is not obvious; probably yes", "yes"),
        # the last anchor of several
        ("answer is yes ... wait, the answer is maybe", "maybe"),
        # a box beats an anchor
        (r"The answer is yes. \boxed{maybe}", "maybe"),
    ],
)
def test_extract_label(text, expected):
    assert extract_answer(text, task="label") == expected


@pytest.mark.parametrize("text", ["", "  \n", None, "I know nothing", "noyes", "yes_no", r"\boxed{42}"])
def test_extract_label_none(text):
    # "noyes" and "yes_no": glued to word characters on one side -> not whole words
    assert extract_answer(text, task="label") is None


def test_extract_label_custom_labels():
    labels = ("Yes", "No change", "Worse")
    # the longer label wins over a prefix of it; returned lower-cased
    assert extract_answer("Outcome: no change", "label", labels) == "no change"
    assert extract_answer("the answer is WORSE", task="label", labels=labels) == "worse"
    # "maybe" is not one of these labels: the earlier "Yes" is the last label stated
    assert extract_answer("Yes, or maybe", task="label", labels=labels) == "yes"
    # labels with regex characters are taken literally: "a+" matches "a+" and not "aa"
    assert extract_answer("it is aa, or a+ ?", task="label", labels=("a+", "b")) == "a+"


def test_extract_label_bad_labels():
    for labels in ((), "yes", ("yes", ""), ("yes", None)):
        with pytest.raises(ValueError):
            extract_answer("yes", task="label", labels=labels)


def test_labels_ignored_for_math_and_choice():
    # the math rules (last number) and choice rules (the letter) are untouched by labels
    assert extract_answer("yes, 12", task="math", labels=("yes",)) == "12"
    assert extract_answer("yes, 12", task="math") == "12"
    assert extract_answer("No. (C)", task="choice", labels=("no",)) == "C"
    assert extract_answer("yes") is None  # default task stays math: no number -> None


def test_equivalent_label():
    assert is_equivalent("Yes", "yes", task="label")
    assert is_equivalent(" MAYBE ", "maybe", task="label")
    assert not is_equivalent("yes", "no", task="label")
    assert not is_equivalent("", "", task="label")
    assert not is_equivalent(None, "no", task="label")
    # math equivalence does not leak in: "1" and "1.0" are different labels
    assert not is_equivalent("1", "1.0", task="label")


def test_vote_label():
    # clusters {Yes, yes, YES} (3 votes, first member "Yes"), {no, No} (2); one unparsed:
    # label "Yes", count 3, ratio 3/6 = 0.5
    votes = ["Yes", "no", "yes", None, "No", "YES"]
    assert cluster_answers(votes, task="label") == [0, 1, 0, None, 1, 0]
    assert majority_vote(votes, task="label") == Vote("Yes", 3, 0.5)
    # tie {no, No} vs {maybe, maybe}: "no" came first
    assert majority_vote(["no", "maybe", "maybe", "No"], task="label") == Vote("no", 2, 0.5)


@PROPERTY
@given(text=st.text(max_size=60) | st.lists(st.sampled_from(
    ["yes", "No", "MAYBE", "know", " ", ".", "answer is ", r"\boxed{", "}", "**", "x"]), max_size=15).map("".join))
def test_extract_label_property(text):
    got = extract_answer(text, task="label")
    assert got is None or got in ("yes", "no", "maybe")
    # a label is returned exactly when some whole-word label occurs in the text
    assert (got is None) == (re.search(r"(?<!\w)(yes|no|maybe)(?!\w)", text or "", re.I) is None)
