"""Hand-computed and reference-loop tests for spine_ttrl.losses."""

import math
import random

import pytest
import torch
from torch.testing import assert_close

from spine_ttrl.losses import (band_edges, band_penalty, group_advantages, kl_penalty, policy_loss, pooled_band_edges,
                               quantile_linear)


# ---------------------------------------------------------------- group_advantages
def test_group_advantages_hand():
    # Group 1: r = [1, 0, 0, 1], mean 0.5, population std 0.5 -> A = ±0.5 / (0.5 + 1e-6).
    # Group 2: r = [1, 1, 1, 1], std 0 -> A = 0 exactly.
    a = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), group_size=4)
    s = 0.5 / (0.5 + 1e-6)
    assert_close(a, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]))
    # r = [1, 0, 0]: mean 1/3, std = sqrt(((2/3)^2 + 2 (1/3)^2) / 3) = sqrt(2/9) = 0.471405
    # A = [0.6667, -0.3333, -0.3333] / 0.471405 = [1.414214, -0.707107, -0.707107]
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3)
    assert_close(a, torch.tensor([1.414214, -0.707107, -0.707107]), atol=1e-5, rtol=0)


def test_group_advantages_edge_cases():
    # One-response groups: the response is its own mean -> 0.
    assert_close(group_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1), torch.zeros(3))
    # Equal rewards -> zero advantages, not NaN.
    assert_close(group_advantages(torch.zeros(6), group_size=3), torch.zeros(6))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


def test_group_advantages_vs_loop():
    rng = random.Random(0)
    for _ in range(50):
        g = rng.randint(1, 6)
        n = rng.randint(1, 5)
        r = [float(rng.choice([0, 1, 0.5, -1])) for _ in range(g * n)]
        out = group_advantages(torch.tensor(r), group_size=g)
        for gi in range(n):
            grp = r[gi * g:(gi + 1) * g]
            mean = sum(grp) / g
            std = math.sqrt(sum((x - mean) ** 2 for x in grp) / g)
            for j, x in enumerate(grp):
                assert out[gi * g + j].item() == pytest.approx((x - mean) / (std + 1e-6), abs=1e-5)


# ---------------------------------------------------------------- policy_loss
def test_policy_loss_hand():
    # Four tokens, old logprob 0, eps 0.2:
    #   ratio 1.5, A=+1: min(1.5, 1.2) = 1.2      -> -1.2  (clipped branch taken)
    #   ratio 0.5, A=+1: min(0.5, 0.8) = 0.5      -> -0.5
    #   ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8   -> +0.8  (clipped branch taken)
    #   ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5   -> +1.5
    # sum = 0.6, normaliser 4 -> 0.15; clip fraction 2/4.
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, stats = policy_loss(logp, torch.zeros(2, 2), adv, torch.ones(2, 2, dtype=torch.bool), 0.2, 4)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    # approx KL (k3 of KL(old||new)): mean over tokens of (ρ − 1) − log ρ
    k = lambda r: (r - 1) - math.log(r)  # noqa: E731
    assert stats["approx_kl"].item() == pytest.approx((2 * k(1.5) + 2 * k(0.5)) / 4, abs=1e-6)
    loss.backward()
    # d/dlogp of −ρA/4 = −ρA/4 where the unclipped branch is taken; 0 where clipped.
    assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4], [0.0, 1.5 / 4]]))


def test_policy_loss_ratio_one_is_minus_advantage_sum():
    # With logp == old (one update per batch), ρ = 1 and L = −Σ m A / normaliser.
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = policy_loss(logp, logp.clone(), torch.tensor([2.0, -1.0]), mask, 0.2, 10)
    # −(2 + 2 − 1) / 10 = −0.3
    assert loss.item() == pytest.approx(-0.3)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def _loop_grpo_loss(logp, old, rewards, group_size, mask, eps, normalizer):
    """Explicit per-token Python reference of the TTRL/GRPO loss, independent of the library."""
    B, T = len(logp), len(logp[0])
    adv = []
    for i in range(B):
        g = i // group_size
        grp = rewards[g * group_size:(g + 1) * group_size]
        mean = sum(grp) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / group_size)
        adv.append((rewards[i] - mean) / (std + 1e-6))
    total = 0.0
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            total += -min(ratio * adv[i], clipped * adv[i])
    return total / normalizer


