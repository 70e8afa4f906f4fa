"""Real steps of TTRL and SPINE on the embedded SmolLM2-135M-Instruct (CPU, tiny budgets)."""

import copy
import json
import math

import pytest
import torch

from spine_ttrl.config import make_config
from spine_ttrl.data import generate_arith
from spine_ttrl.engine.scoring import build_training_batch, score_batch
from spine_ttrl.loop import adapt
from spine_ttrl.update import update_on_batch
from spine_ttrl.losses import group_advantages
from spine_ttrl.models import load_model_and_tokenizer
from spine_ttrl.prompting import encode_examples
from spine_ttrl.sampling import sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    torch.manual_seed(0)
    return load_model_and_tokenizer(None)


def _fixed_group(model, tok, n=4, max_new_tokens=20):
    """One question, n sampled completions (fixed seed), as a training batch."""
    examples, prompts, _ = encode_examples(tok, generate_arith(2, 1, seed=3), "math", max_prompt_tokens=512)
    roll = sample(model, prompts, num_samples=n, max_new_tokens=max_new_tokens, temperature=1.0,
                  eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    comps = [roll.completion_ids[i][roll.completion_mask[i]].tolist() for i in range(n)]
    return build_training_batch([prompts[0]] * n, comps, tok.pad_token_id)


@pytest.mark.parametrize("preset", ["ttrl", "spine", "spine-v2"])
def test_one_update_raises_logprobs_of_rewarded_completions(embedded, preset):
    model = copy.deepcopy(embedded[0])
    tok = embedded[1]
    batch = _fixed_group(model, tok)
    mask = batch[4]
    # Fixed pseudo-rewards: completions 0 and 1 are "in the majority".
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    cfg = make_config(preset, overrides={"optim": {"lr": 5e-5, "micro_batch_size": 2, "max_grad_norm": 0.0}})
    before = score_batch(model, batch, 4, temperature=1.0, chunk_size=256)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=0.0)
    m = update_on_batch(model, opt, batch, adv, cfg.spine, cfg.optim, temperature=1.0, group_size=4).metrics
    after = score_batch(model, batch, 4, temperature=1.0, chunk_size=256)[0]
    delta = ((after - before) * mask).sum(dim=1) / mask.sum(dim=1)  # mean per-token change per completion
    assert delta[:2].mean() > delta[2:].mean(), (preset, delta.tolist())
    assert m["optim/grad_norm"] > 0 and math.isfinite(m["optim/grad_norm"])
    for k, v in m.items():
        assert math.isfinite(v) or k.startswith(("band/", "entropy/")), (k, v)
    if preset != "ttrl":
        assert 0 < m["tokens/selected_fraction"] < 1


