"""The benchmark scripts' statistics (bench/ is not a package: loaded from its path)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


quality = _load("quality")


def test_paired_bootstrap_of_a_constant_difference_is_that_constant():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    b = a - 0.25  # every question differs by exactly 0.25: any resample has mean 0.25
    r = quality.paired_bootstrap(a, b, n_boot=200)
    assert r == pytest.approx({"diff": 0.25, "ci_low": 0.25, "ci_high": 0.25})


def test_paired_bootstrap_interval_covers_the_mean_and_pairs_questions():
    # a - b = [1, 0, 0, 0]: mean 0.25; a resample's mean is (#times question 0 drawn) / 4, so the
    # interval lies on the grid {0, 0.25, 0.5, 0.75, 1} and spans 0 .. 0.75 (P(4 draws of q0) = 1/256).
    a = np.array([1.0, 1.0, 0.0, 0.0])
    b = np.array([0.0, 1.0, 0.0, 0.0])
    r = quality.paired_bootstrap(a, b, n_boot=20000, seed=1)
    assert r["diff"] == 0.25
    assert r["ci_low"] == 0.0 and r["ci_high"] == 0.75
    # Unpaired questions would not give a zero-width interval for identical columns.
    same = quality.paired_bootstrap(a, a.copy())
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_parse_lrs_grid_and_per_method_values():
    assert quality.parse_lrs(["1e-5", "3e-6"], ["ttrl", "spine"]) == {"ttrl": [1e-5, 3e-6], "spine": [1e-5, 3e-6]}
    assert quality.parse_lrs(["ttrl=3e-6", "spine=1e-5"], ["ttrl", "spine"]) == {"ttrl": [3e-6], "spine": [1e-5]}
    with pytest.raises(SystemExit, match="unknown method"):
        quality.parse_lrs(["grpo=1e-5"], ["ttrl"])


def test_per_question_values_from_records():
    rec = {"records": [{"greedy_correct": True, "samples_correct": 3, "maj_correct": True},
                       {"greedy_correct": False, "samples_correct": 0, "maj_correct": False}]}
    pq = quality.per_question(rec, k=4)
    assert pq["greedy"].tolist() == [1.0, 0.0]
    assert pq["avg"].tolist() == [0.75, 0.0]
    assert pq["maj"].tolist() == [1.0, 0.0]
