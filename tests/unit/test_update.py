"""One optimiser batch (spine_ttrl.update) on a tiny random Llama: micro-batching, the skipped scoring pass, NaN guard."""

import math

import pytest
import torch

from spine_ttrl.config import make_config
from spine_ttrl.engine.scoring import build_training_batch
from spine_ttrl.update import update_on_batch
from spine_ttrl.losses import group_advantages
from tests.unit.test_sampling import tiny_llama


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (5, 5, 3, 3)]
    comps = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (6, 2, 4, 7)]
    return build_training_batch(prompts, comps, pad_id=0)


def _update(preset, micro, updates=1, adv=None, behaviour_entropy=None, anchor=None, **spine):
    model = tiny_llama(seed=1)
    model.float()
    cfg = make_config(preset, overrides={"optim": {"micro_batch_size": micro, "updates_per_batch": updates,
                                                   "lr": 1e-2, "max_grad_norm": 0.0}, "spine": spine})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2) if adv is None else adv
    m = update_on_batch(model, opt, _batch(), adv, cfg.spine, cfg.optim, temperature=0.7, group_size=2,
                        behaviour_entropy=behaviour_entropy, band_anchor=anchor).metrics
    return model, m


def test_build_training_batch_layout():
    input_ids, attn, pos, comp, mask, P = build_training_batch([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    # P = 2 prompt columns (left-padded), T = 3 completion columns (right-padded)
    assert P == 2 and input_ids.tolist() == [[5, 6, 8, 9, 10], [0, 7, 11, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert pos[1, 1:3].tolist() == [0, 1]  # positions start at the first real token


@pytest.mark.parametrize("preset", ["ttrl", "spine", "spine-v2"])
def test_micro_batching_and_skipped_scoring_pass_give_the_same_update(preset):
    # micro=4: one micro-batch, one update -> behaviour values taken from the gradient pass.
    # micro=1 and micro=2: a separate no-grad scoring pass, then accumulation with a global
    # normaliser. The three updates must agree (SGD, fp32).
    ref, m_ref = _update(preset, 4)
    for micro in (1, 2):
        other, m = _update(preset, micro)
        for (n, a), b in zip(ref.named_parameters(), other.parameters()):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=n)
        assert m["loss/policy"] == pytest.approx(m_ref["loss/policy"], abs=1e-6)
        assert m["tokens/selected_fraction"] == m_ref["tokens/selected_fraction"]
    assert m_ref["time/scoring_s"] < 0.05  # the skipped pass costs nothing


def test_clip_acts_with_several_updates_per_batch():
    _, m1 = _update("ttrl", 4, updates=1)
    _, m3 = _update("ttrl", 4, updates=3)
    assert m1["policy/clip_fraction"] == 0.0 and m1["policy/approx_kl"] == 0.0  # ratio exactly 1
    assert m3["policy/approx_kl"] > 0


def test_non_finite_loss_skips_the_update():
    before = tiny_llama(seed=1)
    after, m = _update("spine", 2, adv=torch.tensor([float("nan"), 0.0, 1.0, -1.0]))
    assert m["optim/skipped_updates"] == 1
    assert math.isnan(m["optim/grad_norm"])
    for a, b in zip(before.parameters(), after.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset,updates", [("ttrl", 1), ("spine", 1), ("spine-v2", 1), ("spine", 3)])
def test_sampler_entropies_replace_the_scoring_pass_exactly(preset, updates):
    # Given the behaviour entropies (as the sampler returns them), the update needs no scoring
    # pass: old log-probs come from the first update's gradient pass. Same result as the
    # scoring-pass path, with and without micro-batching, for one and several updates.
    # (Entropies scored with the same micro-batch as the reference: bit-identical inputs, so a
    # token sitting on a band edge cannot flip sides through rounding.)
    from spine_ttrl.engine.scoring import score_batch

    for micro in (1, 2, 4):
        ent = score_batch(tiny_llama(seed=1).float(), _batch(), micro, temperature=0.7, chunk_size=512)[1]
        ref, m_ref = _update(preset, micro, updates=updates)
        other, m = _update(preset, micro, updates=updates, behaviour_entropy=ent)
        for (n, a), b in zip(ref.named_parameters(), other.parameters()):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=n)
        assert m["tokens/selected_fraction"] == m_ref["tokens/selected_fraction"]
        assert m["policy/approx_kl"] == pytest.approx(m_ref["policy/approx_kl"], abs=1e-7)
        if updates == 3:
            assert m["policy/approx_kl"] > 0  # later updates saw the stored behaviour log-probs
        assert m["time/scoring_s"] < 0.05  # no scoring pass was run


@pytest.mark.parametrize("preset", ["spine", "spine-v2"])
def test_anchored_band_pools_the_first_batch_then_holds_the_given_edges(preset):
    from spine_ttrl.engine.scoring import score_batch
    from spine_ttrl.selection import select_tokens
    from spine_ttrl.losses import pooled_band_edges

    ent = score_batch(tiny_llama(seed=1).float(), _batch(), 4, temperature=0.7, chunk_size=512)[1]
    cfg = make_config(preset, overrides={"spine": {"band_anchor": "first"}})
    fork = select_tokens(cfg.spine.selection, ent, _batch()[4], rho=cfg.spine.rho, scope=cfg.spine.scope, group_size=2)
    lo, hi = pooled_band_edges(ent, fork, cfg.spine.band, cfg.spine.band_low_q, cfg.spine.band_high_q)
    # first update: the edges are pooled over the batch's forks and reported for the caller
    _, m = _update(preset, 2, behaviour_entropy=ent, band_anchor="first")
    assert m["band/anchor_low"] == pytest.approx(lo) and m["band/anchor_high"] == pytest.approx(hi)
    assert m["band/low_mean"] == pytest.approx(lo, abs=1e-6) and m["band/high_mean"] == pytest.approx(hi, abs=1e-6)
    # later updates: the given edges, for every response, whatever this batch's entropies
    model_a, m = _update(preset, 2, behaviour_entropy=ent, anchor=(0.0, 0.0), band_anchor="first")
    assert m["band/anchor_high"] == 0.0 and m["band/above_fraction"] == 1.0 and m["band/below_fraction"] == 0.0
    model_b, _ = _update(preset, 2, behaviour_entropy=ent, band_anchor="first")
    assert any(not torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    # the per-response band (the paper's) reports no anchor
    _, m = _update(preset, 2, behaviour_entropy=ent)
    assert "band/anchor_low" not in m


def test_behaviour_entropy_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="behaviour_entropy has shape"):
        _update("spine", 2, behaviour_entropy=torch.zeros(4, 3))


def test_make_optimizer_is_fused_adamw_with_the_same_step_as_the_loop_version():
    from spine_ttrl.update import make_optimizer

    o = make_config("spine", overrides={"optim": {"lr": 1e-2, "weight_decay": 0.1}}).optim
    a, b = tiny_llama(seed=1).float(), tiny_llama(seed=1).float()
    pa, pb = list(a.parameters()), list(b.parameters())
    fused = make_optimizer(pa, o)
    plain = torch.optim.AdamW(pb, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay,
                              foreach=False)
    assert fused.defaults["fused"] is True and fused.defaults["weight_decay"] == 0.1
    for _ in range(2):
        for p, q in zip(pa, pb):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.equal(pa[0], next(tiny_llama(seed=1).parameters()))  # the steps moved the weights


def test_model_positions_count_a_shared_prompt_once_per_micro_batch():
    # prompts of lengths 3, 3 (the same), 2, 2 (the same): P = 3; completions of 2, 3, 1, 4 tokens
    batch = build_training_batch([[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]], [[3, 4], [3, 5, 6], [7], [7, 8, 9, 10]], 0)
    cfg = make_config("spine", overrides={"optim": {"micro_batch_size": 4}})
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    counts = {}
    for micro in (4, 2):
        cfg.optim.micro_batch_size = micro
        model = tiny_llama(seed=1)
        m = update_on_batch(model, torch.optim.SGD(list(model.parameters()), lr=1e-3), batch, adv, cfg.spine,
                            cfg.optim, temperature=0.7, group_size=2).metrics
        counts[micro] = m["tokens/model_positions"]
    # one micro-batch: 2 distinct prompts x 3 columns + 4 rows x (T=4 - 1) completion inputs
    assert counts[4] == 2 * 3 + 4 * 3
    # rows 0-1: 1 x 3 + 2 x (3 - 1); rows 2-3: the first column is padding in both, 1 x 2 + 2 x (4 - 1)
    assert counts[2] == (3 + 4) + (2 + 6)
    # distinct prompts (lengths 5, 5, 3, 3; completions up to 7): every row runs P + T columns
    _, m = _update("spine", 4)
    assert m["tokens/model_positions"] == 4 * (5 + 7)


@pytest.mark.parametrize("preset", ["ttrl", "spine", "spine-v2"])
def test_every_update_metric_is_documented(preset):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    model = tiny_llama(seed=1).float()
    cfg = make_config(preset, overrides={"optim": {"micro_batch_size": 2, "diagnostics": True},
                                         "spine": {"kl_coef": 0.1}})
    ref_logp = torch.zeros(_batch()[4].shape) - 4.0
    m = update_on_batch(model, torch.optim.SGD(list(model.parameters()), lr=1e-2), _batch(),
                        group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), cfg.spine, cfg.optim,
                        temperature=0.7, group_size=2, ref_logp=ref_logp).metrics
    assert "update/kl_new_old" in m and "grad/band_norm" in m
    missing = [k for k in m if f"`{k}`" not in doc]
    assert not missing, f"metrics not in docs/metrics.md: {missing}"


def test_selection_metrics_give_a_top20_fork_entropy_for_any_selection():
    import torch

    from spine_ttrl.update import Selection

    ent = torch.tensor([[0.1, 0.9, 0.3, 0.0, 0.0], [0.5, 0.2, 0.7, 0.4, 0.6]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # TTRL: every token selected, so the forking mean is the all-token mean (3.7 / 8) ...
    m = Selection(fork_mask=mask, low=None, high=None, entropies=ent).metrics(mask)
    assert m["entropy/forking_mean"] == pytest.approx(3.7 / 8) and m["entropy/all_mean"] == pytest.approx(3.7 / 8)
    # ... while the top 20 % of the 8 valid tokens (k = ceil(1.6) = 2: 0.9 and 0.7) are the forks SPINE would take
    assert m["entropy/top20_mean"] == pytest.approx(0.8)
    # the padded zeros are never counted, and it does not depend on what was selected
    one = torch.zeros_like(mask)
    one[1, 0] = True
    m = Selection(fork_mask=one, low=None, high=None, entropies=ent).metrics(mask)
    assert m["entropy/forking_mean"] == pytest.approx(0.5) and m["entropy/top20_mean"] == pytest.approx(0.8)


def test_band_rows_contested_keeps_the_band_off_questions_whose_rollouts_agree():
    # group 0 (rows 0-1) disagrees, group 1 (rows 2-3) is unanimous: A = [1, -1, 0, 0]
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert adv[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-5) and adv[2:].tolist() == [0.0, 0.0]
    # scope=response: every response has forks, so each has a band (half its forks above its median)
    _, every = _update("spine", 4, adv=adv, scope="response")
    _, gated = _update("spine", 4, adv=adv, scope="response", band_rows="contested")
    assert gated["band/rows_fraction"] == 0.5 and "band/rows_fraction" not in every
    assert 0 < gated["loss/band"] < every["loss/band"]  # the band of rows 2-3 is dropped
    # all four rows unanimous: with the paper's rule the band alone moves the weights, gated nothing moves
    zero = torch.zeros(4)
    moved, m_all = _update("spine", 4, adv=zero, scope="response")
    still, m_gated = _update("spine", 4, adv=zero, scope="response", band_rows="contested")
    assert m_all["loss/band"] > 0 and m_gated["loss/band"] == 0 and m_gated["band/rows_fraction"] == 0
    assert math.isnan(m_gated["band/low_mean"])  # no response has a band: no band metrics
    base = tiny_llama(seed=1).float()
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), moved.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), still.parameters()))