@pytest.mark.parametrize("preset", ["ttrl", "spine"])
def test_adapt_real_step_end_to_end(tmp_path, preset):
    cfg = make_config(preset, overrides={
        "data": {"data": "arith:2:3:5"},
        "sampling": {"num_votes": 4, "num_train_samples": 4, "max_new_tokens": 24},
        "optim": {"steps": 1, "questions_per_step": 3, "micro_batch_size": 6, "lr": 1e-5},
        "eval": {"eval_samples": 2, "eval_max_new_tokens": 16},
        "run": {"out": str(tmp_path / "run"), "progress": False, "seed": 1},
    })
    res = adapt(cfg)
    assert len(res.metrics) == 1
    m = res.metrics[0]
    assert m["reward/nonzero_advantage_fraction"] > 0, m
    assert m["optim/grad_norm"] > 0
    for key in ["reward/mean", "vote/majority_ratio", "completion/length_mean", "loss/policy", "optim/grad_norm"]:
        assert math.isfinite(m[key]), key
    if preset == "spine":
        # top 20 % of the batch's tokens, ceil(0.2 n): the fraction is just above 0.2
        assert 0.2 <= m["tokens/selected_fraction"] < 0.25
    else:
        assert m["tokens/selected_fraction"] == 1.0
    out = tmp_path / "run"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
    # vote/sample_accuracy: share of the sampled answers equivalent to the label, recomputed from samples.jsonl
    from spine_ttrl.answers import is_equivalent
    from spine_ttrl.data import load_examples

    labels = {e.id: e.answer for e in load_examples("arith:2:3:5")}
    sampled = json.loads((out / "samples.jsonl").read_text().splitlines()[0])["questions"]
    hits = [a is not None and is_equivalent(a, labels[q["id"]], "math") for q in sampled for a in q["answers"]]
    assert len(hits) == 12 and m["vote/sample_accuracy"] == pytest.approx(sum(hits) / len(hits))
    tags = [json.loads(line)["tag"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert tags == ["before", "after"]
    per_question = [json.loads(line) for line in (out / "eval_records.jsonl").read_text().splitlines()]
    assert [r["tag"] for r in per_question] == tags
    after = per_question[-1]["records"]
    assert sorted(r["id"] for r in after) == sorted(labels)
    greedy = sum(r["greedy_correct"] for r in after) / len(after)
    assert res.eval_after.metrics["greedy_pass@1"] == pytest.approx(greedy)
    for k in ("greedy_pass@1", "greedy_pass@1_se", "avg@2", "maj@2", "pass@2", "majority_ratio"):
        assert k in res.eval_after.metrics
    assert (out / "config.toml").exists() and (out / "final" / "config.json").exists()
    # The saved model is the adapted one: same logits as the in-memory model.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.tensor([[1, 504, 3458, 314, 216, 34, 1232, 216, 35, 47]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, res.model(ids).logits, atol=1e-5, rtol=0)
    # The report names the run and embeds its plots.
    report = (out / "report.md").read_text()
    assert preset in report and "arith:2:3:5" in report
    for png in ("reward.png", "length.png", "entropy.png"):
        assert f"plots/{png}" in report and (out / "plots" / png).stat().st_size > 1000


def test_adapt_lora_with_kl_saves_a_merged_model(tmp_path):
    # LoRA + KL: the reference is the same model with its adapter disabled.
    cfg = make_config("spine-v2", overrides={
        "model": {"lora_r": 4, "lora_alpha": 8.0},
        "data": {"data": "arith:1:2:1"},
        "sampling": {"num_votes": 4, "num_train_samples": 4, "max_new_tokens": 16},
        "spine": {"kl_coef": 0.1},
        "optim": {"steps": 1, "questions_per_step": 2, "micro_batch_size": 4, "lr": 1e-3},
        "eval": {"eval_samples": 0, "eval_max_new_tokens": 8},
        "run": {"out": str(tmp_path / "run"), "progress": False, "seed": 3},
    })
    res = adapt(cfg)
    m = res.metrics[0]
    assert m["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # one update: policy == reference at the first pass
    assert "time/reference_s" in m and math.isfinite(m["optim/grad_norm"])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    ids = torch.tensor([[1, 504, 3458, 314, 216, 34]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, res.model(ids).logits, atol=1e-4, rtol=0)


def test_frequency_reward_greedy_only_intermediate_eval_and_diagnostics(tmp_path):
    # --reward frequency through the loop; intermediate evaluations greedy-only; update-size metrics.
    from spine_ttrl.rewards import frequency_rewards

    cfg = make_config("ttrl", overrides={
        "data": {"data": "arith:1:2:4"},
        "sampling": {"num_votes": 4, "num_train_samples": 4, "max_new_tokens": 16},
        "spine": {"reward": "frequency"},
        "optim": {"steps": 2, "questions_per_step": 2, "micro_batch_size": 8, "lr": 1e-5, "diagnostics": True},
        "eval": {"eval_every": 1, "eval_every_samples": 0, "eval_samples": 2, "eval_max_new_tokens": 8},
        "run": {"out": str(tmp_path / "run"), "progress": False, "seed": 2},
    })
    res = adapt(cfg)
    out = tmp_path / "run"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    learned = []
    for m, s in zip(res.metrics, samples):
        per_question = [frequency_rewards(q["answers"], "math") for q in s["questions"]
                        if any(a is not None for a in q["answers"])]
        rewards = [r for rs in per_question for r in rs]
        assert m["reward/mean"] == pytest.approx(sum(rewards) / len(rewards))
        assert m["update/weight_change_norm"] > 0 and m["update/kl_new_old"] >= 0
        # GRPO advantages are zero when every answer to a question earns the same reward, so the
        # policy term has a gradient exactly when some question's rewards differ
        varied = any(len(set(rs)) > 1 for rs in per_question)
        assert m["grad/band_norm"] == 0.0 and (m["grad/policy_norm"] > 0) == varied
        learned.append(varied)
    assert any(learned)  # with seed 2, step 1 has varied rewards on every machine seen so far
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["tag"] for e in evals] == ["before", "step1", "after"]
    assert "eval/avg@2" in evals[0] and "eval/avg@2" in evals[2]
    assert "eval/greedy_pass@1" in evals[1] and not any(k.startswith("eval/avg@") for k in evals[1])


def test_diagnostics_every_k_steps(tmp_path):
    # steps 1 and 3 of 3 carry the update-size and per-term gradient metrics, step 2 does not
    cfg = make_config("spine", overrides={
        "data": {"data": "arith:1:2:4"},
        "sampling": {"num_votes": 4, "num_train_samples": 4, "max_new_tokens": 16},
        "optim": {"steps": 3, "questions_per_step": 2, "micro_batch_size": 8, "lr": 1e-5, "diagnostics": True,
                  "diagnostics_every": 2},
        "eval": {"eval_samples": 0, "eval_max_new_tokens": 4, "skip_eval_before": True},
        "run": {"out": str(tmp_path / "run"), "progress": False, "seed": 2},
    })
    res = adapt(cfg)
    assert [m["step"] for m in res.metrics] == [1, 2, 3]
    has = [("update/weight_change_norm" in m, "grad/band_norm" in m) for m in res.metrics]
    assert has == [(True, True), (False, False), (True, True)]
    with pytest.raises(ValueError, match="diagnostics_every must be >= 1"):
        make_config("spine", overrides={"optim": {"diagnostics_every": 0}})
