"""What the update minimises is SPINE's objective, written out here independently.

For one small batch on a tiny random Llama, the test computes the objective step by step with
plain torch — a full forward pass (no chunking, no prompt sharing), softmax entropies, the
forking mask, the band edges and the three loss terms with their normalisers — and compares it
with what :func:`spine_ttrl.update.update_on_batch` does: the loss it reports and the gradient it
applies (an SGD step with learning rate 1 and no clipping moves the weights by −gradient).
A wrong normaliser, mask or sign inside the update fails here.
"""

import copy
import math

import numpy as np
import pytest
import torch

from spine_ttrl.config import make_config
from spine_ttrl.engine.scoring import build_training_batch
from spine_ttrl.update import update_on_batch
from tests.unit.test_sampling import tiny_llama

TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7], [5, 6, 7], [9, 4], [9, 4]]  # two questions, G = 2
COMPLETIONS = [[11, 12, 13, 14, 15, 16], [17, 18, 19], [20, 21, 22, 23, 24], [25, 26, 27, 28, 29, 30, 31]]
REWARDS = [1.0, 0.0, 0.0, 1.0]


def _full_pass(model, batch):
    """log π(y_t) and H_t (B, T) from a plain forward over the whole padded batch."""
    input_ids, attn, pos, completion, token_mask, P = batch
    logits = model(input_ids=input_ids, attention_mask=attn.long(), position_ids=pos).logits
    z = logits[:, P - 1:P - 1 + completion.shape[1]].float() / TEMPERATURE
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp * token_mask, ent * token_mask


def _advantages(rewards, G):
    r = torch.tensor(rewards).view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)).view(-1)


def _otsu_row(h):
    """Otsu's threshold over a histogram of 100 bins (first maximum), select H > upper edge of k*."""
    if len(h) <= 1 or h.min() == h.max():
        return np.ones(len(h), bool)
    counts, edges = np.histogram(h, bins=100, range=(h.min(), h.max()))
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_k = -1.0, 0
    for k in range(99):
        c0, c1 = counts[:k + 1].sum(), counts[k + 1:].sum()
        if c0 == 0 or c1 == 0:
            continue
        mu0 = (counts[:k + 1] * centres[:k + 1]).sum() / c0
        mu1 = (counts[k + 1:] * centres[k + 1:]).sum() / c1
        between = (c0 / len(h)) * (c1 / len(h)) * (mu0 - mu1) ** 2
        if between > best:
            best, best_k = between, k
    return h > h.min() + (best_k + 1) * (h.max() - h.min()) / 100


def _fork_mask(preset, H, token_mask):
    if preset == "ttrl":
        return token_mask.clone()
    if preset == "spine":  # top 20 % of the batch's tokens by entropy: k = ceil(0.2 n)
        values = H[token_mask]
        k = math.ceil(0.2 * values.numel())
        kth = values.sort(descending=True).values[k - 1]
        return token_mask & (H >= kth)
    fork = torch.zeros_like(token_mask)  # spine-v2: Otsu per response
    for i in range(H.shape[0]):
        idx = token_mask[i].nonzero().squeeze(1)
        fork[i, idx] = torch.from_numpy(_otsu_row(H[i, idx].double().numpy()))
    return fork


def _band(preset, H, fork):
    """Per-response edges over its forks: [Q10, Q50] (v1) or [max(c − 1.4826·MAD, 0), c] (v2)."""
    low, high = torch.full((H.shape[0],), math.nan), torch.full((H.shape[0],), math.nan)
    for i in range(H.shape[0]):
        h = H[i][fork[i]].double()
        if h.numel() == 0:
            continue
        if preset == "spine":
            low[i], high[i] = torch.quantile(h, 0.1), torch.quantile(h, 0.5)
        else:
            c = torch.quantile(h, 0.5)
            s = max(1.4826 * float(torch.quantile((h - c).abs(), 0.5)), 1e-6)
            low[i], high[i] = max(float(c) - s, 0.0), c
    return low, high


#: Band weights of these tests: unequal and away from the default, so that each must reach its own side.
BETA_LOW, BETA_UP = 0.7, 1.3