def test_band_rows_contested_gives_the_band_of_the_contested_rows_alone():
    # the gated band loss equals the band over the contested rows: recomputed by hand from the
    # update's own selection (behaviour entropies given, so the selection is known in advance)
    from spine_ttrl.losses import band_penalty
    from spine_ttrl.update import select_forks

    g = torch.Generator().manual_seed(3)
    mask = _batch()[4]
    ent = (torch.rand(mask.shape, generator=g) * 2).masked_fill(~mask, 0.0)
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    _, m = _update("spine", 4, adv=adv, behaviour_entropy=ent, band_rows="contested")
    sp = make_config("spine").spine
    sel = select_forks(ent, mask, sp, 2)
    # the first gradient pass runs the sampling weights, so its entropies are the model's, not `ent`;
    # the band edges and forks come from `ent`. Rows 2-3 must contribute nothing:
    rows = torch.tensor([True, True, False, False])
    nan = torch.full((4,), float("nan"))
    model = tiny_llama(seed=1).float()
    from spine_ttrl.engine.scoring import score_batch
    _, h = score_batch(model, _batch(), 4, temperature=0.7, chunk_size=128)
    expect = band_penalty(h, sel.fork_mask, torch.where(rows, sel.low, nan), torch.where(rows, sel.high, nan),
                          sp.beta_low, sp.beta_up, int(mask.sum()))
    assert expect.item() > 0 and m["loss/band"] == pytest.approx(expect.item(), rel=1e-5)
    ungated = band_penalty(h, sel.fork_mask, sel.low, sel.high, sp.beta_low, sp.beta_up, int(mask.sum()))
    assert ungated.item() > expect.item()  # rows 2-3 do have a band when it is not gated


