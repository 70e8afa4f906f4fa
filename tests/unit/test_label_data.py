"""task=label in the data layer: a ``labels`` column (validated, one-line errors), ``auto`` detection,
the prompt naming the labels, and the vote and evaluation extracting with each question's labels."""

from __future__ import annotations

import json

import pytest
import torch

from spine_ttrl.data import DataError, Example, build_messages, load_examples, resolve_task
from spine_ttrl.rewards import majority_rewards
from spine_ttrl.votes import vote_and_reward


def _load(tmp_path, records, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_examples(str(path))


def test_labels_column_is_read_and_sets_the_task(tmp_path):
    ex = _load(tmp_path, [{"prompt": "a?", "answer": "Good", "labels": ["good", " bad "]},
                          {"prompt": "b?", "answer": "bad", "labels": ["good", "bad", "neutral"]}])
    assert ex[0].labels == ("good", "bad") and ex[1].labels == ("good", "bad", "neutral")
    assert resolve_task(ex, "auto") == "label" and resolve_task(ex, "label") == "label"
    assert resolve_task(ex, "math") == "math"  # an explicit task wins
    text = build_messages(ex[1], "label")[-1]["content"]
    assert text.startswith("b?\n") and "one of: good, bad, neutral" in text and "\\boxed{}" in text


def test_csv_labels_cell_is_json(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,answer,labels\n"x?",up,"[""up"", ""down""]"\n')
    assert load_examples(str(path))[0].labels == ("up", "down")


@pytest.mark.parametrize("answers, task", [
    (["yes", "No", "maybe"], "label"),
    (["yes", "3"], "math"),
    (["A", "B"], "choice"),
    ([None, None], "math"),
])
def test_auto_detects_default_labels(answers, task):
    assert resolve_task([Example("q", a, id=str(i)) for i, a in enumerate(answers)], "auto") == task


@pytest.mark.parametrize("labels, fragment", [
    ([], "field 'labels': empty list"),
    ("yes", "field 'labels': expected a JSON list of strings"),
    ({"a": 1}, "field 'labels': expected a list of strings, got object"),
    (["yes", ""], "field 'labels': item 1: expected a non-empty string"),
    (["yes", 3], "field 'labels': item 1: expected a non-empty string, got 3"),
    (["Yes", "yes"], "field 'labels': item 1: 'yes' repeats item 0"),
    (["good", "bad"], "field 'answer': answer 'yes' is not one of the labels (good, bad)"),
])
def test_bad_labels_are_one_line_errors(tmp_path, labels, fragment):
    with pytest.raises(DataError) as exc:
        _load(tmp_path, [{"prompt": "q", "answer": "yes", "labels": labels}])
    assert fragment in str(exc.value) and "q.jsonl:1" in str(exc.value) and "\n" not in str(exc.value)


def test_labels_with_choices_or_answers_outside_the_default_labels(tmp_path):
    with pytest.raises(DataError, match="a question has options or labels, not both"):
        _load(tmp_path, [{"prompt": "q", "choices": ["x", "y"], "labels": ["x", "y"]}])
    ex = [Example("q", "yes", id="a"), Example("r", "perhaps", id="b")]
    with pytest.raises(DataError, match="example 'b': answer 'perhaps' is not one of its labels \\(yes, no, maybe\\)"):
        resolve_task(ex, "label")


def test_vote_extracts_with_each_questions_labels():
    texts = ["it is good", "Good.", "bad", "\\boxed{up}", "so down", "the answer is yes"]
    votes = vote_and_reward(texts, ["good", "up"], num_votes=3, num_train=3, task="label", reward_fn=majority_rewards,
                            generator=torch.Generator().manual_seed(0), label_sets=[("good", "bad"), ("up", "down")])
    assert votes.answers == ["good", "good", "bad", "up", "down", None]  # "yes" is not a label of question 2
    assert [v.label for v in votes.votes] == ["good", "up"]
    assert votes.metrics()["vote/label_accuracy"] == 1.0


def test_label_hits_and_hit_metrics_by_hand():
    from spine_ttrl.votes import hit_metrics, label_hits

    assert label_hits(["3", "3", "5"], "3", "3", [1.0, 1.0, 0.0], "math") == ([1.0, 1.0, 0.0], 1.0, [1.0, 1.0, 1.0])
    # the majority wrong: rewards [1, 0, 1] vs truth [0, 1, 0]; unparsed votes are wrong
    assert label_hits(["7", "2", None], "2", "7", [1.0, 0.0, 1.0], "math") == ([0.0, 1.0, 0.0], 0.0, [0.0, 0.0, 0.0])
    assert label_hits([None, None], "2", None, None, "math") == ([0.0, 0.0], None, [])  # nothing voted
    assert label_hits(["3", "5"], "3", "3", [0.5, 0.5], "math")[2] == []  # frequency-like rewards: no reward hits
    assert hit_metrics([1.0, 0.0], [], [1.0, 1.0, 0.0, 1.0]) == {"vote/label_accuracy": 0.5,
                                                                "vote/sample_accuracy": 0.75}