def _objective(model, ref_model, batch, preset, kl_coef):
    """SPINE's loss (policy + band + λ·KL) and its parts, by hand.

    The forking mask and band edges come from behaviour entropies H_b, here those of the
    reference model: a token's current entropy H then never sits exactly on a band edge, where
    the band's gradient would depend on float rounding (relu' jumps at 0).
    """
    token_mask = batch[4]
    logp, H = _full_pass(model, batch)
    with torch.no_grad():
        ref_logp, H_b = _full_pass(ref_model, batch)
    fork = _fork_mask(preset, H_b, token_mask)
    A = _advantages(REWARDS, 2).unsqueeze(1)
    n_tokens = token_mask.sum()
    ratio = torch.exp(logp - logp.detach())  # one update on fresh samples: ρ = 1 (with gradient)
    surrogate = torch.minimum(ratio * A, ratio.clamp(0.8, 1.2) * A)
    policy = -(surrogate * fork).sum() / n_tokens
    band = torch.zeros(())
    if preset != "ttrl":
        low, high = _band(preset, H_b, fork)
        below = torch.relu(low.unsqueeze(1) - H) * BETA_LOW
        above = torch.relu(H - high.unsqueeze(1)) * BETA_UP
        band = torch.where(fork, below + above, torch.zeros_like(H)).sum() / n_tokens
    kl = torch.zeros(())
    if kl_coef:
        kl_mask = token_mask if preset == "ttrl" else fork
        d = ref_logp - logp
        kl = ((torch.exp(d) - d - 1) * kl_mask).sum() / kl_mask.sum()
    parts = {"policy": policy, "band": band, "kl": kl}
    return policy + band + kl_coef * kl, parts, H_b, ref_logp


def _setup():
    """The batch, the policy, the frozen reference and a copy of the policy's starting weights."""
    torch.manual_seed(0)
    batch = build_training_batch(PROMPTS, COMPLETIONS, pad_id=0)
    model = tiny_llama(seed=3).float()
    ref_model = copy.deepcopy(model)
    # move the policy away from the reference so the KL and its gradient are not zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return batch, model, ref_model, copy.deepcopy(model)


