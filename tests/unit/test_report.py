"""Tests for spine_ttrl.report on hand-written run directories (no model, a few seconds)."""

import json
import math
import re
import sys

import pytest

from spine_ttrl.report import collapse_warnings, make_plots, read_jsonl, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONFIG = """preset = "ttrl"

[model]
lora_r = 0
precision = "fp32"

[data]
data = "arith:2:24:0"
task = "math"

[sampling]
num_votes = 8
num_train_samples = 4
max_new_tokens = 96
temperature = 1.0

[spine]
selection = "all"
band = "none"

[optim]
steps = 6
questions_per_step = 3
lr = 2e-05
updates_per_batch = 1
"""

# lengths 100,100,100,60,40,30: first-3 mean 100, last-3 mean 130/3 = 43.3 < 0.5 x 100
LENGTHS = [100.0, 100.0, 100.0, 60.0, 40.0, 30.0]
RATIOS = [0.70, 0.80, 0.90, 0.96, 0.98, 1.00]  # last-3 mean 0.98 >= 0.95
ENTROPY = [1.2, 1.1, 1.0, 0.5, 0.3, 0.2]  # first-3 mean 1.1, last-3 mean 1/3 < 0.55

BEFORE = {"tag": "before", "step": 0, "eval/greedy_pass@1": 0.25, "eval/greedy_pass@1_se": 0.09,
          "eval/greedy_length": 80.0, "eval/avg@4": 0.3, "eval/avg@4_se": 0.07, "eval/maj@4": 0.375,
          "eval/maj@4_se": 0.1, "eval/pass@4": 0.5, "eval/pass@4_se": 0.1, "eval/majority_ratio": 0.6,
          "eval/majority_ratio_se": 0.05, "eval/questions": 24.0}
AFTER = {"tag": "after", "step": 6, "eval/greedy_pass@1": 0.375, "eval/greedy_pass@1_se": 0.1,
         "eval/greedy_length": 50.0, "eval/avg@4": 0.35, "eval/avg@4_se": 0.08, "eval/maj@4": 0.4,
         "eval/maj@4_se": 0.1, "eval/pass@4": 0.55, "eval/pass@4_se": 0.1, "eval/majority_ratio": 0.9,
         "eval/majority_ratio_se": 0.04, "eval/questions": 24.0}


def step_record(step, length=100.0, ratio=0.6, entropy=1.0, **extra):
    return {"step": step, "reward/mean": ratio, "vote/majority_ratio": ratio, "vote/label_accuracy": 0.5,
            "completion/length_mean": length, "completion/truncated_fraction": 0.1,
            "completion/sampled_tokens": 24 * length, "entropy/all_mean": entropy,
            "entropy/forking_mean": entropy, "entropy/other_mean": float("nan"),
            "tokens/selected_fraction": 1.0, "loss/policy": 0.01 * step, "time/step_s": 2.0, **extra}