def test_grpo_loss_vs_python_loop():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        G, n, T = 1 + trial % 4, 1 + trial % 3, 2 + trial % 5
        B = G * n
        logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
        old = logp + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5) * 0.8
        mask = torch.rand(B, T, generator=gen) > 0.3
        rewards = (torch.rand(B, generator=gen) > 0.5).double()
        normalizer = int(mask.sum()) + 1
        adv = group_advantages(rewards, G).double()
        loss, _ = policy_loss(logp, old, adv, mask, 0.2, normalizer)
        ref = _loop_grpo_loss(logp.tolist(), old.tolist(), rewards.tolist(), G, mask.tolist(), 0.2, normalizer)
        assert loss.item() == pytest.approx(ref, abs=1e-5)


# ---------------------------------------------------------------- kl_penalty
def test_kl_penalty_hand():
    # logp = 0, ref = ln 2: d = ln 2 -> e^d − d − 1 = 2 − 0.693147 − 1 = 0.306853
    # logp = ln 2, ref = 0: d = −ln 2 -> 0.5 + 0.693147 − 1 = 0.193147
    # third token masked out; normaliser 2 -> (0.306853 + 0.193147) / 2 = 0.25
    logp = torch.tensor([[0.0, math.log(2), 5.0]])
    ref = torch.tensor([[math.log(2), 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert kl_penalty(logp, ref, mask, 2).item() == pytest.approx(0.25, abs=1e-6)
    # Identical policies: zero.
    assert kl_penalty(ref, ref, torch.ones(1, 3, dtype=torch.bool), 3).item() == 0.0


# ---------------------------------------------------------------- band_edges
def test_quantile_linear_hand():
    v = torch.tensor([[4.0, 1.0, 10.0, 3.0, 2.0], [2.0, 3.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[True] * 5, [True, True, False, False, False]])
    # row 0 sorted [1,2,3,4,10]: Q0.1 at pos 0.4 -> 1.4; Q0.5 -> 3. row 1 {2,3}: median 2.5
    assert_close(quantile_linear(v, m, 0.1), torch.tensor([1.4, 2.1], dtype=torch.float64))
    assert_close(quantile_linear(v, m, 0.5), torch.tensor([3.0, 2.5], dtype=torch.float64))


def test_band_edges_quantile_hand():
    H = torch.tensor([[4.0, 1.0, 10.0, 3.0, 2.0, 99.0]])
    fork = torch.tensor([[True, True, True, True, True, False]])  # 99 is not a forking token
    low, high = band_edges(H, fork, "quantile", 0.1, 0.5)
    assert_close(low, torch.tensor([1.4]))
    assert_close(high, torch.tensor([3.0]))


def test_band_edges_mad_hand():
    # paper §3: S = {2, 3}: c = 2.5, MAD = 0.5, s = 0.7413 -> [1.7587, 2.5]
    # S = {1,2,3,4,10}: c = 3, |H − c| = {2,1,0,1,7} -> MAD 1, s = 1.4826 -> [1.5174, 3]
    # S = {0.1, 0.2, 5}: c = 0.2, |dev| = {0.1, 0, 4.8} -> MAD 0.1, s = 0.14826 -> max(0.05174, 0)
    H = torch.tensor([[2.0, 3.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 10.0], [0.1, 0.2, 5.0, 0.0, 0.0]])
    fork = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    low, high = band_edges(H, fork, "mad")
    assert_close(low, torch.tensor([1.7587, 1.5174, 0.05174]), atol=1e-4, rtol=0)
    assert_close(high, torch.tensor([2.5, 3.0, 0.2]))
    # all-equal selected entropies: MAD 0 -> s = 1e-6; c − s clamps at 0 when c = 0
    low, high = band_edges(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.ones(2, 2, dtype=torch.bool), "mad")
    assert_close(low, torch.tensor([0.0, 1.0 - 1e-6]))
    assert_close(high, torch.tensor([0.0, 1.0]))


def test_pooled_band_edges_hand():
    # forks {1, 2} and {3, 4, 5} (9 and 7 are not forks): pooled 1..5 -> Q0.1 = 1.4, Q0.5 = 3
    H = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    fork = torch.tensor([[True, True, False], [True, True, True]])
    assert pooled_band_edges(H, fork, "quantile", 0.1, 0.5) == pytest.approx((1.4, 3.0))
    # per response the edges differ: [1.1, 1.5] and [3.2, 4.0]
    low, high = band_edges(H, fork, "quantile", 0.1, 0.5)
    assert_close(low, torch.tensor([1.1, 3.2]))
    assert_close(high, torch.tensor([1.5, 4.0]))
    # mad over 1..5: c = 3, |dev| = {2,1,0,1,2} -> MAD 1 -> [3 - 1.4826, 3]
    assert pooled_band_edges(H, fork, "mad") == pytest.approx((1.5174, 3.0))
    lo, hi = pooled_band_edges(H, torch.zeros_like(fork))
    assert math.isnan(lo) and math.isnan(hi)


def test_band_edges_no_fork_is_nan_and_penalty_ignores_it():
    H = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    fork = torch.tensor([[False, False], [True, True]])
    for kind in ("quantile", "mad"):
        low, high = band_edges(H, fork, kind)
        assert torch.isnan(low[0]) and torch.isnan(high[0])
        assert not torch.isnan(low[1]) and not low.requires_grad
    low, high = band_edges(H, fork)
    pen = band_penalty(H, fork, low, high, 1.0, 1.0, 4)
    assert torch.isfinite(pen)
    pen.backward()
    assert torch.isfinite(H.grad).all()


def test_band_edges_vs_numpy_loop():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        B, T = 1 + trial % 4, 1 + trial % 9
        H = torch.rand(B, T, generator=gen) * 4
        fork = torch.rand(B, T, generator=gen) > 0.4
        lq, hq = 0.1 + 0.05 * (trial % 3), 0.5 + 0.1 * (trial % 4)
        low, high = band_edges(H, fork, "quantile", lq, hq)
        lm, hm = band_edges(H, fork, "mad")
        for i in range(B):
            vals = np.array([H[i, t].item() for t in range(T) if fork[i, t]])
            if len(vals) == 0:
                assert math.isnan(low[i]) and math.isnan(lm[i])
                continue
            assert low[i].item() == pytest.approx(np.quantile(vals, lq), abs=1e-5)
            assert high[i].item() == pytest.approx(np.quantile(vals, hq), abs=1e-5)
            c = np.median(vals)
            s = max(1.4826 * np.median(np.abs(vals - c)), 1e-6)
            assert lm[i].item() == pytest.approx(max(c - s, 0.0), abs=1e-5)
            assert hm[i].item() == pytest.approx(c, abs=1e-5)


# ---------------------------------------------------------------- band_penalty
def test_band_penalty_hand():
    # band [1, 2], β_low = 1, β_up = 2: token 0.5 is 0.5 below, token 3 is 1 above.
    # penalty = (1·0.5 + 2·1.0) / 5 = 0.5; dR/dH = [−1/5, 0, 0, +2/5]
    H = torch.tensor([[0.5, 1.0, 2.0, 3.0]], requires_grad=True)
    fork = torch.ones(1, 4, dtype=torch.bool)
    pen = band_penalty(H, fork, torch.tensor([1.0]), torch.tensor([2.0]), 1.0, 2.0, 5)
    assert pen.item() == pytest.approx(0.5)
    pen.backward()
    assert_close(H.grad, torch.tensor([[-0.2, 0.0, 0.0, 0.4]]))
    # Tokens outside the fork mask never contribute.
    H2 = torch.tensor([[0.5, 3.0]])
    assert band_penalty(H2, torch.tensor([[False, False]]), torch.tensor([1.0]), torch.tensor([2.0]), 1, 1, 1) == 0


def test_band_penalty_vs_loop():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        B, T = 3, 7
        H = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
        fork = torch.rand(B, T, generator=gen) > 0.5
        low, high = band_edges(H, fork)
        pen = band_penalty(H, fork, low.double(), high.double(), 0.7, 1.3, 11.0)
        ref = 0.0
        for i in range(B):
            for t in range(T):
                if fork[i, t]:
                    ref += 0.7 * max(low[i].item() - H[i, t].item(), 0) + 1.3 * max(H[i, t].item() - high[i].item(), 0)
        assert pen.item() == pytest.approx(ref / 11.0, abs=1e-5)


# ---------------------------------------------------------------- aggregation
def test_micro_batching_with_global_normalizer_matches_full_batch():
    # A tiny "policy": logits = x @ W, so the loss depends on W through log-probs and entropies.
    torch.manual_seed(0)
    B, T, D, V, G = 8, 5, 4, 6, 4
    x = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    fork = mask & (torch.rand(B, T) > 0.5)
    W0 = torch.randn(D, V)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1]), G)

    def terms(W, rows):
        logits = x[rows] @ W
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp, ent

    with torch.no_grad():
        old, ent_old = terms(W0, slice(None))
        old = old + 0.05  # behaviour policy differs a little, so the clip can act
        low, high = band_edges(ent_old, fork)
    normalizer = int(mask.sum())
    kl_norm = int(fork.sum())

    def loss_of(W, rows):
        logp, ent = terms(W, rows)
        pl, _ = policy_loss(logp, old[rows], adv[rows], fork[rows], 0.2, normalizer)
        band = band_penalty(ent, fork[rows], low[rows], high[rows], 1.0, 1.0, normalizer)
        kl = kl_penalty(logp, old[rows], fork[rows], kl_norm)
        return pl + band + 0.1 * kl

    W_full = W0.clone().requires_grad_()
    full = loss_of(W_full, slice(None))
    full.backward()
    W_mb = W0.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part = loss_of(W_mb, rows)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert_close(W_mb.grad, W_full.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- gradient through the real path
def test_band_gradient_moves_true_entropy_in_the_right_direction():
    from spine_ttrl.tokens import token_entropy

    # Two token positions with their own logits. Position 0 is nearly deterministic (entropy
    # below the band), position 1 nearly uniform (above the band). One SGD step on the band
    # penalty must raise the actual entropy of position 0 and lower that of position 1.
    logits = torch.tensor([[[6.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.05]]], requires_grad=True)
    fork = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        h0 = token_entropy(logits)
    low, high = torch.tensor([0.6]), torch.tensor([0.9])
    assert h0[0, 0] < low and h0[0, 1] > high
    pen = band_penalty(token_entropy(logits), fork, low, high, 1.0, 1.0, 2)
    pen.backward()
    with torch.no_grad():
        h1 = token_entropy(logits - 0.5 * logits.grad)
    assert h1[0, 0] > h0[0, 0] + 1e-4
    assert h1[0, 1] < h0[0, 1] - 1e-4


def test_contested_rows_by_hand():
    from spine_ttrl.losses import BAND_ROWS, contested_rows

    adv = torch.tensor([0.5, -0.5, 0.0, 0.0, 1e-7])
    assert contested_rows(adv).tolist() == [True, True, False, False, True]
    assert BAND_ROWS["all"](adv).tolist() == [True] * 5
    assert BAND_ROWS["contested"] is contested_rows
