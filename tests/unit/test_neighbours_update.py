"""The neighbours' switches reach the math: one ``update_on_batch`` on a fixed batch (tiny random Llama,
SGD with lr 1, no clipping, so the weight change is minus the gradient) equals the gradient of the loss
assembled by hand from the pure functions; and micro-batching does not change it."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from spine_ttrl.config import make_config
from spine_ttrl.engine.scoring import build_training_batch, score_batch, score_completions
from spine_ttrl.losses import (BANDS, adaptive_entropy_coef, anchored_entropy_penalty, band_penalty, entropy_bonus,
                               entropy_reshaped_advantages, group_advantages, policy_loss, quantile_linear,
                               response_mean_entropy, steer_token_weights)
from spine_ttrl.selection import top_entropy_mask
from spine_ttrl.tokens import nucleus_entropy, window_entropy
from spine_ttrl.update import update_on_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_text import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
G = 4


@pytest.fixture(scope="module")
def setup():
    """The model, a batch of 2 questions x 4 completions of different lengths, rewards -> advantages,
    and the behaviour entropies (what the sampler would have recorded)."""
    model = tiny_model(seed=3).double()
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 4, 5, 15, 6], [1, 7, 16, 8]]
    comps = [torch.randint(4, 20, (n,), generator=g).tolist() for n in (6, 3, 7, 5, 4, 7, 2, 6)]
    batch = build_training_batch([prompts[i // G] for i in range(8)], comps, 0)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]), G).double()
    _, ent = score_batch(model, batch, 8, temperature=1.0, chunk_size=64)
    return model, batch, adv, ent


def _step(model, batch, adv, ent, cfg, mb: int = 8, **kw):
    """Weight change of one update_on_batch (SGD, lr 1) and its result."""
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    o = cfg.optim
    o.micro_batch_size, o.max_grad_norm, o.logit_chunk_size = mb, 0.0, 64
    res = update_on_batch(m, opt, batch, adv, cfg.spine, o, temperature=1.0, group_size=G, behaviour_entropy=ent, **kw)
    return [p.detach() - b for p, b in zip(m.parameters(), before)], res


def _hand(model, batch, loss_fn):
    """Minus the gradient of ``loss_fn(logp, ent, logits)`` (logp, ent (B, T) with grad; logits (B, T, V))."""
    m = copy.deepcopy(model)
    lp, ent, T = score_completions(m, batch, list(range(8)), temperature=1.0, chunk_size=64)
    input_ids, attn, pos, _, mask, P = batch
    logits = m(input_ids=input_ids, attention_mask=attn.long(), position_ids=pos).logits[:, P - 1:P - 1 + T]
    loss_fn(lp, ent, logits).backward()
    return [-p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]


def _close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)  # the update computes its loss in fp32


def _config(preset: str, **spine):
    return make_config(preset, overrides={"spine": spine})


def test_steer_token_weights_reach_the_policy_term(setup):
    model, batch, adv, ent = setup
    delta, res = _step(model, batch, adv, ent, _config("ttrl", token_weights="steer"))
    mask = batch[4]

    def loss(lp, h, _):
        old = lp.detach()  # the behaviour policy: ratio 1 at the first update
        w = steer_token_weights(old, old, ent, adv, mask)
        return policy_loss(lp, old, adv, mask, 0.2, int(mask.sum()), weights=w)[0]

    _close(delta, _hand(model, batch, loss))
    assert (res.metrics["policy/token_weight_min"], res.metrics["policy/token_weight_max"]) == pytest.approx((0.8, 1.2))
    # and micro-batches of 3 rows give the same update
    _close(_step(model, batch, adv, ent, _config("ttrl", token_weights="steer"), mb=3)[0], delta)
    plain = _step(model, batch, adv, ent, _config("ttrl"))[0]
    assert any(not torch.allclose(x, y) for x, y in zip(plain, delta))


def test_ear_reshapes_the_advantages(setup):
    model, batch, adv, ent = setup
    delta, res = _step(model, batch, adv, ent, _config("ttrl", advantage_shaping="ear"))
    mask = batch[4]
    shaped = entropy_reshaped_advantages(adv, response_mean_entropy(ent, mask), G)
    _close(delta, _hand(model, batch, lambda lp, h, _: policy_loss(lp, lp.detach(), shaped, mask, 0.2, int(mask.sum()))[0]))
    y = shaped / adv
    assert res.metrics["advantage/shaping_factor_min"] == pytest.approx(float(y.min()))
    assert res.metrics["advantage/shaping_factor_max"] == pytest.approx(float(y.max()))


def test_window_signal_picks_the_forking_tokens(setup):
    model, batch, adv, ent = setup
    cfg = _config("spine", selection_signal="window", window_size=3, rho=0.3)
    delta, res = _step(model, batch, adv, ent, cfg)
    mask = batch[4]
    fork = top_entropy_mask(window_entropy(ent, mask, 3), mask, 0.3)
    assert torch.equal(res.selection.fork_mask, fork)
    assert not torch.equal(fork, top_entropy_mask(ent, mask, 0.3))  # the window changes the choice here
    low, high = BANDS["quantile"](ent, fork, 0.1, 0.5)  # the band: over the forks' own entropies
    n = int(mask.sum())
    _close(delta, _hand(model, batch, lambda lp, h, _: policy_loss(lp, lp.detach(), adv, fork, 0.2, n)[0]
                        + band_penalty(h, fork, low, high, cfg.spine.beta_low, cfg.spine.beta_up, n)))


def test_adaptive_entropy_bonus(setup):
    model, batch, adv, ent = setup
    mask = batch[4]
    cfg = _config("ttrl", entropy_reg="adaptive", entropy_target=10.0, entropy_coef_delta=0.05)
    delta, res = _step(model, batch, adv, ent, cfg, entropy_reg_state={"coef": 0.1})
    coef = adaptive_entropy_coef(0.1, ent[mask].mean(), 10.0, 0.05, 1.0)
    assert coef == pytest.approx(0.15) and res.entropy_reg_state == {"coef": pytest.approx(0.15)}
    n = int(mask.sum())
    _close(delta, _hand(model, batch, lambda lp, h, _: policy_loss(lp, lp.detach(), adv, mask, 0.2, n)[0]
                        + entropy_bonus(h, mask, coef, n)))
    _close(_step(model, batch, adv, ent, cfg, mb=3, entropy_reg_state={"coef": 0.1})[0], delta)


def test_anchored_nucleus_entropy_penalty(setup):
    model, batch, adv, ent = setup
    mask = batch[4]
    cfg = _config("ttrl", entropy_reg="anchored", entropy_reg_coef=0.5, entropy_reg_quantile=0.6,
                  entropy_reg_top_p=0.7)
    # the first update measures the anchor and adds nothing
    first, res = _step(model, batch, adv, ent, cfg)
    _close(first, _step(model, batch, adv, ent, _config("ttrl"))[0])
    cut = quantile_linear(ent.reshape(1, -1), mask.reshape(1, -1), 0.6)[0]
    masked = mask & (ent > cut)

    def nucleus(logits):
        return nucleus_entropy(logits, 0.7, 1.0)

    with torch.no_grad():
        h0 = nucleus(_logits(model, batch))
    anchor = float(h0[masked].mean())
    assert res.entropy_reg_state["anchor"] == pytest.approx(anchor)
    assert res.metrics["entropy_reg/masked_fraction"] == pytest.approx(float(masked.sum() / mask.sum()))
    # later updates: 0.5 x mean over the masked positions of (H_nucleus - anchor)^2
    delta, res = _step(model, batch, adv, ent, cfg, entropy_reg_state={"anchor": 1.5})
    n = int(mask.sum())
    _close(delta, _hand(model, batch, lambda lp, h, logits: policy_loss(lp, lp.detach(), adv, mask, 0.2, n)[0]
                        + 0.5 * anchored_entropy_penalty(nucleus(logits), 1.5, masked)))
    assert res.metrics["loss/entropy_reg"] == pytest.approx(
        0.5 * float(anchored_entropy_penalty(h0, 1.5, masked)), rel=1e-6)
    _close(_step(model, batch, adv, ent, cfg, mb=3, entropy_reg_state={"anchor": 1.5})[0], delta)


def _logits(model, batch):
    input_ids, attn, pos, _, mask, P = batch
    T = mask.shape[1]
    return model(input_ids=input_ids, attention_mask=attn.long(), position_ids=pos).logits[:, P - 1:P - 1 + T]


@pytest.mark.parametrize("spine, state", [
    ({"token_weights": "steer"}, None),
    ({"advantage_shaping": "ear"}, None),
    ({"entropy_reg": "anchored", "entropy_reg_quantile": 0.6, "entropy_reg_top_p": 0.7}, {"anchor": 1.5}),
    ({"entropy_reg": "adaptive", "entropy_target": 10.0}, None),
    ({"selection": "top", "selection_signal": "window", "window_size": 3, "rho": 0.3}, None),
])
@pytest.mark.parametrize("mb", [8, 3])
def test_without_sampler_entropies_the_update_is_the_same(setup, spine, state, mb):
    # vLLM returns no entropies: one micro-batch -> the gradient pass is the behaviour pass; several ->
    # a no-grad scoring pass first. Either way the same update as with the sampler's entropies.
    model, batch, adv, ent = setup
    cfg = _config("ttrl", **spine)
    want = _step(model, batch, adv, ent, cfg, entropy_reg_state=state)[0]
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    o = cfg.optim
    o.micro_batch_size, o.max_grad_norm, o.logit_chunk_size = mb, 0.0, 64
    update_on_batch(m, torch.optim.SGD(m.parameters(), lr=1.0), batch, adv, cfg.spine, o, temperature=1.0,
                    group_size=G, entropy_reg_state=state)
    _close([p.detach() - b for p, b in zip(m.parameters(), before)], want)