def series(lengths=None, ratios=None, entropies=None):
    n = len(lengths or ratios or entropies)
    return [step_record(i + 1, length=(lengths or [100.0] * n)[i], ratio=(ratios or [0.6] * n)[i],
                        entropy=(entropies or [1.0] * n)[i]) for i in range(n)]


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture
def run_dir(tmp_path):
    """A finished 6-step TTRL run: a NaN in the metrics, a truncated last line, before/after evals."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(CONFIG)
    records = series(LENGTHS, RATIOS, ENTROPY)
    records[2]["reward/mean"] = float("nan")
    for r in records:
        r.update({"band/below_fraction": 0.1, "band/above_fraction": 0.2})
    write_lines(run / "metrics.jsonl", records, tail='{"step": 7, "reward/me')
    write_lines(run / "eval.jsonl", [BEFORE, AFTER])
    (run / "final").mkdir()
    return run


# ------------------------------------------------------------------ read_jsonl

def test_read_jsonl_tolerates_truncated_last_line_and_reads_nan(run_dir, tmp_path):
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the cut step-7 line is dropped
    assert math.isnan(records[2]["reward/mean"]) and math.isnan(records[0]["entropy/other_mean"])
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n\n{"step": 2}')  # blank line; last line complete but no newline
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


# ------------------------------------------------------------------ collapse_warnings

def test_length_collapse_fires_naming_the_step():
    warnings = collapse_warnings(series(lengths=LENGTHS))
    assert len(warnings) == 1
    w = warnings[0]
    assert w.startswith("length collapse:") and "step 6" in w
    assert "43.3" in w and "100.0" in w  # last-3 mean 43.3 vs initial 100


def test_vote_saturation_with_entropy_collapse_fires():
    warnings = collapse_warnings(series(ratios=RATIOS, entropies=ENTROPY))
    assert len(warnings) == 1
    w = warnings[0]
    assert w.startswith("vote saturation:") and "step 6" in w
    assert "0.980" in w and "0.333" in w and "1.100" in w  # ratio, last-3 entropy, initial entropy


def test_both_kinds_at_most_one_warning_each():
    warnings = collapse_warnings(series(LENGTHS, RATIOS, ENTROPY))
    kinds = [w.split(":", 1)[0] for w in warnings]
    assert kinds == ["length collapse", "vote saturation"]


def test_no_warning_for_healthy_or_half_conditions():
    assert collapse_warnings(series(lengths=[100, 104, 98, 95, 101, 97])) == []
    # vote saturated but entropy stable: an easy question set, not a collapse
    assert collapse_warnings(series(ratios=[0.96, 0.97, 1.0, 1.0, 0.98, 1.0], entropies=[1.0, 0.95, 1.0, 0.9, 0.92, 0.9])) == []
    # entropy collapsed but the vote is far from saturated
    assert collapse_warnings(series(ratios=[0.5] * 6, entropies=ENTROPY)) == []
    # a 40 % drop is above the 0.5 threshold (last-3 mean 66.7 > 50)
    assert collapse_warnings(series(lengths=[100, 100, 100, 70, 65, 65])) == []


def test_fork_entropy_collapse_fires_whatever_the_vote():
    # SPINE v1's first 6 long-protocol steps: first-3 mean 0.6133, last-3 mean 0.2833 < 0.5 x 0.6133
    forks = [0.70, 0.64, 0.50, 0.36, 0.26, 0.23]
    records = [dict(r, **{"entropy/top20_mean": h}) for r, h in zip(series(ratios=[0.5] * 6), forks)]
    warnings = collapse_warnings(records)
    assert len(warnings) == 1 and warnings[0].startswith("fork entropy collapse:") and "step 6" in warnings[0]
    assert "0.283" in warnings[0] and "0.613" in warnings[0]
    # a slow decline (last-3 0.50 vs 0.5 x 0.65) and a run that never logged it: no warning
    slow = [dict(r, **{"entropy/top20_mean": h}) for r, h in zip(series(ratios=[0.5] * 6),
                                                                   [0.70, 0.65, 0.60, 0.55, 0.50, 0.45])]
    assert collapse_warnings(slow) == [] and collapse_warnings(series(ratios=[0.5] * 6)) == []


def test_thresholds_are_parameters():
    lengths = [100, 100, 100, 70, 65, 65]  # last-3 mean 66.7 < 0.7 x 100
    assert collapse_warnings(series(lengths=lengths), length_fraction=0.7)[0].startswith("length collapse:")


def test_fewer_than_two_steps_nan_and_missing_values():
    assert collapse_warnings([]) == []
    assert collapse_warnings(series(lengths=[100.0])) == []
    # NaN / missing lengths are skipped: the windows are over the steps that have a value
    records = series(lengths=LENGTHS)
    records.insert(3, {"step": 99, "completion/length_mean": float("nan")})
    records.insert(1, {"step": 98, "optim/skipped_step": 1.0})
    warnings = collapse_warnings(records)
    assert len(warnings) == 1 and "43.3" in warnings[0]
    # two steps: windows of one step each, 100 -> 40 halves the length
    assert "step 2" in collapse_warnings(series(lengths=[100.0, 40.0]))[0]


# ------------------------------------------------------------------ make_plots

def test_make_plots_writes_every_png(run_dir):
    paths = make_plots(run_dir)
    assert [p.name for p in paths] == ["reward.png", "eval.png", "length.png", "entropy.png", "selection.png"]
    for p in paths:
        assert p.parent == run_dir / "plots"
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not list((run_dir / "plots").glob("*.tmp*"))
    assert "matplotlib.pyplot" not in sys.modules  # Agg canvas directly, no global pyplot state


def test_make_plots_skips_plots_without_data(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    assert make_plots(run) == []  # no logs at all: nothing, no error
    write_lines(run / "metrics.jsonl", [{"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": 0.75}])
    # no labels: eval.png shows the majority ratio instead of accuracies
    write_lines(run / "eval.jsonl", [{"tag": "before", "step": 0, "eval/majority_ratio": 0.6,
                                     "eval/majority_ratio_se": 0.1}])
    names = [p.name for p in make_plots(run)]
    assert names == ["reward.png", "eval.png"]
    assert not (run / "plots" / "entropy.png").exists()


# ------------------------------------------------------------------ write_report

def test_write_report_contents(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.md" and not (run_dir / "report.md.tmp").exists()
    text = path.read_text()
    # what was run
    assert "SmolLM2-135M-Instruct" in text  # [model].model absent: the embedded model
    assert "`arith:2:24:0`" in text and "task: math" in text and "preset: ttrl" in text
    for item in ["steps=6", "questions_per_step=3", "num_votes=8", "num_train_samples=4", "max_new_tokens=96",
                 "temperature=1.0", "lr=2e-05", "updates_per_batch=1", "precision=fp32"]:
        assert item in text
    # before / after: value ± se, after − before
    diff = AFTER["eval/greedy_pass@1"] - BEFORE["eval/greedy_pass@1"]
    assert f"| greedy_pass@1 | 0.250 ± 0.090 | 0.375 ± 0.100 | {diff:+.3f} |" in text
    diff = AFTER["eval/majority_ratio"] - BEFORE["eval/majority_ratio"]
    assert f"| majority_ratio | 0.600 ± 0.050 | 0.900 ± 0.040 | {diff:+.3f} |" in text
    assert f"| greedy_length | 80.000 | 50.000 | {50.0 - 80.0:+.3f} |" in text
    assert "_se |" not in text  # standard errors are not rows
    table = text.split("## Before / after")[1].split("## Training")[0]
    assert table.index("greedy_pass@1") < table.index("greedy_length")  # accuracies first
    assert "labels are used only for" in text.lower()
    # training summary
    assert "steps run: 6" in text and "mean step time: 2.00 s" in text
    assert f"total sampled tokens: {int(24 * sum(LENGTHS))}" in text
    assert "| completion/length_mean | 100 | 30 |" in text
    # warnings computed from metrics.jsonl
    warnings_part = text.split("## Warnings")[1].split("## Plots")[0]
    assert "length collapse: step 6" in warnings_part and "vote saturation: step 6" in warnings_part
    # plots, by relative links that resolve
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "![reward](plots/reward.png)" in text and len(links) == 5
    for link in links:
        assert not link.startswith("/") and (run_dir / link).is_file()


def test_write_report_uses_given_warnings(run_dir):
    text = write_report(run_dir, warnings=[]).read_text()
    assert text.split("## Warnings")[1].split("## Plots")[0].strip() == "none"
    text = write_report(run_dir, warnings=["custom: step 3: something"]).read_text()
    assert "- custom: step 3: something" in text and "length collapse" not in text


def test_write_report_zero_step_run(tmp_path):
    run = tmp_path / "evalonly"
    run.mkdir()
    (run / "config.toml").write_text('preset = "none"\n\n[model]\nmodel = "my/model"\n\n[data]\ndata = "q.jsonl"\n'
                                     "\n[optim]\nsteps = 0\n")
    write_lines(run / "eval.jsonl", [BEFORE])
    text = write_report(run).read_text()
    assert "`my/model`" in text and "preset: none" in text and "steps=0" in text
    assert "| metric | value |" in text and "| greedy_pass@1 | 0.250 ± 0.090 |" in text
    assert "No training steps" in text
    assert text.split("## Warnings")[1].split("## Plots")[0].strip() == "none"
    assert "![eval](plots/eval.png)" in text and (run / "plots" / "eval.png").is_file()
    assert "reward.png" not in text


def test_write_report_without_eval_or_config(tmp_path):
    run = tmp_path / "noeval"
    run.mkdir()
    write_lines(run / "metrics.jsonl", series(lengths=[100.0, 90.0]))
    text = write_report(run).read_text()
    assert "config.toml is missing" in text and "No evaluation was recorded" in text
    assert "steps run: 2" in text and "eval.png" not in text and "![length](plots/length.png)" in text