def _adamw_steps(preset, advs, skip, micro=2, behaviour=False, ref_logp=None, optim=None, **spine):
    """Consecutive AdamW updates of one model, one per advantage vector; (model, metrics of each,
    the parameters after each). ``optim``: further OptimConfig overrides."""
    from spine_ttrl.engine.scoring import score_batch
    from spine_ttrl.update import make_optimizer

    model = tiny_llama(seed=1).float()
    cfg = make_config(preset, overrides={"optim": {"micro_batch_size": micro, "lr": 1e-2, "skip_inert_rows": skip,
                                                   **(optim or {})}, "spine": spine})
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    ent = score_batch(tiny_llama(seed=1).float(), _batch(), micro, temperature=0.7, chunk_size=512)[1] if behaviour else None
    ms, params = [], []
    for adv in advs:
        ms.append(update_on_batch(model, opt, _batch(), adv, cfg.spine, cfg.optim, temperature=0.7, group_size=2,
                                  behaviour_entropy=ent, ref_logp=ref_logp).metrics)
        params.append([p.detach().clone() for p in model.parameters()])
    return model, ms, params


@pytest.mark.parametrize("behaviour", [False, True])
@pytest.mark.parametrize("preset,spine,skipped", [("ttrl", {}, 0.5), ("spine", {"band_rows": "contested"}, 0.5),
                                                  ("spine", {"scope": "response"}, 0.0), ("ttrl", {"kl_coef": 0.1}, 0.0)])
