"""SpineGRPOTrainer (spine_ttrl.integrations.trl): the TRL adapter against TRL's own loss, the
band's gradient against plain log-softmax entropies, the vote over groups split across processes,
and a two-step ``trainer.train()`` on CPU with a tiny random Llama and an offline tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from spine_ttrl.answers import majority_vote  # noqa: E402
from spine_ttrl.integrations.trl import (  # noqa: E402
    SPINE_STATE_FILE,
    SUPPORTED_LOSS_TYPES,
    SpineGRPOConfig,
    SpineGRPOTrainer,
    gathered_group_rewards,
    kept_vote_rewards,
    vote_groups,
    vote_plan,
)
from spine_ttrl.losses import BANDS, band_penalty, kl_penalty, pooled_band_edges  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [str(i) for i in range(10)] + "what is plus times the answer".split()
PROMPTS = ["what is 1 plus 2", "what is 3 times 4", "what is 5 plus 6", "what is 7 times 8"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no hub): digits and a few words, whitespace-split."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_trainer(tmp_path, **kw) -> SpineGRPOTrainer:
    base = dict(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8,
                gradient_accumulation_steps=2, max_completion_length=8, max_steps=2, use_cpu=True, bf16=False,
                logging_steps=1, report_to="none", save_strategy="no", learning_rate=1e-3,
                gradient_checkpointing=False, temperature=0.9)
    base.update(kw)
    args = SpineGRPOConfig(**base)
    ds = Dataset.from_dict({"prompt": PROMPTS})
    return SpineGRPOTrainer(model=tiny_model(), args=args, train_dataset=ds, processing_class=tiny_tokenizer())


def fake_batch(trainer, seed: int = 0, B: int = 8, P: int = 5, T: int = 7) -> dict:
    """A micro-batch as TRL's _generate_and_score_completions leaves it: left-padded prompts,
    right-padded completions of different lengths, old and reference log-probs that differ from
    the current ones (so the clip and the KL act)."""
    g = torch.Generator().manual_seed(seed)
    V = len(WORDS)
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[5, :1] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(4, V, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4])[:B]
    completion_mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": completion_mask.sum() * 2,  # the generation batch holds 2 such micro-batches
        "old_per_token_logps": logp + 0.3 * torch.randn(B, T, generator=g),
        "ref_per_token_logps": logp + 0.5 * torch.randn(B, T, generator=g),
    }


def loss_and_grads(fn, trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn(trainer, trainer.model, inputs)
    loss.backward()
    grads = [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# ---------------------------------------------------------------------------------------------
# (a) selection all + no band (+ KL on all tokens) is TRL's own loss, for every supported type
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vllm_is", [False, True])
@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_loss_equals_trl_grpo_loss(tmp_path, loss_type, vllm_is):
    trainer = make_trainer(tmp_path, loss_type=loss_type, selection="all", band="none", kl_coef=0.05,
                           kl_tokens="all")
    assert trainer.ref_model is not None and trainer.args.beta == 0.0 and trainer.beta == 0.05
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = fake_batch(trainer)
    trainer._attach_selection(inputs, "train")
    if vllm_is:  # TRL's importance-sampling correction of vLLM rollouts, folded into our advantages
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        inputs["importance_sampling_ratio"] = torch.rand(inputs["completion_ids"].shape,
                                                         generator=torch.Generator().manual_seed(1)) * 2
    ours, g_ours = loss_and_grads(SpineGRPOTrainer._compute_loss, trainer, inputs)
    theirs, g_theirs = loss_and_grads(GRPOTrainer._compute_loss, trainer, inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert len(g_ours) == len(g_theirs) > 0
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert trainer._metrics["train"]["loss/kl"][-1] > 0


def test_unsupported_settings_are_refused(tmp_path):
    base = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, use_cpu=True, bf16=False)
    for bad, words in [({"loss_type": "cispo"}, "loss_type"), ({"beta": 0.1}, "kl_coef"),
                       ({"top_entropy_quantile": 0.2}, "selection"), ({"entropy_coef": 0.01}, "band"),
                       ({"num_votes": 2}, "num_votes"), ({"selection": "bottom"}, "selection"),
                       ({"epsilon_high": 0.28}, "epsilon_high"), ({"band_anchor": "last"}, "band_anchor"),
                       ({"band_anchor": "first", "band": "none"}, "band_anchor=first needs a band")]:
        with pytest.raises(ValueError, match=words):
            SpineGRPOConfig(**base, **bad)
    SpineGRPOConfig(**base, num_votes=6)  # votes > samples, not a multiple: fine with TRL's own generation
    # (with vLLM, num_votes = 6 would be refused only when groups straddle processes: not in one process)
    with pytest.raises(ValueError, match="rollout_func"):
        SpineGRPOTrainer(model=tiny_model(), args=SpineGRPOConfig(**base, num_votes=8),
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tiny_tokenizer(),
                         rollout_func=lambda prompts, trainer: {})
    with pytest.raises(ValueError, match="reward_funcs"):
        SpineGRPOTrainer(model=tiny_model(), reward_funcs=[lambda **k: [0.0]], args=SpineGRPOConfig(**base),
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tiny_tokenizer())


# ---------------------------------------------------------------------------------------------
# (b) the band's gradient through TRL's fused entropy = band_penalty on plain log-softmax entropies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("band", ["quantile", "mad"])
def test_band_gradient_matches_plain_entropies(tmp_path, band):
    trainer = make_trainer(tmp_path, loss_type="dapo", selection="top", rho=0.5, band=band, beta_low=0.7,
                           beta_up=1.3)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = fake_batch(trainer)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])  # policy term: zero value, zero gradient
    trainer._attach_selection(inputs, "train")
    mask = inputs["completion_mask"].bool()
    fork = inputs["spine_fork_mask"]
    assert fork.sum() == -(-mask.sum() // 2)  # k = ceil(rho n) over the pool
    # The edges are quantiles of the forks' own entropies, so some fork sits exactly on an edge, where
    # relu's gradient flips with the last bit of H (fused fp32 vs plain fp64). Nudge the edges off
    # every fork so that the comparison tests the gradient path, not rounding at a kink.
    inputs["spine_band_low"] = inputs["spine_band_low"] + 3e-4
    inputs["spine_band_high"] = inputs["spine_band_high"] - 3e-4
    ours, g_ours = loss_and_grads(SpineGRPOTrainer._compute_loss, trainer, inputs)

    # Reference: the model's ordinary logits, temperature-scaled log-softmax, entropies in float64.
    T = inputs["completion_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)

    def reference(tr, m, batch):
        logits = m(input_ids=ids, attention_mask=attn).logits[:, -T - 1:-1].double() / tr.temperature
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        # the edges the trainer took from the fused head's behaviour entropies = those of plain entropies
        low, high = BANDS[band](ent.detach(), fork, 0.1, 0.5)
        torch.testing.assert_close(batch["spine_band_low"] - 3e-4, low.float(), atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(batch["spine_band_high"] + 3e-4, high.float(), atol=1e-5, rtol=0, equal_nan=True)
        gap = torch.minimum((ent - batch["spine_band_low"].unsqueeze(1)).abs(),
                            (ent - batch["spine_band_high"].unsqueeze(1)).abs())
        assert gap[fork].min() > 1e-5
        z = batch["num_items_in_batch"] / 1 * 2 / tr.args.steps_per_generation  # TRL's dapo normaliser, 1 process
        return band_penalty(ent, fork, batch["spine_band_low"], batch["spine_band_high"], 0.7, 1.3, z).float()

    ref, g_ref = loss_and_grads(reference, trainer, inputs)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert ours > 0
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_band_anchor_first_is_pooled_once_then_fixed(tmp_path):
    """band_anchor=first: the built-in engine's pooled band (pooled_band_edges over every forking token
    of the first generation batch), then the same edges for every response of every later batch."""
    trainer = make_trainer(tmp_path, selection="top", rho=0.5, band="mad", band_anchor="first")
    trainer.model.train()
    seen = []
    for seed in (0, 1):
        batch = fake_batch(trainer, seed=seed)
        batch["completion_mask"][2] = 0  # a row without completion tokens: no fork, no band (NaN edges)
        trainer._attach_selection(batch, "train")
        mask = batch["completion_mask"].bool()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        with torch.no_grad():
            _, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, mask.size(1),
                                                                   compute_entropy=True)
        ent = ent.masked_fill(~mask, 0.0)
        fork = batch["spine_fork_mask"]
        has = fork.any(dim=1)
        n = int(has.sum())
        assert not has[2] and 3 <= n < 8
        seen.append((pooled_band_edges(ent, fork, "mad", 0.1, 0.5), BANDS["mad"](ent, fork, 0.1, 0.5)[0]))
        lo, hi = trainer._spine_band_anchor
        assert (lo, hi) == pytest.approx(seen[0][0])  # the first batch's pooled band, kept
        assert torch.equal(batch["spine_band_low"][has], torch.full((n,), lo))
        assert torch.equal(batch["spine_band_high"][has], torch.full((n,), hi))
        assert batch["spine_band_low"][~has].isnan().all() and batch["spine_band_high"][~has].isnan().all()
        assert trainer._metrics["train"]["band/anchor_low"][-1] == pytest.approx(lo)
    assert seen[1][0] != pytest.approx(seen[0][0])  # the second batch's own pooled band differs: not used
    assert not torch.allclose(seen[1][1][has], torch.full((n,), lo))  # as does its per-response band


def test_band_anchor_survives_a_checkpoint(tmp_path):
    kw = dict(band_anchor="first", save_strategy="steps", save_steps=1, max_steps=1)
    trainer = make_trainer(tmp_path, **kw)
    trainer.train()
    anchor = trainer._spine_band_anchor
    assert anchor is not None
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert json.loads((ckpt / SPINE_STATE_FILE).read_text()) == {"band_anchor": list(anchor)}
    resumed = make_trainer(tmp_path, **{**kw, "max_steps": 2})
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed._spine_band_anchor == anchor  # restored, not recomputed at the resumed run's first batch
    last = [h for h in resumed.state.log_history if "band/anchor_low" in h][-1]
    assert (last["band/anchor_low"], last["band/anchor_high"]) == pytest.approx(anchor)


def test_grpo_row_weights_and_selected_kl_normaliser(tmp_path):
    """grpo: band = Σ_i Σ_t band_it / (|y_i| · B · accum); dapo with kl_tokens=selected: the KL is
    divided by the selected tokens (num_items × selected share), the built-in engine's N_KL."""
    trainer = make_trainer(tmp_path, loss_type="grpo", selection="top", rho=0.5, band="quantile", kl_coef=0.3,
                           beta_low=0.7, beta_up=1.3)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = fake_batch(trainer)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    trainer._attach_selection(inputs, "train")
    mask, fork = inputs["completion_mask"].bool(), inputs["spine_fork_mask"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = mask.size(1)
    with torch.no_grad():
        logp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, T, compute_entropy=True)
        ours = SpineGRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    B, lo, hi, ref = mask.size(0), inputs["spine_band_low"], inputs["spine_band_high"], inputs["ref_per_token_logps"]
    betas = trainer.args.beta_low, trainer.args.beta_up
    band = sum(band_penalty(ent[i:i + 1], fork[i:i + 1], lo[i:i + 1], hi[i:i + 1], *betas, mask[i].sum() * B * 2)
               for i in range(B))
    kl = sum(kl_penalty(logp[i:i + 1], ref[i:i + 1], fork[i:i + 1],
                        mask[i].sum() * B * 2 * fork.sum() / mask.sum()) for i in range(B))
    torch.testing.assert_close(ours, band + 0.3 * kl, atol=1e-6, rtol=1e-5)

    trainer.loss_type = "dapo"
    trainer.args.band = "none"
    with torch.no_grad():
        ours = SpineGRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    n_kl = inputs["num_items_in_batch"] * fork.sum() / mask.sum()  # = selected tokens of the generation batch
    torch.testing.assert_close(ours, 0.3 * kl_penalty(logp, ref, fork, n_kl), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (c) the vote: groups split across processes are voted on whole
# ---------------------------------------------------------------------------------------------


def test_vote_over_groups_split_across_two_ranks():
    # 3 prompts x G=4 = 12 completions, 6 per rank: prompt 1's group is rows 4..7, split 2 + 2.
    answers = ["1", "1", "2", None, "5", "5", "7", "7.0", "\\frac12", "0.5", "3", "1/2"]
    ranks = [answers[:6], answers[6:]]
    expected = vote_groups(answers, 4)
    assert expected[0] == [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1]  # 5 5 | 7 7.0 tie -> first cluster
    assert expected[1] == [0.5, 0.5, 0.75]

    main_payload = {}

    def run_rank(r):
        def gather(local):
            assert local == ranks[r]
            return ranks[0] + ranks[1]

        def broadcast(obj):
            if r == 0:
                main_payload["v"] = obj
            return main_payload["v"]

        return gathered_group_rewards(ranks[r], 4, gather=gather, broadcast=broadcast, is_main=r == 0)

    assert run_rank(0) == expected and run_rank(1) == expected
    assert gathered_group_rewards(answers, 4) == expected  # single process
    # Voting each rank's rows on their own would split prompt 1's group (and fail to be whole groups).
    with pytest.raises(ValueError, match="whole groups"):
        vote_groups(ranks[0], 4)


def test_calculate_rewards_single_process(tmp_path):
    trainer = make_trainer(tmp_path, reward="frequency")
    trainer.model.train()
    completions = ["the answer is 3", "3", "4", "\\boxed{3}", "1 2", "2", "x", "5"]
    rewards = trainer._calculate_rewards([{}] * 8, ["p"] * 8, completions, [[1]] * 8)
    assert rewards.shape == (8, 1)
    assert rewards[:, 0].tolist() == [0.75, 0.75, 0.25, 0.75, 0.5, 0.5, 0.0, 0.25]
    assert trainer._metrics["train"]["vote/majority_ratio"][-1] == pytest.approx((0.75 + 0.5) / 2)


# ---------------------------------------------------------------------------------------------
# (c') votes ≠ trained samples: all num_votes vote, a uniformly random num_generations are trained
# ---------------------------------------------------------------------------------------------


def test_vote_plan_blocks_and_uniform_kept_subset():
    plan = vote_plan(6, 3, 7, torch.Generator().manual_seed(0))  # 2 groups of G=3 rows, V=7 votes each
    assert [list(plan.block(s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]  # ceil / floor(7/3) each
    assert [plan.slot_of(v) for v in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    for g, kept in enumerate(plan.kept):
        assert len(set(kept)) == 3 and list(kept) == sorted(kept) and all(0 <= v < 7 for v in kept)
        assert [plan.target_row(g, v) for v in kept] == [3 * g, 3 * g + 1, 3 * g + 2]
        assert all(plan.target_row(g, v) is None for v in set(range(7)) - set(kept))
    assert vote_plan(6, 3, 7, torch.Generator().manual_seed(0)) == plan  # same seed, same plan (every rank)
    # Shuffle then keep: each of the C(6, 2) = 15 subsets equally likely (4000 draws: about 267 each).
    gen = torch.Generator().manual_seed(1)
    counts: dict = {}
    for _ in range(2000):
        for kept in vote_plan(4, 2, 6, gen).kept:
            counts[kept] = counts.get(kept, 0) + 1
    assert len(counts) == 15 and 200 < min(counts.values()) <= max(counts.values()) < 340, counts
    with pytest.raises(ValueError):
        vote_plan(4, 2, 1, gen)  # fewer votes than trained rows


def test_kept_vote_rewards_use_the_whole_group():
    plan = vote_plan(4, 2, 5, torch.Generator().manual_seed(0))
    answers = [["3", "4", "3", "4", "3"], ["1", None, "2", "2", "2"]]
    votes = [(g, v, answers[g][v]) for g in (1, 0) for v in range(5)]  # any order
    rewards, ratios = kept_vote_rewards(votes, plan)
    assert ratios == [0.6, 0.6]
    assert rewards == [float(answers[g][v] == ("3", "2")[g]) for g in range(2) for v in plan.kept[g]]
    freq, _ = kept_vote_rewards(votes, plan, reward="frequency")
    assert freq == [answers[g].count(answers[g][v]) / 5 if answers[g][v] else 0.0
                    for g in range(2) for v in plan.kept[g]]
    with pytest.raises(ValueError, match="exactly once"):
        kept_vote_rewards(votes[:-1], plan)


# Each prompt's fixed votes, in generation order (position k is "k the answer is a"): full-group
# majority 3 (P0), 7 (P1), 2 (P2); P3 has no majority above one vote (first cluster wins, 5).
FIXED_VOTES = {PROMPTS[0]: ["3", "4", "3", "5", "3", "6"], PROMPTS[1]: ["7", "8", "8", "7", "9", "7"],
               PROMPTS[2]: ["1", "2", "2", "1", "2", "0"], PROMPTS[3]: ["5", "6", "7", "8", "9", "0"]}


def fixed_generation(calls: list):
    """TRL's generation replaced by FIXED_VOTES, handed out per prompt in request order."""

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        tok = self.processing_class
        calls.append((len(prompt_ids), num_generations))
        served: dict = {}
        out = []
        for ids in prompt_ids:
            prompt = tok.decode(ids)
            k = served.get(prompt, 0)
            served[prompt] = k + 1
            text = f"{k} the answer is {FIXED_VOTES[prompt][k]}"
            out.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        return out, None

    return generate


@pytest.mark.parametrize("reward", ["majority", "frequency"])
def test_votes_train_a_random_subset_rewarded_by_the_whole_vote(tmp_path, monkeypatch, reward):
    calls: list = []
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fixed_generation(calls))
    trainer = make_trainer(tmp_path, num_generations=2, num_votes=6, reward=reward, selection="all", band="none")
    trainer.model.train()
    captured = []
    inner = trainer._calculate_rewards

    def spy(inputs, prompts, completions, completion_ids_list):
        out = inner(inputs, prompts, completions, completion_ids_list)
        captured.append(([str(c) for c in completions], out[:, 0].tolist()))
        return out

    trainer._calculate_rewards = spy
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(2)]  # 4 groups of G=2 trained rows
    full = {p: majority_vote(v, "math") for p, v in FIXED_VOTES.items()}  # the vote over all 6, by hand
    assert [full[p].label for p in PROMPTS] == ["3", "7", "2", "5"]
    kept_sets, subset_differs = set(), False
    for step in range(6):
        trainer.state.global_step = step  # a new step: a new kept subset
        out = trainer._generate_and_score_completions(inputs)
        assert calls[-1] == (24, 6)  # 6 votes per prompt generated, in one call
        assert out["completion_ids"].shape[0] == 8 and out["advantages"].shape == (8,)
        completions, rewards = captured[-1]
        for g, p in enumerate(PROMPTS):
            rows = completions[2 * g:2 * g + 2]
            positions = [int(t.split()[0]) for t in rows]
            answers = [t.split()[-1] for t in rows]
            assert positions == sorted(set(positions)) and answers == [FIXED_VOTES[p][k] for k in positions]
            expect = [float(a == full[p].label) if reward == "majority" else FIXED_VOTES[p].count(a) / 6
                      for a in answers]
            assert rewards[2 * g:2 * g + 2] == pytest.approx(expect)
            kept_sets.add((g, tuple(positions)))
            subset_differs |= majority_vote(answers, "math").label != full[p].label
        ratio = sum(full[p].ratio for p in PROMPTS) / 4  # over all 6 votes, not the 2 kept
        assert trainer._metrics["train"]["vote/majority_ratio"][-1] == pytest.approx(ratio)
    assert subset_differs  # some kept pair's own majority is not the group's: its rewards follow the group
    assert len(kept_sets) > 8  # the kept subset changes with the step
    trainer.model.eval()  # evaluation: no extra votes
    trainer.num_generations_eval = 2
    trainer._generate_and_score_completions(inputs)
    assert calls[-1] == (8, 2)


# ---------------------------------------------------------------------------------------------
# (d) end to end: two optimiser steps on CPU
# ---------------------------------------------------------------------------------------------


def test_train_two_steps_logs_metrics(tmp_path):
    trainer = make_trainer(tmp_path, kl_coef=0.01)  # SPINE v1 defaults: top 20 %, quantile band, masked KL
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for name in ("loss/policy", "loss/band", "loss/kl", "tokens/selected_fraction", "entropy/forking_mean",
                 "vote/majority_ratio", "reward/mean", "band/low_mean"):
        assert name in logs[0], name
    assert 0.15 < logs[0]["tokens/selected_fraction"] < 0.35
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_import_guard():
    code = "import spine_ttrl, sys; import spine_ttrl.integrations; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import spine_ttrl.integrations.trl\nexcept ImportError as e:\n"
            "    assert \"pip install 'spine-ttrl[trl]'\" in str(e), e\nelse:\n    raise SystemExit('no ImportError')")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("how", ["path", "peft"])
def test_kl_reference_from_a_path_or_peft(tmp_path, how):
    """kl_coef > 0 through TRL's own reference paths: a model id (reloaded by TRL) or LoRA (adapters off)."""
    kw = dict(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
              max_steps=1, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
              gradient_checkpointing=False, learning_rate=1e-2, kl_coef=0.1, kl_tokens="all")
    ds = Dataset.from_dict({"prompt": PROMPTS})
    if how == "path":
        tiny_model().save_pretrained(tmp_path / "m")
        trainer = SpineGRPOTrainer(model=str(tmp_path / "m"), args=SpineGRPOConfig(**kw), train_dataset=ds,
                                   processing_class=tiny_tokenizer())
        assert trainer.ref_model is not None
    else:
        peft = pytest.importorskip("peft")
        trainer = SpineGRPOTrainer(model=tiny_model(), args=SpineGRPOConfig(**kw), train_dataset=ds,
                                   processing_class=tiny_tokenizer(),
                                   peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        assert trainer.ref_model is None  # TRL disables the adapters for the reference log-probs
    assert trainer.args.beta == 0.0 and trainer.beta == 0.1
    trainer.train()
    assert "loss/kl" in trainer.state.log_history[0]


def test_conversational_prompts_train_one_step(tmp_path):
    """Chat-format prompts (as in the class docstring): completions arrive as messages and still vote."""
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    args = SpineGRPOConfig(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=6, max_steps=1, use_cpu=True, bf16=False, report_to="none",
                           save_strategy="no", logging_steps=1, gradient_checkpointing=False)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    trainer = SpineGRPOTrainer(model=tiny_model(), args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["vote/majority_ratio"] > 0 and "tokens/selected_fraction" in log


def test_label_metrics_by_hand_and_as_the_built_in_engine():
    from spine_ttrl.integrations.trl import VotePlan, label_metrics, vote_lists
    from spine_ttrl.rewards import REWARDS
    from spine_ttrl.votes import vote_and_reward

    groups = [["3", "3", "5", None], ["7", "2", "2", "7"], [None, None, None, None], ["1", "1", "1", "1"]]
    labels = ["3", "2", "4", None]
    m = label_metrics(groups, labels)
    # votes right: 2 of 4, 2 of 4, 0 of 4 (no label: last group skipped) -> 4 / 12
    assert m["vote/sample_accuracy"] == pytest.approx(4 / 12)
    # majorities: "3" right; the tie 7/2 goes to the first cluster, "7": wrong; nothing parsed: not voted
    assert m["vote/label_accuracy"] == pytest.approx(1 / 2)
    # rewards vs truth: group 0 [1 1 0 0] vs [1 1 0 0]; group 1 [1 0 0 1] vs [0 1 1 0] -> 4 of 8
    assert m["reward/accuracy"] == pytest.approx(4 / 8)
    assert "reward/accuracy" not in label_metrics(groups, labels, reward="frequency")
    assert label_metrics(groups, [None] * 4) == {}
    # the built-in engine's numbers on the same votes
    texts = [f"\\boxed{{{a}}}" if a is not None else "no answer" for g in groups for a in g]
    built_in = vote_and_reward(texts, labels, num_votes=4, num_train=4, task="math", reward_fn=REWARDS["majority"],
                               generator=torch.Generator().manual_seed(0)).metrics()
    assert {k: built_in[k] for k in m} == pytest.approx(m)
    # votes != samples: triples (group, position, answer) back in position order
    assert vote_lists([(1, 1, "b"), (0, 0, "x"), (1, 0, "a"), (0, 1, "y")], 2,
                      VotePlan(2, 2, ((0, 1), (0, 1)))) == [["x", "y"], ["a", "b"]]
    assert vote_lists(["a", "b", "c", "d"], 2) == [["a", "b"], ["c", "d"]]


def test_end_distributed_tears_the_process_group_down(tmp_path):
    """After a run, the CLI's teardown leaves no process group behind (a no-op when there is none)."""
    from spine_ttrl.integrations.trl_adapt import end_distributed

    end_distributed()  # nothing initialised: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    end_distributed()
    assert not torch.distributed.is_initialized()
