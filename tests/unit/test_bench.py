"""The benchmark scripts' statistics (bench/ is not a package: loaded from its path)."""

import importlib.util
import math
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
    assert np.isnan(pq["changed"]).all()  # no base evaluation to compare with


def test_per_question_greedy_against_majority_and_base():
    rec = {"records": [
        {"id": "a", "greedy_answer": "1/2", "majority": "0.5", "greedy_correct": True, "maj_correct": True},
        {"id": "b", "greedy_answer": "3", "majority": "4", "greedy_correct": True, "maj_correct": False},
        {"id": "c", "greedy_answer": None, "majority": "7", "greedy_correct": False, "maj_correct": True},
        {"id": "d", "greedy_answer": "2", "majority": None, "greedy_correct": False, "maj_correct": False}]}
    base = {"records": [{"id": "a", "greedy_answer": "0.5"}, {"id": "b", "greedy_answer": "4"},
                        {"id": "c", "greedy_answer": None}]}
    pq = quality.per_question(rec, k=8, base=base)
    assert pq["agree"].tolist() == [1.0, 0.0, 0.0, 0.0]  # equivalent forms agree; a missing answer never does
    assert pq["split_greedy_right"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert pq["split_majority_right"].tolist() == [0.0, 0.0, 1.0, 0.0]
    # a: 1/2 = 0.5 unchanged; b: 3 vs 4 changed; c: missing in both = unchanged; d: not in the base
    assert pq["changed"][:3].tolist() == [0.0, 1.0, 0.0] and np.isnan(pq["changed"][3])


def _run_record(method, seed, greedy, samples, steps):
    # answers: "1" (the label) when correct, else "0" -- so the greedy answer equals the majority iff both
    # are right or both wrong
    recs = [{"id": str(i), "label": "1", "greedy_correct": bool(g), "samples_correct": s, "maj_correct": s >= 1,
             "greedy_answer": "1" if g else "0", "majority": "1" if s >= 1 else "0"}
            for i, (g, s) in enumerate(zip(greedy, samples))]
    ev = {"greedy_pass@1": float(np.mean(greedy)), "greedy_pass@1_se": 0.0, "avg@2": float(np.mean(samples)) / 2,
          "avg@2_se": 0.0, "maj@2": float(np.mean([s >= 1 for s in samples])), "greedy_boxed_rate": 1.0,
          "time_s": 10.0 * (seed + 1)}
    return {"method": method, "seed": seed, "lr": 1e-4, "wall_s": 10.0 * (seed + 1), "eval": ev, "records": recs,
            "steps": steps}


def test_summarize_averages_seeds_per_question_then_compares(tmp_path):
    import json

    steps = [{"step": 1, "time/step_s": 3.0, "vote/label_accuracy": 0.5, "vote/sample_accuracy": 0.25, "completion/length_mean": 100.0,
              "entropy/forking_mean": 1.0, "entropy/other_mean": float("nan")},
             {"step": 2, "vote/label_accuracy": 1.0, "vote/sample_accuracy": 0.75, "completion/length_mean": 80.0,
              "entropy/forking_mean": 2.0, "entropy/other_mean": 0.5}]
    (tmp_path / "base.json").write_text(json.dumps(_run_record("none", 0, [0, 0, 1, 0], [0, 1, 2, 0], [])))
    runs = {"ttrl-lr0.0001-s0.json": _run_record("ttrl", 0, [0, 1, 1, 0], [1, 1, 2, 0], steps),
            "spine-lr0.0001-s0.json": _run_record("spine", 0, [1, 1, 1, 0], [2, 1, 2, 0], steps),
            "spine-lr0.0001-s1.json": _run_record("spine", 1, [1, 0, 1, 0], [2, 1, 2, 1], steps)}
    for name, rec in runs.items():
        (tmp_path / name).write_text(json.dumps(rec))
    s = quality.summarize(tmp_path, k=2)
    spine = s["methods"]["spine-lr0.0001"]
    assert spine["seeds"] == [0, 1] and spine["wall_s"] == 15.0 + 3.0  # eval time + step times
    assert spine["eval"]["greedy_pass@1"] == pytest.approx((0.75 + 0.5) / 2)
    assert spine["pseudo_label_accuracy"] == 0.75
    assert (spine["sample_accuracy_first"], spine["sample_accuracy_last"]) == (0.25, 0.75)
    assert (spine["length_first"], spine["length_last"]) == (100.0, 80.0)
    assert spine["entropy_other_mean"] == 0.5  # NaN steps skipped
    # greedy = majority per question: spine s0 [1, 1, 1, 1], s1 [1, 0, 1, 0]; base [1, 0, 1, 1]
    assert spine["eval"]["greedy_is_majority"] == 0.75 and s["base"]["greedy_is_majority"] == 0.75
    # where they disagree: base q1 (greedy 0, majority 1); spine s1 q1, q3 (majority right) -> [0, .5, 0, .5]
    assert s["base"]["split_majority_right"] == 0.25 and s["base"]["split_greedy_right"] == 0.0
    assert spine["eval"]["split_majority_right"] == 0.25 and spine["eval"]["split_greedy_right"] == 0.0
    # greedy answers vs the base's ["0", "0", "1", "0"]: spine s0 changes q0, q1, s1 q0 -> [1, .5, 0, 0]
    assert spine["eval"]["greedy_changed"] == 0.375
    assert s["methods"]["ttrl-lr0.0001"]["eval"]["greedy_changed"] == 0.25  # [0, 1, 0, 0]
    assert np.isnan(s["base"]["greedy_changed"])
    # Per question, seeds averaged first: spine greedy = [1, .5, 1, 0]; ttrl = [0, 1, 1, 0]; base = [0, 0, 1, 0].
    c = s["paired_bootstrap"]
    assert c["spine-lr0.0001 - ttrl-lr0.0001"]["greedy"]["diff"] == pytest.approx((1 - 0.5 + 0 + 0) / 4)
    assert c["spine-lr0.0001 - base"]["greedy"]["diff"] == pytest.approx((1 + 0.5) / 4)
    # spine avg@2 = [1, .5, 1, .25]; base = [0, .5, 1, 0]
    assert c["spine-lr0.0001 - base"]["avg"]["diff"] == pytest.approx((1 + 0 + 0 + 0.25) / 4)
    assert c["ttrl-lr0.0001 - base"]["greedy"]["diff"] == pytest.approx(0.25)
    quality.write_markdown(s, tmp_path / "summary.md")
    md = (tmp_path / "summary.md").read_text()
    assert "| spine-lr0.0001 (seeds [0, 1]) | 0.625" in md and "0.250→0.750" in md and "100→80" in md
    assert "| base | – | 0.25 | 0.00 | 0.25 |" in md
    assert "| spine-lr0.0001 (seeds [0, 1]) | 0.38 | 0.25 | 0.00 | 0.25 |" in md


def test_sets_and_variants_name_runs_apart():
    assert quality.parse_sets(["spine.band=none", "spine.beta_up=0.1", "optim.lr=1"]) == {
        "spine": {"band": "none", "beta_up": "0.1"}, "optim": {"lr": "1"}}
    for bad in ("band=none", "spine.band", ".band=x", "spine.=x"):
        with pytest.raises(SystemExit):
            quality.parse_sets([bad])
    assert quality.run_key("spine", "", 1e-4) == "spine-lr0.0001"
    assert quality.run_key("spine", "noband", 1e-4) == "spine+noband-lr0.0001"


def test_a_variant_is_summarised_and_compared_on_its_own(tmp_path):
    import json

    steps = [{"step": 1, "time/step_s": 1.0}]
    (tmp_path / "base.json").write_text(json.dumps(_run_record("none", 0, [0, 0, 1, 0], [0, 1, 2, 0], [])))
    recs = {"ttrl-lr0.0001-s0.json": _run_record("ttrl", 0, [0, 1, 1, 0], [1, 1, 2, 0], steps),
            "spine-lr0.0001-s0.json": _run_record("spine", 0, [1, 1, 1, 0], [2, 1, 2, 0], steps),
            "spine+noband-lr0.0001-s0.json": dict(_run_record("spine", 0, [1, 1, 1, 1], [2, 2, 2, 2], steps),
                                                  variant="noband")}
    for name, rec in recs.items():
        (tmp_path / name).write_text(json.dumps(rec))
    s = quality.summarize(tmp_path, k=2)
    assert list(s["methods"]) == ["ttrl-lr0.0001", "spine-lr0.0001", "spine+noband-lr0.0001"]
    assert s["methods"]["spine+noband-lr0.0001"]["eval"]["greedy_pass@1"] == 1.0
    assert s["methods"]["spine-lr0.0001"]["eval"]["greedy_pass@1"] == 0.75
    c = s["paired_bootstrap"]
    assert c["spine+noband-lr0.0001 - ttrl-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.5)
    assert c["spine-lr0.0001 - ttrl-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.25)


def test_ttrl_switches_are_compared_against_ttrl_and_only_precision_variants_are_references(tmp_path):
    import json

    steps = [{"step": 1, "time/step_s": 1.0}]
    (tmp_path / "base.json").write_text(json.dumps(_run_record("none", 0, [0, 0, 1, 0], [0, 1, 2, 0], [])))
    recs = {"ttrl-lr0.0001-s0.json": _run_record("ttrl", 0, [0, 1, 1, 0], [1, 1, 2, 0], steps),
            "ttrl+fp32-lr0.0001-s0.json": dict(_run_record("ttrl", 0, [0, 0, 1, 0], [1, 1, 2, 0], steps),
                                               variant="fp32", set=["model.precision=fp32"]),
            "ttrl+loo-lr0.0001-s0.json": dict(_run_record("ttrl", 0, [1, 1, 1, 1], [2, 2, 2, 2], steps),
                                              variant="loo", set=["spine.reward=leave-one-out"]),
            "spine-lr0.0001-s0.json": _run_record("spine", 0, [1, 1, 1, 0], [2, 1, 2, 0], steps)}
    for name, rec in recs.items():
        (tmp_path / name).write_text(json.dumps(rec))
    c = quality.summarize(tmp_path, k=2)["paired_bootstrap"]
    assert c["ttrl+loo-lr0.0001 - ttrl-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.5)
    assert c["ttrl+loo-lr0.0001 - ttrl+fp32-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.75)
    assert c["ttrl+loo-lr0.0001 - base"]["greedy"]["diff"] == pytest.approx(0.75)
    assert c["spine-lr0.0001 - ttrl+fp32-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.5)
    assert not [k for k in c if k.endswith(" - ttrl+loo-lr0.0001")]  # a switch is not a reference
    assert quality.reference_method({"method": "ttrl", "set": ["spine.token_weights=steer"]}) == "ttrl-switch"
    assert quality.reference_method({"method": "ttrl", "set": ["model.precision=bf16"]}) == "ttrl"
    # the band's weights do nothing in TTRL, which has no band: still the reference
    assert quality.reference_method({"method": "ttrl", "set": ["spine.beta_low=1", "spine.beta_up=1"]}) == "ttrl"
    assert quality.reference_method({"method": "ttrl", "set": ["spine.beta_up=1", "spine.reward=ttrv"]}) == "ttrl-switch"
    assert quality.reference_method({"method": "spine", "set": ["spine.band=none"]}) == "spine"


def test_pooling_concatenates_blocks_questions_and_leaves_out_unfinished_keys(tmp_path):
    import json

    a, b = tmp_path / "block-a", tmp_path / "block-b"
    a.mkdir(), b.mkdir()
    steps = [{"step": 1, "completion/length_mean": 100.0, "vote/label_accuracy": 0.5, "time/step_s": 2.0},
             {"step": 2, "completion/length_mean": 80.0, "vote/label_accuracy": 1.0, "time/step_s": 4.0}]
    (a / "base.json").write_text(json.dumps(_run_record("none", 0, [0, 1], [0, 1], [])))
    (b / "base.json").write_text(json.dumps(_run_record("none", 0, [0, 0, 0], [0, 0, 2], [])))
    (a / "ttrl-lr0.0001-s0.json").write_text(json.dumps(_run_record("ttrl", 0, [1, 1], [2, 1], steps)))
    (b / "ttrl-lr0.0001-s0.json").write_text(json.dumps(_run_record("ttrl", 0, [0, 1, 0], [0, 2, 2], steps)))
    (a / "spine-lr0.0001-s0.json").write_text(json.dumps(_run_record("spine", 0, [1, 1], [2, 2], steps)))
    (a / "spine-lr0.0001-s1.json").write_text(json.dumps(_run_record("spine", 1, [1, 0], [2, 0], steps)))
    (b / "spine-lr0.0001-s0.json").write_text(json.dumps(_run_record("spine", 0, [1, 1, 1], [2, 2, 2], steps)))
    (b / "spine-lr0.0001-s1.json").write_text(json.dumps(_run_record("spine", 1, [0, 1, 1], [0, 2, 2], steps)))
    (a / "spine-v2-lr0.0001-s0.json").write_text(json.dumps(_run_record("spine-v2", 0, [1, 1], [2, 2], steps)))
    s = quality.summarize_pool([a, b], k=2, name="pooled")
    assert s["base"]["questions"] == 5 and s["base"]["greedy_pass@1"] == pytest.approx(1 / 5)
    # base avg@2 per question: [0, .5] + [0, 0, 1] -> mean .3
    assert s["base"]["avg@2"] == pytest.approx(0.3)
    assert s["base"]["greedy_pass@1_se"] == pytest.approx(np.std([0, 1, 0, 0, 0], ddof=1) / np.sqrt(5))
    spine = s["methods"]["spine-lr0.0001"]
    # seeds averaged per block first: greedy [1, .5] + [.5, 1, 1] -> mean 4/5
    assert spine["questions"] == 5 and spine["seeds"] == [0, 1] and spine["greedy_pass@1"] == pytest.approx(0.8)
    # training numbers over all 4 runs (2 blocks x 2 seeds): steps 6 s + eval 10 s (seed 0) or 20 s (seed 1)
    assert spine["wall_s"] == pytest.approx(21.0) and spine["pseudo_label_accuracy"] == pytest.approx(0.75)
    assert (spine["length_first"], spine["length_last"]) == (100.0, 80.0)
    assert "spine-v2-lr0.0001" not in s["methods"] and "block-b" in s["left_out"]["spine-v2-lr0.0001"]
    c = s["paired_bootstrap"]
    # spine - ttrl greedy per question: [0, -.5] + [.5, 0, 1] -> mean 1/5
    assert c["spine-lr0.0001 - ttrl-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.2)
    # ttrl - base avg@2: [1, .5] - [0, .5] ; [0, 1, 1] - [0, 0, 1] -> [1, 0, 0, 1, 0] mean .4
    assert c["ttrl-lr0.0001 - base"]["avg"]["diff"] == pytest.approx(0.4)
    # greedy = majority: base [1, 1] + [1, 1, 0], ttrl [1, 1] + [1, 1, 0], spine all agree
    assert s["base"]["greedy_is_majority"] == pytest.approx(0.8)
    assert s["methods"]["ttrl-lr0.0001"]["greedy_is_majority"] == pytest.approx(0.8)
    assert spine["greedy_is_majority"] == 1.0
    # greedy changed vs each block's base: spine [1, .5] + [.5, 1, 1], ttrl [1, 0] + [0, 1, 0]
    assert spine["greedy_changed"] == pytest.approx(0.8)
    assert s["methods"]["ttrl-lr0.0001"]["greedy_changed"] == pytest.approx(0.4)
    # SE <= .03 needs n = var / .03**2; greedy variances (ddof 1): base .2, ttrl [1,1,0,1,0] .3, spine .075
    assert s["questions_for_se"]["greedy_pass@1"] == 334  # ceil(.3 / .0009)
    # avg@2 per question: base [0, .5, 0, 0, 1] and ttrl [1, .5, 0, 1, 1] variance .2, spine .075
    assert s["questions_for_se"]["avg@2"] == 223  # ceil(.2 / .0009)
    quality.write_pool_markdown(s, tmp_path / "pooled.md")
    md = (tmp_path / "pooled.md").read_text()
    assert "needs ≈ 334 questions for greedy pass@1" in md
    assert "| spine-lr0.0001 (seeds [0, 1]) | 5 | 0.800" in md
    # base: block b's question 3 has greedy 0 vs majority 1 (right) -> 1/5
    assert "| base | – | 0.20 | 0.00 | 0.20 |" in md and "| spine-lr0.0001 (seeds [0, 1]) | 0.80 | 0.00 |" in md
    assert "| 0.750 | –→– | 100→80 | – / – | 21 |" in md and "| 0.80 | 1.00 / " in md
    assert "spine-v2-lr0.0001 (seeds [0] not finished in block-b)" in md
    # in each table the header and every row have the same number of columns
    tables = [[line for line in chunk.splitlines() if line.startswith("|")] for chunk in md.split("\n\n")]
    tables = [t for t in tables if t]
    # per block, points over that block's base: ttrl greedy 1 - .5, avg@2 .75 - .25 (block a) and
    # 1/3 - 0, 2/3 - 1/3 (block b); spine greedy [1, .5] -> .75 - .5, avg@2 [1, .5] -> .75 - .25 (a) and
    # [.5, 1, 1] -> 5/6 - 0, 5/6 - 1/3 (b)
    blocks = s["per_block"]
    assert [b["block"] for b in blocks] == ["block-a", "block-b"] and [b["questions"] for b in blocks] == [2, 3]
    assert blocks[1]["base"] == pytest.approx({"greedy": 0.0, "avg": 1 / 3})
    assert blocks[1]["methods"]["spine-lr0.0001"] == pytest.approx({"greedy": 5 / 6, "avg": 5 / 6})
    assert "spine-v2-lr0.0001" not in blocks[0]["methods"]
    assert "| block-a | 2 | 0.500 / 0.250 | +50.0 / +50.0 | +25.0 / +50.0 |" in md
    assert "| block-b | 3 | 0.000 / 0.333 | +33.3 / +33.3 | +83.3 / +50.0 |" in md
    assert "| blocks above base |  |  | 2 / 2 of 2 | 2 / 2 of 2 |" in md
    assert "| blocks below base |  |  | 0 / 0 of 2 | 0 / 0 of 2 |" in md
    # methods, comparisons, greedy vs samples: each a header, a separator and 3 rows; per block: 2 blocks
    # and the above / below counts
    assert [len(t) for t in tables] == [5, 5, 5, 6]
    assert all(len({line.count("|") for line in t}) == 1 for t in tables)
    out = quality.plot_pool_curves([a, b], list(s["methods"]), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        quality.summarize_pool([a, tmp_path / "missing"], k=2, name="x")


def test_pooling_refuses_blocks_that_share_questions_or_models(tmp_path):
    import json

    def block(name, data, model="m"):
        d = tmp_path / name
        d.mkdir()
        rec = dict(_run_record("none", 0, [0, 1], [0, 1], []), data=data, model=model)
        (d / "base.json").write_text(json.dumps(rec))
        return d

    def questions(name, prompts):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
        return str(path)

    a = block("a", questions("qa.jsonl", ["What is 1+1?", "What is 2+2?"]))
    b = block("b", questions("qb.jsonl", ["What is 3+3?", "What is 2+2?"]))
    c = block("c", questions("qc.jsonl", ["What is 5+5?"]))
    with pytest.raises(SystemExit, match="share the question 'What is 2\\+2\\?'"):
        quality.summarize_pool([a, b], k=2, name="x")
    assert quality.summarize_pool([a, c], k=2, name="x")["base"]["questions"] == 4
    with pytest.raises(SystemExit, match="named twice"):
        quality.summarize_pool([a, a], k=2, name="x")
    same = block("same", "arith:5:4:1")
    again = block("again", "arith:5:4:1")
    with pytest.raises(SystemExit, match="same questions"):
        quality.summarize_pool([same, again], k=2, name="x")
    other = block("other", "arith:5:4:2", model="another-model")
    with pytest.raises(SystemExit, match="different models"):
        quality.summarize_pool([same, other], k=2, name="x")


def test_pooling_without_a_base_reports_each_blocks_own_numbers(tmp_path):
    import json

    for name, greedy in (("a", [1, 0]), ("b", [0, 0, 1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ttrl-lr0.0001-s0.json").write_text(
            json.dumps(_run_record("ttrl", 0, greedy, [1] * len(greedy), [])))
    s = quality.summarize_pool([tmp_path / "a", tmp_path / "b"], k=2, name="pooled")
    assert "base" not in s and s["methods"]["ttrl-lr0.0001"]["greedy_pass@1"] == pytest.approx(2 / 5)
    # greedy [1, 0, 0, 0, 1]: variance (ddof 1) .3 -> ceil(.3 / .0009)
    assert s["questions_for_se"]["greedy_pass@1"] == 334
    assert [b["base"] for b in s["per_block"]] == [None, None]
    quality.write_pool_markdown(s, tmp_path / "pooled.md")
    md = (tmp_path / "pooled.md").read_text()
    assert "| a | 2 | 0.500 / 0.500 |" in md and "| b | 3 | 0.333 / 0.500 |" in md
    assert "blocks above base" not in md


reading = _load("reading")


def _reading_pool(root):
    """Two blocks (2 and 3 questions) with a base and one seed of TTRL, SPINE and SPINE-v2, pooled."""
    import json

    steps = [{"step": 1, "completion/length_mean": 100.0}, {"step": 2, "completion/length_mean": 90.0}]
    runs = {"block1-T": {"none": ([0, 1], [0, 1]), "ttrl": ([1, 1], [2, 1]), "spine": ([0, 1], [1, 1]),
                         "spine-v2": ([1, 0], [2, 0])},
            "block2-T": {"none": ([0, 0, 0], [0, 0, 2]), "ttrl": ([0, 1, 0], [0, 2, 2]),
                         "spine": ([1, 0, 0], [2, 0, 2]), "spine-v2": ([0, 0, 0], [0, 0, 0])}}
    for block, methods in runs.items():
        (root / block).mkdir(parents=True)
        for method, (greedy, samples) in methods.items():
            rec = _run_record(method, 0, greedy, samples, [] if method == "none" else steps)
            rec["eval"].update({"majority_ratio": 0.9 if method == "spine-v2" else 0.6, "pass@2": 0.5,
                                "sample_length": 50.0, "greedy_length": 40.0})
            rec["model"] = "/models/tiny.gguf"
            name = "base.json" if method == "none" else f"{method}-lr0.0001-s0.json"
            (root / block / name).write_text(json.dumps(rec))
    s = quality.summarize_pool([root / b for b in runs], k=2, name="pooled-T")
    (root / "pooled-T").mkdir()
    (root / "pooled-T" / "summary.json").write_text(json.dumps(s))
    quality.write_pool_markdown(s, root / "pooled-T" / "summary.md")
    return s


def test_reading_quotes_the_pools_numbers_and_recomputes_prefixes(tmp_path, monkeypatch):
    monkeypatch.setattr(reading.quality, "ROOT", tmp_path)
    s = _reading_pool(tmp_path)
    keys = reading._keys(s)
    assert keys == {"ttrl": "ttrl-lr0.0001", "spine": "spine-lr0.0001", "spine-v2": "spine-v2-lr0.0001"}
    blocks = reading.block_stats(s, keys)
    grow = reading.growth(s, keys, first=1)
    # prefix of block 1 (2 questions): spine − base greedy [0, 1] − [0, 1] = 0, avg@2 [.5, .5] − [0, .5] = .25;
    # both blocks (5 questions): greedy [0,1,1,0,0] − [0,1,0,0,0] = .2, avg@2 [.5,.5,1,0,1] − [0,.5,0,0,1] = .3
    assert [g["questions"] for g in grow] == [2, 5]
    assert [g["spine_base"]["greedy"]["diff"] for g in grow] == pytest.approx([0.0, 0.2])
    assert [g["spine_base"]["avg"]["diff"] for g in grow] == pytest.approx([0.25, 0.3])
    text = reading.reading(s, blocks, grow)
    # TTRL greedy [1,1,0,1,0] = .6 against base .2; avg@2 [1,.5,0,1,1] = .7 against .3
    assert "greedy pass@1 0.200 → 0.600 (+40.0 [" in text and "avg@2 0.300 → 0.700 (+40.0 [" in text
    # SPINE changes one greedy answer (block 2, question 0) of 5; none on block 1; TTRL changes 2 (block 1 q0, block 2 q1)
    assert "1 of its 5 greedy answers differ from the base's (none on block 1), TTRL's 2;" in text
    # per block (ties count as neither): TTRL above on both; SPINE ties block 1 on greedy; SPINE-v2 ties
    # greedy on both and is below on block 2's avg@2 (0 vs 1/3); SPINE below TTRL on block 1 only
    assert "TTRL is 2 / 2 above and 0 / 0 below the base, SPINE 1 / 2 above and 0 / 0 below, SPINE-v2 " \
           "0 / 1 above and 0 / 1 below; SPINE is 0 / 0 above and 1 / 1 below TTRL." in text
    assert "SPINE-v2 − base avg@2 lies" not in text and "Per block, on avg@2: block 1" in text  # no "other blocks"
    assert "higher than the base's on 2 of 2 blocks" in text
    # SPINE − TTRL avg@2 .6 − .7 = −10 points: the +3 target is missed by 13
    assert "SPINE ≥ TTRL + 3 points — avg@2 −10.0 [" in text and "missed by 13.0 points" in text
    assert "SPINE − base avg@2 +25.0 → +30.0, greedy +0.0 → +20.0" in text
    assert "met (0.90× in training" in text  # rollouts 100 → 90 tokens


def test_reading_rewrites_only_the_marked_regions(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(reading.quality, "ROOT", tmp_path)
    _reading_pool(tmp_path)
    doc = tmp_path / "quality.md"
    doc.write_text("intro\n<!-- pooled-table -->\nold table\n<!-- /pooled-table -->\nmiddle\n"
                   "<!-- pooled-reading -->\nold reading\n<!-- /pooled-reading -->\n"
                   "<!-- pooled-headline -->\n<!-- /pooled-headline -->\nend\n")
    monkeypatch.setattr("sys.argv", ["reading.py", "pooled-T", "--doc", str(doc)])
    reading.main()
    out = doc.read_text()
    assert out.startswith("intro\n<!-- pooled-table -->\n| method | questions |") and "\nmiddle\n" in out
    assert "old table" not in out and "old reading" not in out and out.endswith("<!-- /pooled-headline -->\nend\n")
    assert "Reading of `pooled-T` (5 questions from 2 blocks" in out
    # SPINE − TTRL avg@2 −10, SPINE − base +30 / +20: the first target missed, the second met
    assert "**Result so far** (5 questions pooled from 2 blocks, `tiny.gguf`" in out and "TTRL + 3 points not met; SPINE ≥ base + 5 points met." in out
    assert "The project's benchmark goals (point estimates, both metrics)" in out and "issue" not in out
    # five questions: standard errors far above 3 points, so the result is provisional
    assert "; standard errors up to " in out and "questions needed for ≤ 3;" in out
    assert reading.QUALITY_DOC.parts[-3:] == ("docs", "benchmarks", "quality.md")  # the default target
    with pytest.raises(SystemExit, match="pooled-reading"):
        reading.splice("no markers here", "pooled-reading", "x")
    s = json.loads((tmp_path / "pooled-T" / "summary.json").read_text())
    del s["methods"]["spine-v2-lr0.0001"]
    with pytest.raises(SystemExit, match="lacks spine-v2"):
        reading._keys(s)


def test_headline_says_result_only_when_every_rows_standard_error_is_at_most_3_points(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(reading.quality, "ROOT", tmp_path)
    _reading_pool(tmp_path)
    s = json.loads((tmp_path / "pooled-T" / "summary.json").read_text())
    rows = [s["base"]] + list(s["methods"].values())
    for row in rows:
        row["greedy_pass@1_se"], row["avg@2_se"] = 0.03, 0.029
    out = reading.headline(s)
    assert out.startswith("**Result** (5 questions") and "standard errors ≤ 3 points on every row" in out
    s["methods"]["spine-v2-lr0.0001"]["avg@2_se"] = 0.0301  # one row of one metric above: provisional
    s["questions_for_se"] = {"target": 0.03, "greedy_pass@1": 40, "avg@2": 51}
    out = reading.headline(s)
    assert out.startswith("**Result so far** (5 questions") and "standard errors up to 3.01 points, ≈ 51 questions" in out
    s["questions_for_se"]["avg@2"] = None  # no spread on a metric: the other metric's count
    assert "≈ 40 questions needed" in reading.headline(s)


def test_standard_errors_are_the_pooled_rows_sd_over_root_n(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(reading.quality, "ROOT", tmp_path)
    _reading_pool(tmp_path)
    s = json.loads((tmp_path / "pooled-T" / "summary.json").read_text())
    ses = reading.standard_errors(s, reading._keys(s))
    assert set(ses) == {"greedy_pass@1", "avg@2"} and list(ses["avg@2"]) == ["base", "TTRL", "SPINE", "SPINE-v2"]
    # base greedy [0, 1, 0, 0, 0]: sd (ddof 1) √.2, SE √.2 / √5 = .2; TTRL [1, 1, 0, 1, 0]: √(.3 / 5)
    assert ses["greedy_pass@1"]["base"] == pytest.approx(0.2)
    assert ses["greedy_pass@1"]["TTRL"] == pytest.approx((0.3 / 5) ** 0.5)


def _long():
    import sys

    sys.path.insert(0, str(BENCH))  # long.py imports quality.py from its folder
    return _load("long")


def _long_tag(tmp_path, monkeypatch):
    """bench/long.py writing its summaries under ``tmp_path``, and an empty tag ``t`` there."""
    long = _long()
    monkeypatch.setattr(long, "ROOT", tmp_path)
    (tmp_path / "t").mkdir()
    return long, tmp_path / "t"


def test_long_stop_rule_and_episode_means():
    long = _long()
    # majority share saturates at episode 3, fork entropy halves at episode 4 -> the rule fires at 4
    assert long.stop_episode([0.6, 0.8, 0.95, 0.97, 0.99], [1.0, 0.8, 0.6, 0.45, 0.3]) == 4
    assert long.stop_episode([0.99, 0.99], [1.0, 0.9]) is None  # saturated but entropy kept
    assert long.stop_episode([], []) is None
    # the length clause: answers below half the first episode's length stop it, whatever the vote
    assert long.stop_episode([0.6, 0.6, 0.7], [1.0, 1.1, 1.2], length=[250.0, 130.0, 120.0]) == 3
    assert long.stop_episode([0.6, 0.6], [1.0, 1.1], length=[250.0, 125.0]) is None  # exactly half: not below
    # whichever clause fires first wins
    assert long.stop_episode([0.95, 0.95, 0.95], [1.0, 0.4, 0.4], length=[250.0, 240.0, 100.0]) == 2
    assert long.stop_episode([], [], length=[250.0, 100.0]) == 2
    assert long.stop_episode([0.99], [float("nan")], length=[float("nan"), 1.0]) is None
    steps = [{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}, {"step": 3, "x": float("nan")}, {"step": 4, "x": 5.0}]
    assert long.per_episode_means(steps, 2, "x") == [2.0, 5.0]  # NaN left out of episode 2
    assert long.per_episode_means(steps + [{"step": 5, "x": 9.0}], 2, "x") == [2.0, 5.0]  # episode 3 incomplete
    assert long.episode_steps(16, 4) == 4 and long.episode_steps(17, 4) == 5


def _fake_run(tmp, name, greedy_by_step, per_episode_steps=2, ids=("q0", "q1", "q2", "q3"), sources=None,
              answers=None, finished=True, label_accuracy=None):
    import json

    d = tmp / name
    d.mkdir()
    (d / "config.toml").write_text(f"[optim]\nquestions_per_step = {len(ids) // per_episode_steps}\n")
    evals, recs, metrics = [], [], []
    for step, correct in greedy_by_step.items():
        tag = "before" if step == 0 else f"step{step}"
        evals.append({"tag": tag, "step": step, "eval/greedy_pass@1": sum(correct) / len(correct)})
        recs.append({"tag": tag, "step": step,
                     "records": [{"id": i, "greedy_correct": bool(c), **({"source": sources[j]} if sources else {}),
                                  **(answers[step][j] if answers else {})}
                                 for j, (i, c) in enumerate(zip(ids, correct))]})
    for s in range(1, max(greedy_by_step) + 1):
        metrics.append({"step": s, "vote/majority_ratio": 0.5, "entropy/forking_mean": 1.0,
                        "completion/length_mean": 100.0,
                        **({"vote/label_accuracy": label_accuracy[s - 1]} if label_accuracy else {})})
    for fname, rows in (("eval.jsonl", evals), ("eval_records.jsonl", recs), ("metrics.jsonl", metrics)):
        (d / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (d / "done").write_text("finished\n")


def test_long_summary_curves_best_final_and_paired_differences(tmp_path, monkeypatch):
    long, tag = _long_tag(tmp_path, monkeypatch)
    # 4 questions, 2 steps per episode; evaluations at episodes 0, 1, 2
    _fake_run(tag, "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0], 4: [1, 1, 0, 0]})
    _fake_run(tag, "spine-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 1, 1], 4: [1, 1, 1, 0]})
    _fake_run(tag, "spine-lr0.0001-s1", {0: [1, 0, 0, 0], 2: [1, 1, 1, 0], 4: [1, 1, 1, 0]})
    out = long.summary("t")
    s = out["keys"]["spine-lr0.0001"]
    assert s["seeds"] == 2 and s["episodes"] == [0.0, 1.0, 2.0]
    assert s["greedy"] == pytest.approx([0.25, 0.875, 0.75])  # seeds averaged
    # sd / √n over the seed-averaged question vectors [1,0,0,0], [1,1,1,.5], [1,1,1,0]
    assert s["greedy_se"] == pytest.approx([0.5 / 2, 0.25 / 2, 0.5 / 2])
    assert s["best_episode"] == 1.0 and s["final_episode"] == 2.0
    # per question at the final episode: spine [1, 1, 1, 0] vs ttrl [1, 1, 0, 0] -> +0.25
    comp = out["comparisons"]["spine-lr0.0001"]
    assert comp["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(0.25)
    assert comp["vs_base/final"]["diff"] == pytest.approx(0.5)
    assert comp["vs_ttrl-lr0.0001/best"]["diff"] == pytest.approx((0.875 - 0.5))
    assert (tmp_path / "t" / "summary.md").exists() and (tmp_path / "t" / "curves.png").stat().st_size > 1000
    assert s["questions"] == 4
    md = (tmp_path / "t" / "summary.md").read_text()
    assert "- spine-lr0.0001, length: ep1 100, ep2 100" in md and "- ttrl-lr0.0001, majority: ep1 0.50, ep2 0.50" in md
    # half-width h = (ci_high - ci_low) / 2 at n questions -> n (h / 0.03)^2 for ±3 points
    assert long.questions_for_halfwidth({"ci_low": -0.1, "ci_high": 0.2}, 16) == 16 * 25  # h = 0.15
    assert long.questions_for_halfwidth({"ci_low": 0.0, "ci_high": 0.06}, 64) == 64
    assert long.questions_for_halfwidth(None, 16) is None
    assert long.questions_for_halfwidth({"ci_low": 0.0, "ci_high": 0.0}, 16) is None  # identical runs
    c = comp["vs_ttrl-lr0.0001/final"]
    half = 100 * (c["ci_high"] - c["ci_low"]) / 2
    row = next(line for line in (tmp_path / "t" / "summary.md").read_text().splitlines()
               if line.startswith("| spine-lr0.0001 | vs_ttrl-lr0.0001/final"))
    assert f"| {half:.1f} | {long.questions_for_halfwidth(c, 4)} |" in row


def test_long_summary_pools_finished_seeds_and_shows_an_unfinished_one_apart(tmp_path, monkeypatch):
    long, tag = _long_tag(tmp_path, monkeypatch)
    _fake_run(tag, "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0], 4: [1, 1, 1, 0]})
    _fake_run(tag, "ttrl-lr0.0001-s1", {0: [0, 0, 0, 0], 2: [1, 0, 0, 0]}, finished=False)  # seed 1 just started
    _fake_run(tag, "spine-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 1, 1], 4: [1, 1, 1, 1]})
    _fake_run(tag, "spine-lr0.0001-s1", {0: [1, 0, 0, 0], 2: [1, 0, 0, 0]}, finished=False)
    _fake_run(tag, "siren-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 0, 0, 0]}, finished=False)  # no seed done
    out = long.summary("t")
    keys = list(out["keys"])
    assert keys.index("ttrl-lr0.0001") < keys.index("ttrl-lr0.0001 s1 (unfinished)")
    t = out["keys"]["ttrl-lr0.0001"]
    # seed 0 alone: its final episode 2 is kept, not cut to the episodes seed 1 has reached
    assert t["seeds"] == 1 and t["finished"] and t["final_episode"] == 2.0
    assert t["greedy"] == pytest.approx([0.25, 0.5, 0.75])
    u = out["keys"]["ttrl-lr0.0001 s1 (unfinished)"]
    assert u["seeds"] == 1 and not u["finished"] and u["final_episode"] == 1.0
    assert u["greedy"] == pytest.approx([0.0, 0.25])
    assert out["keys"]["siren-lr0.0001"]["seeds"] == 1 and not out["keys"]["siren-lr0.0001"]["finished"]
    # the reference is the finished TTRL: spine s0 [1,1,1,1] vs ttrl s0 [1,1,1,0] at episode 2
    assert out["comparisons"]["spine-lr0.0001"]["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(0.25)
    assert "vs_ttrl-lr0.0001/final" in out["comparisons"]["ttrl-lr0.0001 s1 (unfinished)"]
    # an unfinished seed against the finished reference at its own last episode (1): [1,0,0,0] vs [1,1,0,0]
    assert out["comparisons"]["spine-lr0.0001 s1 (unfinished)"]["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(-0.25)
    md = (tag / "summary.md").read_text()
    assert "| ttrl-lr0.0001 | 1 | yes | – | 0.250 | 0.750 (2) |" in md
    assert "| ttrl-lr0.0001 s1 (unfinished) | 1 | no | – | 0.000 | 0.250 (1) |" in md


def test_long_summary_pools_blocks_of_disjoint_questions(tmp_path, monkeypatch):
    import json

    long = _long()
    monkeypatch.setattr(long, "ROOT", tmp_path)
    for b in ("b0", "b1"):
        (tmp_path / b).mkdir()
    a, b = ("a0", "a1", "a2", "a3"), ("b0", "b1", "b2", "b3")
    # the training majority right on 1, 1 | 2, 2 of each step's 2 questions in b0, 0, 1 | 2, 1 in b1
    _fake_run(tmp_path / "b0", "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0], 4: [1, 1, 1, 0]}, ids=a,
              label_accuracy=[0.5, 0.5, 1.0, 1.0])
    _fake_run(tmp_path / "b0", "spine-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 1, 1], 4: [1, 1, 1, 1]}, ids=a)
    _fake_run(tmp_path / "b1", "ttrl-lr0.0001-s0", {0: [0, 0, 0, 0], 2: [1, 0, 0, 0], 4: [1, 1, 0, 0]}, ids=b,
              label_accuracy=[0.0, 0.5, 1.0, 0.5])
    _fake_run(tmp_path / "b1", "spine-lr0.0001-s0", {0: [0, 0, 0, 0], 2: [0, 0, 0, 0], 4: [1, 0, 0, 0]}, ids=b,
              finished=False)
    _fake_run(tmp_path / "b1", "siren-lr0.0001-s0", {0: [0, 0, 0, 0]}, ids=b)  # not in b0: left out
    out = long.summary("pooled", pool=["b0", "b1"])
    assert out["blocks"] == ["b0", "b1"] and set(out["keys"]) == {"ttrl-lr0.0001", "spine-lr0.0001"}
    t, s = out["keys"]["ttrl-lr0.0001"], out["keys"]["spine-lr0.0001"]
    assert t["questions"] == 8 and t["finished"] and not s["finished"]  # one block's spine is unfinished
    assert t["greedy"] == pytest.approx([1 / 8, 3 / 8, 5 / 8])  # the 8 questions' means
    assert s["greedy"] == pytest.approx([1 / 8, 4 / 8, 5 / 8])
    # paired over all 8 questions: spine [1,1,1,1,1,0,0,0] - ttrl [1,1,1,0,1,1,0,0] = 0 at the final episode
    assert out["comparisons"]["spine-lr0.0001"]["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(0.0)
    assert out["comparisons"]["spine-lr0.0001"]["vs_base/final"]["diff"] == pytest.approx(4 / 8)
    assert t["series"]["completion/length_mean"] == pytest.approx([100.0, 100.0])
    # the training majority right: 3 of the 8 questions in episode 1, 7 of 8 in episode 2
    assert t["series"]["vote/label_accuracy"] == pytest.approx([3 / 8, 7 / 8])
    md = (tmp_path / "pooled" / "summary.md").read_text()
    assert "Pooled from the blocks b0, b1" in md and "- ttrl-lr0.0001, majority right: ep1 0.38, ep2 0.88" in md
    assert "spine-lr0.0001, majority right" not in md  # not logged: no line
    assert json.loads((tmp_path / "pooled" / "summary.json").read_text())["blocks"] == ["b0", "b1"]
    with pytest.raises(SystemExit, match="share the question a0"):
        (tmp_path / "b2").mkdir()
        _fake_run(tmp_path / "b2", "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0]}, ids=a)
        long.summary("pooled", pool=["b0", "b2"])
    with pytest.raises(SystemExit, match="two or more different"):
        long.summary("pooled", pool=["b0", "b0"])
    with pytest.raises(SystemExit, match="no runs under"):
        long.summary("pooled", pool=["b0", "nothing"])
    # the command line: --pool writes the pooled summary under --tag (nothing to sync from an empty runs root)
    assert long.main(["--tag", "cli", "--pool", "b0", "b1", "--runs-root", str(tmp_path / "runs")]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["keys"]["ttrl-lr0.0001"]["questions"] == 8


def test_long_summary_compares_with_each_named_reference_where_it_has_the_episode(tmp_path, monkeypatch):
    long, tag = _long_tag(tmp_path, monkeypatch)
    _fake_run(tag, "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0], 4: [1, 1, 1, 0]})
    _fake_run(tag, "ttrl+same-machine-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 1, 1]}, finished=False)
    _fake_run(tag, "siren-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 0, 0, 0], 4: [0, 0, 0, 0]})
    comp = long.summary("t")["comparisons"]["siren-lr0.0001"]
    assert set(comp) == {"vs_base/final", "vs_base/best", "vs_ttrl-lr0.0001/final", "vs_ttrl-lr0.0001/best"}
    out = long.summary("t", ["ttrl-lr0.0001", "ttrl+same-machine-lr0.0001"])
    comp = out["comparisons"]["siren-lr0.0001"]
    assert comp["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(-0.75)  # [0,0,0,0] vs [1,1,1,0] at ep 2
    assert comp["vs_ttrl+same-machine-lr0.0001/final"] is None  # the reference has not reached episode 2
    # ... so also where both are: episode 1, [1,0,0,0] vs [1,1,1,1]
    assert comp["vs_ttrl+same-machine-lr0.0001/ep1"]["diff"] == pytest.approx(-0.75)
    assert "vs_ttrl-lr0.0001/ep1" not in comp and "vs_ttrl-lr0.0001/ep2" not in comp  # that one has the final
    assert comp["vs_ttrl+same-machine-lr0.0001/best"]["diff"] == pytest.approx(-0.75)  # best = ep 1: [1,0,0,0] vs [1,1,1,1]
    assert "vs_ttrl+same-machine-lr0.0001/final" not in out["comparisons"]["ttrl+same-machine-lr0.0001"]
    assert out["comparisons"]["ttrl+same-machine-lr0.0001"]["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(0.5)
    assert "| siren-lr0.0001 | vs_ttrl+same-machine-lr0.0001/best | -75.0 [" in (tag / "summary.md").read_text()
    with pytest.raises(SystemExit, match="no such run key"):
        long.summary("t", ["ttrl-lr0.001"])


def test_long_summary_compares_with_one_seed_of_a_pooled_key_when_a_reference_names_the_run(tmp_path, monkeypatch):
    long, tag = _long_tag(tmp_path, monkeypatch)
    _fake_run(tag, "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0]})
    _fake_run(tag, "ttrl-lr0.0001-s1", {0: [1, 0, 0, 0], 2: [1, 1, 1, 1]})
    _fake_run(tag, "spine-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 0, 0, 0]})
    out = long.summary("t", ["ttrl-lr0.0001", "ttrl-lr0.0001-s0"])
    comp = out["comparisons"]["spine-lr0.0001"]
    assert comp["vs_ttrl-lr0.0001/final"]["diff"] == pytest.approx(-0.5)  # seeds pooled: [1, 1, .5, .5]
    assert comp["vs_ttrl-lr0.0001-s0/final"]["diff"] == pytest.approx(-0.25)  # seed 0 alone: [1, 1, 0, 0]
    assert out["keys"]["ttrl-lr0.0001-s0"]["greedy"] == pytest.approx([0.25, 0.5])
    assert out["keys"]["ttrl-lr0.0001"]["greedy"] == pytest.approx([0.25, 0.75])
    assert "| spine-lr0.0001 | vs_ttrl-lr0.0001-s0/final | -25.0 [" in (tag / "summary.md").read_text()
    with pytest.raises(SystemExit, match="no such run key"):
        long.summary("t", ["ttrl-lr0.0001-s2"])


def test_real_sets_are_read_from_the_shared_layout(tmp_path, monkeypatch):
    import json
    import sys

    sys.path.insert(0, str(BENCH))
    sets = _load("sets")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "svamp").mkdir()
    (tmp_path / "ttrl").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "Q?", "answer": "so 1,200\n#### 1,200"}) + "\n")
    (tmp_path / "svamp" / "SVAMP.json").write_text(json.dumps([{"ID": "c1", "Body": "Ann has 3 pens.",
                                                              "Question": "How many?", "Answer": 3.0}]))
    (tmp_path / "ttrl" / "math.json").write_text(json.dumps([
        {"prompt": "p1", "answer": "1", "id": "test/prealgebra/1.json"},
        {"prompt": "p2", "answer": "2", "id": "test/algebra/2.json"}]))
    monkeypatch.setattr(sets, "DATA", tmp_path)
    monkeypatch.setattr(sets, "CACHE", tmp_path / "cache")
    assert sets.load_set("gsm8k")[0]["answer"] == "1200"
    assert sets.load_set("svamp")[0] == {"prompt": "Ann has 3 pens. How many?", "answer": "3", "id": "svamp-c1",
                                         "source": "svamp"}
    assert [r["id"] for r in sets.load_set("math-prealgebra")] == ["test/prealgebra/1.json"]
    rows = [json.loads(line) for line in sets.materialise("mixed", 3, 0).read_text().splitlines()]
    assert sorted(r["source"] for r in rows) == ["gsm8k", "math-prealgebra", "svamp"]
    with pytest.raises(ValueError, match="has 1"):
        sets.materialise("svamp", 2, 0)


def test_blocks_of_a_real_set_are_disjoint_and_together_the_seeded_shuffle(tmp_path, monkeypatch):
    import json
    import sys

    sys.path.insert(0, str(BENCH))
    sets = _load("sets")
    (tmp_path / "svamp").mkdir()
    (tmp_path / "svamp" / "SVAMP.json").write_text(json.dumps(
        [{"ID": f"c{i}", "Body": f"Ann has {i} pens.", "Question": "How many?", "Answer": float(i)} for i in range(10)]))
    monkeypatch.setattr(sets, "DATA", tmp_path)
    monkeypatch.setattr(sets, "CACHE", tmp_path / "cache")

    def ids(path):
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]
    whole = ids(sets.materialise("svamp", 9, 3))
    blocks = [sets.materialise("svamp", 3, 3, offset) for offset in (0, 3, 6)]
    assert len({b.name for b in blocks}) == 3  # one file per block
    assert [i for b in blocks for i in ids(b)] == whole
    with pytest.raises(ValueError, match="questions 8..10, the set has 10"):
        sets.materialise("svamp", 3, 3, 8)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        sets.materialise("svamp", 3, 3, -1)
    assert sets.main(["svamp", "3", "3", "--offset", "3"]) == 0
    with pytest.raises(SystemExit) as bad:  # from the shell: a one-line usage error, no file
        sets.main(["svamp", "3", "3", "--offset", "9"])
    assert bad.value.code == 2 and not (tmp_path / "cache" / "svamp-n3-s3-o9.jsonl").exists()


def test_claims_are_balanced_yes_no_questions_whose_no_claims_are_wrong(tmp_path, monkeypatch):
    import json
    import re
    import sys

    from spine_ttrl.data import generate_arith, load_examples, resolve_task

    sys.path.insert(0, str(BENCH))
    sets = _load("sets")
    monkeypatch.setattr(sets, "CACHE", tmp_path)
    rows = sets.load_set("claims")
    truth = {f"claims-{ex.id}": int(ex.answer) for ex in generate_arith(5, 1000, 99)}
    assert len(rows) == 1000 and 400 < sum(r["answer"] == "yes" for r in rows) < 600
    for r in rows:
        claim = int(re.search(r"A student answered (\d+)\. Is the student's answer correct\?$", r["prompt"]).group(1))
        assert (claim == truth[r["id"]]) == (r["answer"] == "yes") and r["labels"] == ["yes", "no"]
    path = sets.materialise("claims", 16, 7)
    examples = load_examples(str(path))
    assert len(examples) == 16 and resolve_task(examples) == "label"
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [ex.id for ex in examples]


def test_every_preset_is_a_quality_method_and_neighbours_are_compared(tmp_path):
    import json

    from spine_ttrl.config import PRESETS

    assert set(quality.METHODS) == set(PRESETS)  # a new preset gets its benchmark row
    (tmp_path / "base.json").write_text(json.dumps(_run_record("none", 0, [0, 0, 1, 0], [0, 1, 2, 0], [])))
    runs = {"ttrl-lr0.0001-s0.json": _run_record("ttrl", 0, [0, 1, 1, 0], [1, 1, 2, 0], []),
            "ttrv-lr0.0001-s0.json": _run_record("ttrv", 0, [1, 1, 1, 1], [2, 1, 2, 0], [])}
    for name, rec in runs.items():
        (tmp_path / name).write_text(json.dumps(rec))
    c = quality.summarize(tmp_path, k=2)["paired_bootstrap"]
    # greedy: ttrv [1, 1, 1, 1], ttrl [0, 1, 1, 0], base [0, 0, 1, 0]
    assert c["ttrv-lr0.0001 - ttrl-lr0.0001"]["greedy"]["diff"] == pytest.approx(0.5)
    assert c["ttrv-lr0.0001 - base"]["greedy"]["diff"] == pytest.approx(0.75)
    assert "ttrl-lr0.0001 - ttrv-lr0.0001" not in c


def test_long_summary_breaks_greedy_down_by_source(tmp_path, monkeypatch):
    long, _ = _long_tag(tmp_path, monkeypatch)
    src = ("gsm8k", "svamp", "gsm8k", "svamp")
    _fake_run(tmp_path / "t", "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 1, 0], 4: [1, 1, 0, 1]}, sources=src)
    _fake_run(tmp_path / "t", "ttrl-lr0.0001-s1", {0: [1, 0, 0, 0], 2: [1, 1, 1, 1], 4: [1, 0, 0, 1]}, sources=src)
    out = long.summary("t")
    by = out["keys"]["ttrl-lr0.0001"]["by_source"]
    # gsm8k = q0, q2; svamp = q1, q3; seeds averaged
    assert by["gsm8k"] == pytest.approx([0.5, 1.0, 0.5])
    assert by["svamp"] == pytest.approx([0.0, 0.75, 0.75])
    md = (tmp_path / "t" / "summary.md").read_text()
    assert "| ttrl-lr0.0001 | svamp | 0.000 | 0.750 | 0.750 |" in md
    _fake_run(tmp_path / "t", "spine-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 1, 0]})  # no source column
    assert long.summary("t")["keys"]["spine-lr0.0001"]["by_source"] == {}


def test_long_summary_counts_which_greedy_answers_moved(tmp_path, monkeypatch):
    long, _ = _long_tag(tmp_path, monkeypatch)

    def rec(g, m, n):
        return {"greedy_answer": g, "majority": m, "greedy_length": n}
    # labels: q0 1, q1 2, q2 3, q3 4. Before: greedy 1 (right), 5, 6, 4 (right); sampled majority 1, 2, 7, None
    before = [rec("1", "1", 100), rec("5", "2", 200), rec("6", "7", 300), rec("4", None, 400)]
    # final: q0 still right; q1 moved onto the majority (right); q2 onto the majority (still wrong); q3 broke
    final = [rec("1", "1", 50), rec("2", "2", 100), rec("7", "7", 150), rec("9", "9", 100)]
    _fake_run(tmp_path / "t", "ttrl-lr0.0001-s0", {0: [1, 0, 0, 1], 4: [1, 1, 0, 0]}, answers={0: before, 4: final})
    f = long.summary("t")["keys"]["ttrl-lr0.0001"]["flips_final"]
    assert f["pairs"] == 4 and f["wrong_to_right"] == 1 and f["right_to_wrong"] == 1 and f["changed"] == 3
    assert f["off_majority"] == 2 and f["onto_majority"] == 2  # q3 had no majority: not counted
    assert f["greedy_length_before"] == 250 and f["greedy_length_after"] == 100
    md = (tmp_path / "t" / "summary.md").read_text()
    assert "| ttrl-lr0.0001 | 4 | 1 | 1 | 3 | 2 of 2 | 250 → 100 |" in md
    # a second seed adds its pairs
    _fake_run(tmp_path / "t", "ttrl-lr0.0001-s1", {0: [1, 0, 0, 1], 4: [1, 0, 0, 1]}, answers={0: before, 4: before})
    f = long.summary("t")["keys"]["ttrl-lr0.0001"]["flips_final"]
    assert f["pairs"] == 8 and f["changed"] == 3 and f["onto_majority"] == 2 and f["off_majority"] == 4


def test_long_summary_has_no_final_episode_before_a_trained_evaluation(tmp_path, monkeypatch):
    long, _ = _long_tag(tmp_path, monkeypatch)
    _fake_run(tmp_path / "t", "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0]})
    _fake_run(tmp_path / "t", "spine-lr0.0001-s0", {0: [1, 0, 0, 0]})  # only the evaluation before adaptation
    out = long.summary("t")
    s = out["keys"]["spine-lr0.0001"]
    assert s["final_episode"] is None and s["best_episode"] is None and s["flips_final"] is None
    assert all(c is None for c in out["comparisons"]["spine-lr0.0001"].values())


def test_long_stop_rule_uses_the_top20_entropy_when_logged(tmp_path, monkeypatch):
    import json

    long, _ = _long_tag(tmp_path, monkeypatch)
    _fake_run(tmp_path / "t", "ttrl-lr0.0001-s0", {0: [1, 0, 0, 0], 2: [1, 1, 0, 0], 4: [1, 1, 0, 0]})
    # TTRL trains every token: its "forking" entropy is the all-token mean, steady at 0.2; the top-20 %
    # tokens' entropy halves in episode 2 (1.0 -> 0.4) while the majority share saturates
    rows = [{"step": s, "vote/majority_ratio": r, "entropy/forking_mean": 0.2, "entropy/top20_mean": h,
             "completion/length_mean": 100.0} for s, r, h in ((1, 0.5, 1.0), (2, 0.7, 1.0), (3, 0.95, 0.4), (4, 0.95, 0.4))]
    (tmp_path / "t" / "ttrl-lr0.0001-s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = long.summary("t")["keys"]["ttrl-lr0.0001"]
    assert s["fork_entropy"] == pytest.approx([1.0, 0.4]) and s["stop_episode"] == 2
    assert "| 0.20 → 0.20 | 1.00 → 0.40 |" in (tmp_path / "t" / "summary.md").read_text()


@pytest.mark.parametrize("out", ["", "../elsewhere", "a/b"])
def test_tokens_moved_rejects_an_out_name_with_a_directory(out, tmp_path, capsys):
    tm = _load("tokens_moved")
    with pytest.raises(SystemExit) as e:
        tm.main(["--tag", "t", "--runs", "r", "--runs-root", str(tmp_path), "--out", out])
    assert e.value.code == 2 and "--out must be a plain file name" in capsys.readouterr().err


def test_tokens_moved_categories_and_fork_statistics():
    import torch

    tm = _load("tokens_moved")
    assert [tm.token_category(p) for p in ("12", " 7", " +", "\\(", " ", "\n", " the", "Ana", ".", "**")] == \
        ["digit", "digit", "math", "math", "space", "space", "word", "word", "other", "math"]
    base = torch.tensor([[1.0, 0.1, 0.8, 0.1, 0.0], [0.3, 0.9, 0.2, 0.1, 0.1]])
    now = torch.tensor([[0.4, 0.1, 0.8, 0.1, 0.0], [0.3, 0.6, 0.2, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    forks = tm.fork_mask(base, mask)  # 9 valid tokens -> ceil(1.8) = 2 forks: (0, 0) and (1, 1)
    assert forks.nonzero().tolist() == [[0, 0], [1, 1]]
    pieces = [["3", " +", " 4", " =", ""], [" So", " the", " answer", " is", " 7"]]
    logp = torch.full((2, 5), -0.5)
    r = tm.moved(base, now, logp, mask, forks, pieces)
    assert r["entropy_forks"] == pytest.approx(0.5)  # (0.4 + 0.6) / 2
    assert r["forks_below_half"] == pytest.approx(0.5)  # 0.4 < 0.5 · 1.0; 0.6 ≥ 0.5 · 0.9
    assert r["entropy_all"] == pytest.approx((0.4 + 0.1 + 0.8 + 0.1 + 0.3 + 0.6 + 0.2 + 0.1 + 0.1) / 9)
    assert r["logp_mean"] == pytest.approx(-0.5)
    assert r["categories"]["digit"] == pytest.approx({"fork_share": 0.5, "base": 1.0, "now": 0.4})
    assert r["categories"]["word"] == pytest.approx({"fork_share": 0.5, "base": 0.9, "now": 0.6})
    assert r["categories"]["math"]["fork_share"] == 0
    assert [d[0] for d in r["top_drops"]] == ["3", " the"]  # total drop 0.6, then 0.3
    # all 9 valid tokens: digits "3", " 4", " 7" (0.4, 0.8, 0.1); math " +", " =" (0.1, 0.1); words (0.3, 0.6, 0.2)
    assert r["all_categories"]["digit"] == pytest.approx({"share": 3 / 9, "entropy": 1.3 / 3, "logp": -0.5})
    assert r["all_categories"]["math"] == pytest.approx({"share": 2 / 9, "entropy": 0.1, "logp": -0.5})
    assert r["all_categories"]["word"]["share"] == pytest.approx(4 / 9)  # " So", " the", " answer", " is"
    md = tm._render({"tag": "t", "completions": 2, "tokens": 9, "forks": 2, "temperature": 0.8,
                     "models": {"base": {"step": 0, **r}}})
    assert "| base | 0.33: 0.433 / -0.500 |" in md
    # the model's own forks on the text: 0.8 at " 4" (digit) and 0.6 at " the" (word)
    b = tm.band_sides(now, mask, 0.65, 0.75, pieces)
    assert (b["below"], b["above"]) == (0.5, 0.5)  # 0.6 < 0.65; 0.8 > 0.75
    assert b["below_mix"]["word"] == 1.0 and b["above_mix"]["digit"] == 1.0
    assert b["fork_mix"] == pytest.approx({"digit": 0.5, "math": 0.0, "space": 0.0, "word": 0.5, "other": 0.0})
    empty = tm.band_sides(now, mask, 0.0, 1.0, pieces)  # every fork inside the band
    assert (empty["below"], empty["above"]) == (0.0, 0.0) and set(empty["below_mix"].values()) == {0.0}
    md = tm._render({"tag": "t", "completions": 2, "tokens": 9, "forks": 2, "temperature": 0.8, "band": (0.65, 0.75),
                     "models": {"base": {"step": 0, **r, "band": b}}})
    assert "| base | 0.50 | 0.50 | 0.00 / 0.00 / 0.00 / 1.00 / 0.00 | 1.00 / 0.00 / 0.00 / 0.00 / 0.00 |" in md


def test_tokens_moved_weight_displacement_and_path_length(tmp_path):
    import json

    import peft
    import torch

    from tests.tiny_text import tiny_model

    tm = _load("tokens_moved")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert tm.weight_displacement(model, initial) == 0.0  # B starts at 0
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})]
    assert layers
    with torch.no_grad():  # one adapted matrix: A = [[1, 0, …], [0, 1, 0, …]], B[0, 0] = 3 -> ΔW = 2 · 3 at (0, 0)
        a, b = layers[0].lora_A["default"].weight, layers[0].lora_B["default"].weight
        a.zero_(); a[0, 0] = 1.0; a[1, 1] = 1.0
        b[0, 0] = 3.0; b[1, 1] = 4.0  # and ΔW[1, 1] = 2 · 4
    assert tm.weight_displacement(model, initial) == pytest.approx(10.0)  # 2 · sqrt(3² + 4²)
    full = tiny_model()  # no adapters: the trained parameters against their initial values
    init = {n: p.detach().clone() for n, p in full.named_parameters()}
    with torch.no_grad():
        next(full.parameters()).view(-1)[0] += 0.6
        list(full.parameters())[-1].view(-1)[0] -= 0.8
    assert tm.weight_displacement(full, init) == pytest.approx(1.0, abs=1e-5)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in (
        {"step": 1, "update/weight_change_norm": 0.5}, {"step": 2}, {"step": 3, "update/weight_change_norm": 0.25},
        {"step": 4, "update/weight_change_norm": 9.0})) + "\n" + '{"step": 5, "update/wei')  # a running run's last line
    assert tm.path_length(tmp_path, 3) == pytest.approx(1.125)  # 3 steps × mean(0.5, 0.25); step 4 is later
    assert tm.path_length(tmp_path / "missing", 3) is None


def test_tokens_moved_reads_the_anchored_band_of_the_first_run_that_has_one(tmp_path):
    import json

    tm = _load("tokens_moved")
    plain, anchored = tmp_path / "ttrl", tmp_path / "spine"
    for d, line in ((plain, {"step": 1, "band/low_mean": 0.1}),
                    (anchored, {"step": 1, "band/anchor_low": 0.29, "band/anchor_high": 0.65})):
        d.mkdir()
        (d / "metrics.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(dict(line, step=2)) + "\n")
    assert tm.anchored_band([plain, anchored]) == (0.29, 0.65)
    assert tm.anchored_band([plain, tmp_path / "missing"]) is None


def test_long_runs_reuse_a_matching_base_evaluation(tmp_path):
    import json

    from spine_ttrl.config import make_config, to_toml

    long = _long()

    def cfg(preset, seed):
        return make_config(preset, overrides={"data": {"data": "arith:5:16:4242"}, "run": {"seed": seed}})
    runs, synced = tmp_path / "runs", tmp_path / "results"
    old = synced / "ttrl-lr0.0001-s0"  # only its synced logs are left (a machine without the run's directory)
    old.mkdir(parents=True)
    (old / "config.toml").write_text(to_toml(cfg("ttrl", 0)))
    new = runs / "spine-lr0.0001-s0"
    assert long.base_evaluation(cfg("spine", 0), [runs, synced], new) is None  # no evaluation made yet
    from spine_ttrl.engine.precision import autocast_dtype_for, compute_name

    here = compute_name("cpu", autocast_dtype_for("auto", "cpu"))
    (old / "eval_records.jsonl").write_text(json.dumps({"tag": "before", "step": 0, "records": []}) + "\n")
    for there in ("cuda fp32", "cpu bf16" if here == "cpu fp32" else "cpu fp32"):  # made on another machine
        line = {"tag": "before", "step": 0, "compute": there, "eval/greedy_pass@1": 0.5}
        (old / "eval.jsonl").write_text(json.dumps(line) + "\n")
        assert long.base_evaluation(cfg("spine", 0), [runs, synced], new) is None
    (old / "eval.jsonl").write_text(json.dumps(dict(line, compute=here)) + "\n")
    assert long.base_evaluation(cfg("spine", 0), [runs, synced], new) == old  # another preset, same evaluation
    assert long.base_evaluation(cfg("spine", 0), [runs], new) is None  # only where it is told to look
    assert long.base_evaluation(cfg("spine", 1), [runs, synced], new) is None  # another seed samples otherwise
    assert long.base_evaluation(cfg("ttrl", 0), [runs, synced], old) is None  # never itself


def test_long_resume_keeps_where_the_base_evaluation_came_from(tmp_path):
    import json
    import shutil

    from spine_ttrl.config import load_toml, make_config, to_toml
    from spine_ttrl.engine.precision import autocast_dtype_for, compute_name

    long = _long()

    def cfg():
        return make_config("spine", overrides={"data": {"data": "arith:5:16:4242"}})
    src, run = tmp_path / "ttrl-lr0.0001-s0", tmp_path / "spine-lr0.0001-s0"
    src.mkdir()
    (src / "config.toml").write_text(to_toml(make_config("ttrl", overrides={"data": {"data": "arith:5:16:4242"}})))
    (src / "eval_records.jsonl").write_text(json.dumps({"tag": "before", "step": 0, "records": []}) + "\n")
    (src / "eval.jsonl").write_text(json.dumps({"tag": "before", "step": 0, "eval/greedy_pass@1": 0.5,
                                                "compute": compute_name("cpu", autocast_dtype_for("auto", "cpu"))}) + "\n")
    first = long.resume_or_reuse(cfg(), run, [tmp_path])  # a new run reuses the matching evaluation
    assert first.eval.before_from == str(src) and not first.run.resume
    assert long.resume_or_reuse(cfg(), run, []).eval.before_from == ""  # --no-reuse-before
    run.mkdir()
    (run / "config.toml").write_text(to_toml(first))  # what the started run saved
    again = long.resume_or_reuse(cfg(), run, [tmp_path])
    assert again.run.resume == str(run) and again.eval.before_from == str(src)  # carried into the rewritten config
    assert load_toml(run / "config.toml")["eval"]["before_from"] == str(src)
    shutil.rmtree(src)  # on a machine without that directory the resume does not point at it
    assert long.resume_or_reuse(cfg(), run, [tmp_path]).eval.before_from == ""
    (run / "config.toml").write_text(to_toml(cfg()))  # a run that made its own evaluation
    assert long.resume_or_reuse(cfg(), run, [tmp_path]).eval.before_from == ""


def test_long_sync_never_replaces_longer_logs(tmp_path):
    long = _long()
    run, dest = tmp_path / "run", tmp_path / "results" / "run"
    run.mkdir()

    def log(d, steps):
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(1, steps + 1)))
        (d / "config.toml").write_text(f"# {steps}\n")
    log(run, 2)
    assert long.sync(run, dest) and (dest / "config.toml").read_text() == "# 2\n"  # first copy
    log(dest, 14)  # the copy of a run whose checkpoints were lost, started again with 3 steps
    log(run, 3)
    assert not long.sync(run, dest)
    assert (dest / "config.toml").read_text() == "# 14\n" and long._steps_logged(dest) == 14
    log(run, 14)  # caught up
    assert long.sync(run, dest) and (dest / "config.toml").read_text() == "# 14\n" == (run / "config.toml").read_text()
    log(run, 15)
    assert long.sync(run, dest) and long._steps_logged(dest) == 15


def test_long_majority_trace_and_changes_by_hand():
    long = _long()
    samples = [{"step": 1, "questions": [{"id": "a", "answers": ["4", "4.0", "5", None]},
                                         {"id": "b", "answers": [None, None, None, None]}]},
               {"step": 2, "questions": [{"id": "c", "answers": ["1/2", "0.5", "2", "2"]}]}]
    trace = long.majority_trace(samples, {"a": "4", "b": "1", "c": "2"}, "math")
    assert trace == [  # "4" and "4.0" one cluster; ties go to the cluster seen first
        {"step": 1, "id": "a", "majority": "4", "votes": 2, "of": 4, "label": "4", "right": True},
        {"step": 1, "id": "b", "majority": None, "votes": 0, "of": 4, "label": "1", "right": None},
        {"step": 2, "id": "c", "majority": "1/2", "votes": 2, "of": 4, "label": "2", "right": False}]
    # 2 steps per episode, 3 episodes; each question trained once per episode
    def row(step, q, m, right):
        return {"step": step, "id": q, "majority": m, "votes": 8, "of": 8, "label": "L" + q, "right": right}
    trace = [row(1, "lost", "1", True), row(3, "lost", "1", True), row(6, "lost", "2", False),
             row(2, "gained", "3", False), row(4, "gained", "4", True), row(5, "gained", "4", True),
             row(1, "wrong", "5", False), row(3, "wrong", "6", False), row(5, "wrong", "6", False),
             row(2, "mixed", "7", True), row(4, "mixed", "8", False), row(6, "mixed", "7", True),
             row(1, "kept", "9", True), row(3, "kept", "9", True), row(5, "kept", "9", True)]
    ch = long.majority_changes(trace, 2)
    assert {q: c["kind"] for q, c in ch.items()} == {"lost": "lost", "gained": "gained", "wrong": "wrong", "mixed": "mixed"}
    assert ch["lost"] == {"label": "Llost", "episodes": [("1", 8, True), ("1", 8, True), ("2", 8, False)], "kind": "lost"}
    # switched, by hand: episode 2 against 1 — gained 3→4, wrong 5→6, mixed 7→8 of 6 questions trained in
    # both ("twice" counts its last step's "b" in episode 1, unchanged); episode 3 against 2 — lost 1→2 and
    # mixed 8→7 of 5 ("twice" is not trained in episode 3, "new" not in episode 2)
    extra = [row(2, "twice", "b", True), row(1, "twice", "a", True), row(3, "twice", "b", True), row(6, "new", "0", True)]
    sw = long.majority_switches(trace + extra, 2)
    assert math.isnan(sw[0]) and sw[1:] == [pytest.approx(3 / 6), pytest.approx(2 / 5)]
    assert long.majority_switches([], 2) == []
    # episode 4 has only its first step (7): left out until its last step is in
    assert len(long.majority_switches(trace + extra + [row(7, "kept", "1", True)], 2)) == 3


def test_long_sync_writes_the_training_majorities_and_the_summary_lists_them(tmp_path, monkeypatch):
    import json

    from spine_ttrl.config import make_config, to_toml
    from spine_ttrl.data import load_examples

    long = _long()
    run, dest = tmp_path / "run" / "ttrl-lr0.0001-s0", tmp_path / "t" / "ttrl-lr0.0001-s0"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(make_config("ttrl", overrides={"data": {"data": "arith:1:2:4"}})))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")  # step 2 is being trained
    ex = load_examples("arith:1:2:4")
    wrong = str(int(ex[0].answer) + 1)
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "questions": [
        {"id": ex[0].id, "answers": [wrong, wrong, ex[0].answer, None], "texts": ["…"] * 4},
        {"id": ex[1].id, "answers": [ex[1].answer] * 4, "texts": ["…"] * 4}]}) + "\n" + json.dumps(
        {"step": 2, "questions": [{"id": ex[0].id, "answers": [wrong] * 4, "texts": ["…"] * 4}]}) + "\n")
    assert long.sync(run, dest)
    rows = [json.loads(x) for x in (dest / "majorities.jsonl").read_text().splitlines()]
    assert [(r["id"], r["majority"], r["votes"], r["right"]) for r in rows] == [
        (ex[0].id, wrong, 2, False), (ex[1].id, ex[1].answer, 4, True)]
    assert not (dest / "samples.jsonl").exists()  # the texts stay with the run
    monkeypatch.setattr(long, "ROOT", tmp_path)
    _fake_run(tmp_path / "t", "spine-lr0.0001-s0", {0: [1, 0, 0, 1], 4: [1, 1, 0, 0]})
    (tmp_path / "t" / "spine-lr0.0001-s0" / "majorities.jsonl").write_text("".join(json.dumps(
        {"step": s, "id": "q0", "majority": m, "votes": v, "of": 8, "label": "40", "right": m == "40"}) + "\n"
        for s, m, v in ((1, "40", 8), (4, "30", 5))))
    md = long.render(long.summary("t"))
    assert "- spine-lr0.0001-s0: 1 lost, 0 gained, 0 wrong, 0 mixed" in md
    assert "  - q0 (label 40, lost): 40 (8), 30✗ (5)" in md
    assert "- spine-lr0.0001, majority switched: ep1 –, ep2 1.00" in md  # 40 in episode 1, 30 in episode 2


def test_long_summary_names_the_machines_a_key_trained_on_not_the_reused_base_evaluations(tmp_path, monkeypatch):
    import json

    long, tag = _long_tag(tmp_path, monkeypatch)
    for name, machine in (("ttrl-lr0.0001-s0", "CPU A (amx)"), ("ttrl-lr0.0001-s1", "CPU B (avx512_bf16)"),
                          ("spine-lr0.0001-s0", None)):
        _fake_run(tag, name, {0: [1, 0, 0, 0], 2: [1, 1, 0, 0]})
        f = tag / name / "eval.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        for r in rows:  # the base evaluation reused from a run on a third machine
            r["machine"] = "CPU C (amx)" if r["tag"] == "before" else machine
        f.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    out = long.summary("t")
    assert out["keys"]["ttrl-lr0.0001"]["machines"] == ["CPU A (amx)", "CPU B (avx512_bf16)"]
    assert out["keys"]["spine-lr0.0001"]["machines"] == []  # logs from before machines were recorded
    md = long.render(out)
    assert "| machine |" in md.splitlines()[2]
    row = next(x for x in md.splitlines() if x.startswith("| ttrl-lr0.0001 |"))
    assert row.split(" | ")[3] == "CPU A (amx); CPU B (avx512_bf16)"
    assert next(x for x in md.splitlines() if x.startswith("| spine-lr0.0001 |")).split(" | ")[3] == "–"


def test_a_run_is_resumed_only_with_its_own_method_settings(tmp_path):
    from spine_ttrl.config import load_toml, make_config, to_toml

    def saved(preset, **spine):
        path = tmp_path / "config.toml"
        path.write_text(to_toml(make_config(preset, overrides={"spine": spine, "optim": {"lr": 1e-4}})))
        return load_toml(path)

    def now(preset, lr=1e-4, **spine):
        return make_config(preset, overrides={"spine": spine, "optim": {"lr": lr}})

    old_spine = saved("spine", beta_low=1.0, beta_up=1.0)
    why = quality.method_settings_changed(old_spine, now("spine"))  # the default band weight changed since
    assert "spine.beta_low 1.0 -> 0.1" in why and "spine.beta_up 1.0 -> 0.1" in why
    assert quality.method_settings_changed(old_spine, now("spine", beta_low=1.0, beta_up=1.0)) is None
    assert "optim.lr" in quality.method_settings_changed(old_spine, now("spine", lr=3e-4, beta_low=1.0, beta_up=1.0))
    assert "spine.band_anchor" in quality.method_settings_changed(
        old_spine, now("spine", beta_low=1.0, beta_up=1.0, band_anchor="first"))
    # no band in either run: its weights do nothing, so they may differ
    assert quality.method_settings_changed(saved("ttrl", beta_low=1.0, beta_up=1.0), now("ttrl")) is None
    assert "spine.band" in quality.method_settings_changed(saved("ttrl"), now("spine"))
    # a field the saved run does not know (added to the project later) is not compared
    older = saved("spine")
    del older["spine"]["band_rows"]
    assert quality.method_settings_changed(older, now("spine", band_rows="contested")) is None


def test_long_refuses_to_resume_a_run_with_other_method_settings(tmp_path):
    from spine_ttrl.config import make_config, to_toml

    long = _long()
    run = tmp_path / "spine-lr0.0001-s0"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(make_config("spine", overrides={"spine": {"beta_low": 1.0, "beta_up": 1.0}})))
    with pytest.raises(SystemExit, match="not resumed: .*spine.beta_low 1.0 -> 0.1"):
        long.resume_or_reuse(make_config("spine"), run, [])
    same = make_config("spine", overrides={"spine": {"beta_low": 1.0, "beta_up": 1.0}})
    assert long.resume_or_reuse(same, run, []).run.resume == str(run)