def test_unanimous_questions_skip_their_passes_and_the_update_is_bit_identical(preset, spine, skipped, behaviour):
    # step 1 contested everywhere; step 2: group 0 (rows 0-1) unanimous, A = 0, group 1 contested;
    # step 3: every question unanimous. With nothing to pass, the gradients must still be zeros
    # (not None), or AdamW would skip the momentum step it takes with zero gradients. The paper's
    # band with scope=response gives every response forks and a band: nothing is inert.
    contested = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert contested[:2].tolist() == [0.0, 0.0] and contested[2] != 0
    advs = [group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), contested, torch.zeros(4)]
    # the KL acts on every row: the frozen model's log-probs come from the caller, any (B, T) tensor
    ref = torch.full(_batch()[4].shape, -3.0) if spine.get("kl_coef") else None
    on, m_on, _ = _adamw_steps(preset, advs, True, behaviour=behaviour, ref_logp=ref, **spine)
    off, m_off, _ = _adamw_steps(preset, advs, False, behaviour=behaviour, ref_logp=ref, **spine)
    for (n, a), b in zip(on.named_parameters(), off.parameters()):
        assert torch.equal(a, b), n
    assert [m["update/skipped_rows_fraction"] for m in m_on] == [0.0, skipped, 2 * skipped]
    assert all(m["update/skipped_rows_fraction"] == 0.0 for m in m_off)
    if skipped:
        assert m_on[1]["tokens/model_positions"] < m_off[1]["tokens/model_positions"]
        assert m_on[2]["tokens/model_positions"] == 0
    base = tiny_llama(seed=1).float()
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), on.parameters()))
    for a, b in zip(m_on, m_off):
        assert a["loss/policy"] == b["loss/policy"] and a["optim/grad_norm"] == b["optim/grad_norm"]


