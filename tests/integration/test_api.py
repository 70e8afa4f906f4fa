"""The Python API mirrors the CLI: spine_ttrl.adapt(config) and spine_ttrl.evaluate_model(...)."""

import pytest

import spine_ttrl

pytestmark = pytest.mark.slow


def test_evaluate_model_on_generated_questions():
    res = spine_ttrl.evaluate_model(None, "arith:1:3:0", num_samples=2, max_new_tokens=24)
    m = res.metrics
    assert m["questions"] == 3 and len(res.records) == 3
    for k in ("greedy_pass@1", "greedy_pass@1_se", "avg@2", "maj@2", "pass@2", "majority_ratio", "greedy_boxed_rate"):
        assert k in m
    assert 0.0 <= m["greedy_pass@1"] <= 1.0
    # pass@k >= avg@k (pass@1 estimate) always, per question and so on average
    assert m["pass@2"] >= m["avg@2"] - 1e-12


def test_adapt_api_evaluation_only(tmp_path):
    cfg = spine_ttrl.make_config("none", overrides={
        "data": {"data": "arith:1:2:0"}, "sampling": {"max_new_tokens": 8},
        "eval": {"eval_samples": 0}, "run": {"out": str(tmp_path / "r"), "progress": False}})
    result = spine_ttrl.adapt(cfg)
    assert isinstance(result, spine_ttrl.RunResult)
    assert result.metrics == [] and result.eval_before is not None
    assert (tmp_path / "r" / "report.md").exists() and not (tmp_path / "r" / "final").exists()
