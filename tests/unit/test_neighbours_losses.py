"""Hand-computed tests for the neighbours' loss pieces in spine_ttrl.losses: ETTRL's EAR, STEER's
token weights, SIREN's anchored entropy penalty and Skywork-OR1's adaptive entropy coefficient."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from spine_ttrl.losses import (adaptive_entropy_coef, anchored_entropy_penalty, entropy_reshaped_advantages,
                               steer_token_weights)

LN2 = math.log(2.0)


# ---------------------------------------------------------------- entropy_reshaped_advantages
def test_ear_hand():
    # group 1: H = (1, 3), mean 2 -> Y = (1 + 1/2, 1 - 1/2) = (1.5, 0.5); A = (1, -1) -> (1.5, -0.5)
    # group 2: H = (0, 0), mean 0 -> unchanged (2, 0.5)
    out = entropy_reshaped_advantages(torch.tensor([1.0, -1.0, 2.0, 0.5]), torch.tensor([1.0, 3.0, 0.0, 0.0]), 2)
    assert_close(out, torch.tensor([1.5, -0.5, 2.0, 0.5]))
    # one group of 4: H = (0.5, 1, 1.5, 5), mean 2 -> Y = (1 + 1.5/2, 1 + 1/2, 1 + 0.5/2, 1 - 3/2)
    #   = (1.75, 1.5, 1.25, -0.5); A = 2 each -> (3.5, 3, 2.5, -1)
    out = entropy_reshaped_advantages(torch.full((4,), 2.0), torch.tensor([0.5, 1.0, 1.5, 5.0]), 4)
    assert_close(out, torch.tensor([3.5, 3.0, 2.5, -1.0]))


def test_ear_groups_of_one_and_dtype():
    # a group of one is its own mean: Y = 1 (and mean 0 is unchanged too)
    out = entropy_reshaped_advantages(torch.tensor([2.0, -3.0]), torch.tensor([0.7, 0.0]), 1)
    assert_close(out, torch.tensor([2.0, -3.0]))
    # float64 advantages stay float64; an entropy with grad gives a constant result
    h = torch.tensor([1.0, 3.0], requires_grad=True)
    out = entropy_reshaped_advantages(torch.tensor([1.0, 1.0], dtype=torch.float64), h, 2)
    assert out.dtype == torch.float64 and not out.requires_grad
    assert_close(out, torch.tensor([1.5, 0.5], dtype=torch.float64))


def test_ear_validates_shapes():
    with pytest.raises(ValueError):
        entropy_reshaped_advantages(torch.zeros(3), torch.zeros(3), 2)  # B not a multiple of G
    with pytest.raises(ValueError):
        entropy_reshaped_advantages(torch.zeros(4), torch.zeros(2), 2)  # mismatched shapes
    with pytest.raises(ValueError):
        entropy_reshaped_advantages(torch.zeros(2, 2), torch.zeros(2, 2), 2)  # not (B,)


# ---------------------------------------------------------------- steer_token_weights
def _steer_batch():
    # Row 0, A = +1, three masked tokens, every x = 0.5 (x(1-x) = 0.25, log x = -ln 2):
    #   a: π_old = 0.25, H = ln 2     -> log x + H = 0 -> Ω = 0
    #   b: π_old = 0.5,  H = 0        -> Ω = -(1/0.5) * 0.25 * (-ln 2) = 0.5 ln 2 = 0.346574
    #   d: π_old = 0.5,  H = ln 2 / 2 -> Ω = -(2) * 0.25 * (-ln 2 / 2) = 0.173287
    # Row 1, A = -1:
    #   c: x = 0.5, π_old = 0.5, H = 0 -> Ω = -0.346574, |Ω| = 0.346574 (masked)
    #   e: x = 0.5, π_old = 1e-3, H = 0 -> |Ω| = 1000 * 0.25 * ln 2 = 173.3 (NOT masked)
    #   padding (not masked)
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 1.0]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.5], [0.5, 1e-3, 1.0]]))
    ent = torch.tensor([[LN2, 0.0, LN2 / 2], [0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return logp, old, ent, adv, mask


def test_steer_weights_hand():
    # masked |Ω| = a 0, b 0.346574, d 0.173287, c 0.346574 -> min 0, max 0.346574:
    # w = 1.2 - |Ω|/0.346574 * 0.4 -> a 1.2, b 0.8, d 1.2 - 0.5 * 0.4 = 1.0, c 0.8; unmasked 0.
    # (Were e counted, max |Ω| would be 173.3 and b's weight 1.2 - 0.002 * 0.4 = 1.1992.)
    w = steer_token_weights(*_steer_batch())
    assert_close(w, torch.tensor([[1.2, 0.8, 1.0], [0.8, 0.0, 0.0]]))
    # the range [w_min, w_max] = [0.5, 2.0]: a 2.0, b 0.5, d 2.0 - 0.5 * 1.5 = 1.25, c 0.5
    w = steer_token_weights(*_steer_batch(), w_min=0.5, w_max=2.0)
    assert_close(w, torch.tensor([[2.0, 0.5, 1.25], [0.5, 0.0, 0.0]]))


def test_steer_weights_all_equal_and_empty_mask():
    logp, old, ent, adv, _ = _steer_batch()
    # only b and c masked: |Ω| both 0.346574 -> all equal -> 1.0
    mask = torch.tensor([[False, True, False], [True, False, False]])
    assert_close(steer_token_weights(logp, old, ent, adv, mask), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    # nothing masked -> all 0
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert_close(steer_token_weights(logp, old, ent, adv, none), torch.zeros(2, 3))


def test_steer_weights_clamp_probabilities():
    # token 0: logp = -inf -> x clamped to 1e-8; π_old = 0.5, H = 0, A = 1:
    #   Ω = -(2) * 1e-8 * (1 - 1e-8) * ln(1e-8) = 2e-8 * 18.420681 = 3.684e-7 (finite, not NaN)
    # token 1: x = 0.5, π_old = 0.5, H = 0 -> Ω = 0.346574 (max)
    # token 2: x = 0.5, π_old = 0.25, H = ln 2 -> Ω = 0 (min)
    # token 0's weight: 1.2 - 3.684e-7 / 0.346574 * 0.4 = 1.2 - 4.25e-7
    logp = torch.tensor([[float("-inf"), math.log(0.5), math.log(0.5)]])
    old = torch.log(torch.tensor([[0.5, 0.5, 0.25]]))
    ent = torch.tensor([[0.0, 0.0, LN2]])
    w = steer_token_weights(logp, old, ent, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool))
    assert torch.isfinite(w).all()
    assert_close(w, torch.tensor([[1.2 - 4.25e-7, 0.8, 1.2]]), atol=1e-7, rtol=0)


def test_steer_weights_detached_and_dtype():
    logp, old, ent, adv, mask = _steer_batch()
    logp64 = logp.double().requires_grad_()
    w = steer_token_weights(logp64, old.double(), ent.double(), adv, mask)
    assert w.dtype == torch.float64 and not w.requires_grad
    # per-token advantages (B, T) give the same weights as the (B,) ones broadcast
    w2 = steer_token_weights(logp, old, ent, adv.unsqueeze(1).expand(2, 3), mask)
    assert_close(w2, torch.tensor([[1.2, 0.8, 1.0], [0.8, 0.0, 0.0]]))


# ---------------------------------------------------------------- anchored_entropy_penalty
def test_anchored_entropy_penalty_scalar_target():
    # masked H = (1, 3), target 2: ((1 - 2)^2 + (3 - 2)^2) / 2 = 1; the unmasked 10 is ignored
    h = torch.tensor([[1.0, 3.0, 10.0]], requires_grad=True)
    p = anchored_entropy_penalty(h, 2.0, torch.tensor([[True, True, False]]))
    assert p.dim() == 0
    assert_close(p, torch.tensor(1.0))
    # dP/dH = 2 m (H - target) / 2 = (-1, 1, 0)
    (g,) = torch.autograd.grad(p, h)
    assert_close(g, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_anchored_entropy_penalty_per_token_target():
    # masked: (1 - 0.5)^2 = 0.25, (2 - 2)^2 = 0, (4 - 1)^2 = 9; sum 9.25 over 3 tokens = 3.083333
    h = torch.tensor([[1.0, 2.0], [4.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.5, 2.0], [1.0, 5.0]], requires_grad=True)
    p = anchored_entropy_penalty(h, target, torch.tensor([[True, True], [True, False]]))
    assert_close(p, torch.tensor(9.25 / 3))
    # the anchor is a constant: gradient only to H: 2 (H - target) / 3 = (1/3, 0, 2, 0)
    g_h, g_t = torch.autograd.grad(p, (h, target), allow_unused=True)
    assert g_t is None
    assert_close(g_h, torch.tensor([[1 / 3, 0.0], [2.0, 0.0]]))


def test_anchored_entropy_penalty_no_masked_token():
    # nothing masked: 0 / max(0, 1) = 0, even with a NaN entropy on padding
    h = torch.tensor([[float("nan"), 1.0]], requires_grad=True)
    p = anchored_entropy_penalty(h, 0.0, torch.zeros(1, 2, dtype=torch.bool))
    assert p.item() == 0.0
    (g,) = torch.autograd.grad(p, h)
    assert_close(g, torch.zeros(1, 2))


# ---------------------------------------------------------------- adaptive_entropy_coef
@pytest.mark.parametrize(
    "coef, entropy, expected",
    [
        (0.01, 0.1, 0.015),  # 0.1 <= 0.2: raise by δ -> 0.01 + 0.005
        (0.01, 0.3, 0.005),  # above target: lower by δ -> 0.01 - 0.005
        (0.01, 0.2, 0.015),  # at the target counts as "too low": raise
        (0.002, 0.3, 0.0),  # 0.002 - 0.005 = -0.003 -> clamped to 0
        (0.048, 0.1, 0.05),  # 0.048 + 0.005 = 0.053 -> clamped to max_coef 0.05
        (0.01, torch.tensor(0.1), 0.015),  # a 0-d tensor entropy
        (0.01, torch.tensor(0.3, requires_grad=True), 0.005),
    ],
)
def test_adaptive_entropy_coef(coef, entropy, expected):
    out = adaptive_entropy_coef(coef, entropy, target=0.2, delta=0.005, max_coef=0.05)
    assert type(out) is float
    assert out == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- the loop's pieces around them
def test_batch_advantages_hand():
    from spine_ttrl.losses import batch_advantages, group_advantages

    # rewards (1, 0 | 3, 3): mean 7/4, population std sqrt(((3/4)^2 + (7/4)^2 + 2 (5/4)^2) / 4) = 1.29904
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    std = math.sqrt((0.75**2 + 1.75**2 + 2 * 1.25**2) / 4)
    assert_close(batch_advantages(r, 2), torch.tensor([-0.75, -1.75, 1.25, 1.25]) / (std + 1e-6))
    # per group the offset of the second question (3, 3) cancels: (1, -1, 0, 0)
    assert_close(group_advantages(r, 2), torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    # a per-question constant added to every reward: cancels per group, not over the batch
    shifted = r + torch.tensor([0.5, 0.5, -0.5, -0.5])
    assert_close(group_advantages(shifted, 2), group_advantages(r, 2))
    assert not torch.allclose(batch_advantages(shifted, 2), batch_advantages(r, 2))
    with pytest.raises(ValueError, match="multiple of group_size"):
        batch_advantages(torch.ones(3), 2)


def test_entropy_bonus_and_response_mean_entropy_hand():
    from spine_ttrl.losses import entropy_bonus, response_mean_entropy

    h = torch.tensor([[1.0, 3.0], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    # -0.1 * (1 + 3 + 2) / 3 = -0.2; d/dH = -0.1/3 on masked tokens, 0 on the NaN padding
    bonus = entropy_bonus(h, mask, 0.1, 3)
    assert_close(bonus, torch.tensor(-0.2))
    bonus.backward()
    assert_close(h.grad, torch.tensor([[-0.1 / 3, -0.1 / 3], [-0.1 / 3, 0.0]]))
    assert_close(response_mean_entropy(h, mask), torch.tensor([2.0, 2.0]))
    assert_close(response_mean_entropy(h, torch.zeros(2, 2, dtype=torch.bool)), torch.zeros(2))


def test_policy_loss_token_weights_hand():
    from spine_ttrl.losses import policy_loss

    # ratio 1 everywhere: per token -A; A = (1, -2); weights (0.8, 1.2 | 1.0, pad)
    # L = -(0.8 + 1.2) * 1 + 1.0 * 2 = 0 over normaliser 3 -> 0; then weights (1.2, 1.2 | 0.8): -(2.4) + 1.6 = -0.8 / 3
    lp = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0])
    loss, _ = policy_loss(lp, lp, adv, mask, 0.2, 3, weights=torch.tensor([[0.8, 1.2], [1.0, 5.0]]))
    assert_close(loss, torch.tensor(0.0))
    loss, _ = policy_loss(lp, lp, adv, mask, 0.2, 3, weights=torch.tensor([[1.2, 1.2], [0.8, 5.0]]))
    assert_close(loss, torch.tensor(-0.8 / 3))
    unweighted, _ = policy_loss(lp, lp, adv, mask, 0.2, 3)
    assert_close(unweighted, policy_loss(lp, lp, adv, mask, 0.2, 3, weights=torch.ones(2, 2))[0])