@pytest.mark.parametrize("preset,spine", [("ttrl", {}), ("spine", {"band_rows": "contested"})])
def test_skip_empty_steps_leaves_the_weights_alone_on_a_zero_gradient(preset, spine):
    # step 1 contested, step 2 every question unanimous (A = 0 everywhere): the gradient is exactly 0
    advs = [group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), torch.zeros(4)]
    _, m_on, on = _adamw_steps(preset, advs, True, optim={"skip_empty_steps": True}, **spine)
    _, m_off, off = _adamw_steps(preset, advs, True, optim={"skip_empty_steps": False}, **spine)
    assert m_on[1]["optim/grad_norm"] == 0.0 and m_off[1]["optim/grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(on[0], off[0]))  # the first step is the same either way
    assert all(torch.equal(a, b) for a, b in zip(on[0], on[1]))   # skipped: nothing moved
    assert m_on[1]["optim/skipped_empty_updates"] == 1 and "optim/skipped_empty_updates" not in m_on[0]
    # off, AdamW's momentum moves the weights with a zero gradient, about 0.9x the first step
    def dist(xs, ys):
        return sum(float((x - y).pow(2).sum()) for x, y in zip(xs, ys)) ** 0.5

    first = dist(off[0], [p.detach() for p in tiny_llama(seed=1).float().parameters()])
    moved = dist(off[1], off[0])
    assert 0.5 * first < moved < first
    assert "optim/skipped_empty_updates" not in m_off[1]


def test_skip_empty_steps_still_steps_when_the_band_acts_on_unanimous_rows():
    # the paper's per-response band acts on every row: with A = 0 everywhere the gradient is the band's
    advs = [group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), torch.zeros(4)]
    _, m_on, on = _adamw_steps("spine", advs, True, optim={"skip_empty_steps": True}, scope="response")
    assert m_on[1]["optim/grad_norm"] > 0 and "optim/skipped_empty_updates" not in m_on[1]
    assert any(not torch.equal(a, b) for a, b in zip(on[0], on[1]))


def test_diagnostics_steps_pass_every_row():
    from spine_ttrl.update import make_optimizer

    model = tiny_llama(seed=1).float()
    cfg = make_config("ttrl", overrides={"optim": {"micro_batch_size": 2, "diagnostics": True}})
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    m = update_on_batch(model, opt, _batch(), torch.zeros(4), cfg.spine, cfg.optim, temperature=0.7, group_size=2).metrics
    assert m["update/skipped_rows_fraction"] == 0.0 and m["tokens/model_positions"] > 0