def _check_update_against_objective(preset, kl_coef, micro):
    batch, model, ref_model, start = _setup()

    loss, parts, H_b, ref_logp = _objective(model, ref_model, batch, preset, kl_coef)
    parts_d = {k: v.detach() for k, v in parts.items()}
    grads = torch.autograd.grad(loss, list(model.parameters()))

    cfg = make_config(preset, overrides={"optim": {"micro_batch_size": micro, "max_grad_norm": 0.0},
                                         "spine": {"kl_coef": kl_coef, "beta_low": BETA_LOW, "beta_up": BETA_UP}})
    trained = copy.deepcopy(start)
    opt = torch.optim.SGD(list(trained.parameters()), lr=1.0)
    res = update_on_batch(trained, opt, batch, _advantages(REWARDS, 2), cfg.spine, cfg.optim,
                          temperature=TEMPERATURE, group_size=2, behaviour_entropy=H_b,
                          ref_logp=ref_logp if kl_coef else None)
    m = res.metrics
    assert torch.equal(res.selection.fork_mask, _fork_mask(preset, H_b, batch[4]))
    if preset != "ttrl":
        assert float(parts_d["band"]) > 1e-3  # the band term is active in this batch: the test has teeth
    if kl_coef:
        assert float(parts_d["kl"]) > 1e-4
    assert m["loss/policy"] == pytest.approx(float(parts_d["policy"]), abs=1e-6)
    assert m["loss/band"] == pytest.approx(float(parts_d["band"]), abs=1e-6)
    assert m["loss/kl"] == pytest.approx(float(parts_d["kl"]), abs=1e-6)
    total = m["loss/policy"] + m["loss/band"] + kl_coef * m["loss/kl"]
    assert total == pytest.approx(float(loss.detach()), abs=1e-6)
    # SGD with lr 1: Δθ = −∇L
    for (name, p0), p1, g in zip(start.named_parameters(), trained.parameters(), grads):
        torch.testing.assert_close(p0 - p1, g, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("micro", [2, 4])
@pytest.mark.parametrize("preset,kl_coef", [("ttrl", 0.0), ("spine", 0.0), ("spine-v2", 0.0),
                                            ("spine", 0.1), ("ttrl", 0.1)])
def test_update_minimises_the_objective_written_out(preset, kl_coef, micro):
    _check_update_against_objective(preset, kl_coef, micro)


def test_a_wrong_band_normaliser_in_the_update_is_caught(monkeypatch):
    # Mutation check: normalise the band by the micro-batch's selected tokens instead of the
    # batch's completion tokens; the comparison above must then fail.
    import spine_ttrl.update as update_mod

    real = update_mod.band_penalty
    monkeypatch.setattr(update_mod, "band_penalty", lambda ent, fork, lo, hi, bl, bu, n: real(
        ent, fork, lo, hi, bl, bu, max(int(fork.sum()), 1)))
    with pytest.raises(AssertionError):
        _check_update_against_objective("spine", 0.0, 2)


def test_a_kl_on_the_wrong_tokens_is_caught(monkeypatch):
    # Mutation check: the KL computed on all tokens where SPINE masks it to forking tokens.
    import spine_ttrl.update as update_mod

    real = update_mod.kl_penalty
    monkeypatch.setattr(update_mod, "kl_penalty", lambda lp, ref, mask, n: real(lp, ref, torch.ones_like(mask), n))
    with pytest.raises(AssertionError):
        _check_update_against_objective("spine", 0.1, 4)


def _norm_of_grad(term, params):
    if not term.requires_grad:
        return 0.0
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


@pytest.mark.parametrize("preset", ["ttrl", "spine"])
def test_diagnostics_report_each_terms_gradient_and_the_update_size(preset):
    kl_coef = 0.1
    batch, model, ref_model, start = _setup()
    _, parts, H_b, ref_logp = _objective(model, ref_model, batch, preset, kl_coef)
    params = list(model.parameters())
    want = {"policy": _norm_of_grad(parts["policy"], params), "band": _norm_of_grad(parts["band"], params),
            "kl": _norm_of_grad(kl_coef * parts["kl"], params)}

    runs = {}
    for diagnostics in (False, True):
        cfg = make_config(preset, overrides={"optim": {"micro_batch_size": 2, "max_grad_norm": 0.0,
                                                       "diagnostics": diagnostics},
                                          "spine": {"kl_coef": kl_coef, "beta_low": BETA_LOW, "beta_up": BETA_UP}})
        trained = copy.deepcopy(start)
        res = update_on_batch(trained, torch.optim.SGD(list(trained.parameters()), lr=0.5), batch,
                              _advantages(REWARDS, 2), cfg.spine, cfg.optim, temperature=TEMPERATURE, group_size=2,
                              behaviour_entropy=H_b, ref_logp=ref_logp)
        runs[diagnostics] = (trained, res.metrics)
    m = runs[True][1]
    for term in ("policy", "band", "kl"):
        assert m[f"grad/{term}_norm"] == pytest.approx(want[term], rel=1e-4, abs=1e-7), term
    if preset == "ttrl":
        assert m["grad/band_norm"] == 0.0
    else:
        assert m["grad/band_norm"] > 1e-3
    # the update itself is the same with and without diagnostics
    for a, b in zip(runs[False][0].parameters(), runs[True][0].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert m["optim/grad_norm"] == pytest.approx(runs[False][1]["optim/grad_norm"], rel=1e-5)
    # ‖Δθ‖ is the distance the weights moved
    with torch.no_grad():
        moved = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(start.parameters(), runs[True][0].parameters())))
    assert m["update/weight_change_norm"] == pytest.approx(moved, rel=1e-4)
    # KL(new || old) on the sampled tokens: mean of r log r with r = π_new / π_old, by a full pass
    with torch.no_grad():
        new_logp, _ = _full_pass(runs[True][0], batch)
        old_logp, _ = _full_pass(start, batch)
    log_r = (new_logp - old_logp)[batch[4]].double()
    assert m["update/kl_new_old"] == pytest.approx(float((log_r.exp() * log_r).mean()), rel=1e-3, abs=1e-7)
    assert m["update/kl_new_old"] > 0
