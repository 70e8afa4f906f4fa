"""Tests for the neighbours' token signals in spine_ttrl.tokens: ARES's window entropy and SIREN's
nucleus entropy (hand-computed values, a plain reference, chunking invariance, gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from spine_ttrl.tokens import nucleus_entropy, token_entropy, window_entropy

LN2, LN3 = math.log(2.0), math.log(3.0)


# ---------------------------------------------------------------------------------------------
# window_entropy
# ---------------------------------------------------------------------------------------------

H = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0], [6.0, 0.0, 3.0, 9.0, 9.0, 9.0]])
M = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "window, expected",
    [
        # w = 1: H itself where the mask is on, 0 elsewhere
        (1, [[1, 2, 3, 4, 5, 0], [6, 0, 3, 0, 0, 0]]),
        # w = 2: row 0: (1+2)/2, (2+3)/2, (3+4)/2, (4+5)/2, then 5 alone (t5 is padding), 0;
        #        row 1: (6+0)/2, (0+3)/2, then 3 alone (t3 is padding), 0, 0, 0
        (2, [[1.5, 2.5, 3.5, 4.5, 5, 0], [3, 1.5, 3, 0, 0, 0]]),
        # w = 3: row 0: 6/3, 9/3, 12/3, (4+5)/2, 5, 0;  row 1: 9/3, 3/2, 3, 0, 0, 0
        (3, [[2, 3, 4, 4.5, 5, 0], [3, 1.5, 3, 0, 0, 0]]),
        # w = 5 (default) and w = 10 > T: row 0: 15/5, 14/4, 12/3, 9/2, 5;  row 1: 9/3, 3/2, 3
        (5, [[3, 3.5, 4, 4.5, 5, 0], [3, 1.5, 3, 0, 0, 0]]),
        (10, [[3, 3.5, 4, 4.5, 5, 0], [3, 1.5, 3, 0, 0, 0]]),
    ],
)
def test_window_entropy_hand(window, expected):
    out = window_entropy(H, M, window=window)
    assert out.shape == (2, 6) and out.dtype == torch.float32
    assert_close(out, torch.tensor(expected, dtype=torch.float32))


def test_window_entropy_default_window_is_5():
    # H = 1..7 on one row, w = 5: t0 (1+2+3+4+5)/5 = 3, t1 20/5 = 4, t2 25/5 = 5, t3 (4+5+6+7)/4 = 5.5,
    # t4 (5+6+7)/3 = 6, t5 6.5, t6 7
    h = torch.arange(1.0, 8.0).unsqueeze(0)
    out = window_entropy(h, torch.ones(1, 7, dtype=torch.bool))
    assert_close(out, torch.tensor([[3.0, 4.0, 5.0, 5.5, 6.0, 6.5, 7.0]]))


def test_window_entropy_padding_left_holes_and_nan():
    # left padding: t0 masked -> 0; t1 (1+3)/2 = 2; t2 3.  NaN/100 on padding never enter.
    h = torch.tensor([[float("nan"), 1.0, 3.0], [1.0, 100.0, 3.0]])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    # row 1 has a hole at t1: t0's window {0, 1} holds only t0 -> 1; t1 -> 0; t2 -> 3
    assert_close(window_entropy(h, mask, window=2), torch.tensor([[0.0, 2.0, 3.0], [1.0, 0.0, 3.0]]))


def test_window_entropy_matches_a_loop_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(4, 37, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 37, generator=g) < 0.8
    for w in (1, 2, 5, 40):
        out = window_entropy(h, mask, window=w)
        ref = torch.zeros(4, 37, dtype=torch.float64)
        for i in range(4):
            for t in range(37):
                if mask[i, t]:
                    vals = [h[i, s].item() for s in range(t, min(t + w, 37)) if mask[i, s]]
                    ref[i, t] = sum(vals) / len(vals)
        assert_close(out.detach(), ref)
    # gradient: H_{0,0} enters H̄_{0,0} with weight 1/count; with w = 1 that is exactly the mask
    (grad,) = torch.autograd.grad(window_entropy(h, mask, window=1).sum(), h)
    assert_close(grad, mask.to(torch.float64))


def test_window_entropy_validates():
    for w in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            window_entropy(H, M, window=w)
    with pytest.raises(ValueError):
        window_entropy(H, M[:, :3])


# ---------------------------------------------------------------------------------------------
# nucleus_entropy
# ---------------------------------------------------------------------------------------------


def _plain_nucleus_entropy(logits, top_p, temperature=1.0):
    """Reference, row by row in float64 with plain autograd: keep tokens in descending-p order (stable)
    while the mass above them is < top_p, renormalise, take the entropy."""
    z = logits.double() / temperature
    rows = z.reshape(-1, z.shape[-1])
    out = []
    for row in rows:
        p = torch.softmax(row, -1).detach()
        order = sorted(range(len(p)), key=lambda v: (-p[v].item(), v))
        kept, mass = [], 0.0
        for v in order:
            if mass >= top_p:
                break
            kept.append(v)
            mass += p[v].item()
        logq = torch.log_softmax(row[kept], -1)
        out.append(-(logq.exp() * logq).sum())
    return torch.stack(out).reshape(z.shape[:-1])


def test_nucleus_entropy_uniform_by_hand():
    # 4 equal logits, p = 1/4 each; mass above the k-th token = (k-1)/4
    z = torch.zeros(4)
    assert_close(nucleus_entropy(z, 0.25), torch.tensor(0.0))  # keep 1 token (0.25 >= 0.25 drops #2)
    assert_close(nucleus_entropy(z, 0.26), torch.tensor(LN2))  # keep 2 -> ln 2
    assert_close(nucleus_entropy(z, 0.5), torch.tensor(LN2))  # the third has mass 0.5 above: dropped
    assert_close(nucleus_entropy(z, 0.6), torch.tensor(LN3))  # keep 3 -> ln 3
    assert_close(nucleus_entropy(z, 1.0), torch.tensor(math.log(4.0)))


def test_nucleus_entropy_renormalises_by_hand():
    # p = (0.5, 0.3, 0.2), top_p 0.7: mass above = (0, 0.5, 0.8) -> keep the first two,
    # q = (0.5, 0.3)/0.8 = (0.625, 0.375), H = 0.625 * 0.470004 + 0.375 * 0.980829 = 0.661563
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert_close(nucleus_entropy(logits, 0.7), torch.tensor([0.661563]))
    # top_p 0.5: mass above 0.3's token is 0.5 -> dropped, one token -> 0
    assert_close(nucleus_entropy(logits, 0.5), torch.tensor([0.0]))


def test_nucleus_entropy_temperature_by_hand():
    # logits 2 ln p with p = (0.5, 0.3, 0.2): at T = 2 the distribution is p again -> 0.661563
    # at T = 1: p ∝ (0.25, 0.09, 0.04) = (0.657895, 0.236842, 0.105263); top_p 0.7: mass above
    # = (0, 0.658, 0.895) -> keep two, q = (0.25, 0.09)/0.34 = (0.735294, 0.264706),
    # H = 0.735294 * 0.307485 + 0.264706 * 1.329136 = 0.577922
    logits = 2 * torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert_close(nucleus_entropy(logits, 0.7, temperature=2.0), torch.tensor(0.661563))
    assert_close(nucleus_entropy(logits, 0.7), torch.tensor(0.577922))
    assert_close(nucleus_entropy(logits, 0.7, temperature=None), torch.tensor(0.577922))


def test_nucleus_entropy_tie_at_the_boundary_keeps_the_lower_index():
    # p = (0.25, 0.25, 0.5), top_p 0.6: sorted 0.5 (v2), 0.25 (v0), 0.25 (v1); mass above
    # (0, 0.5, 0.75) -> keep v2 and v0 (the lower index of the tie), q = (1/3, 0, 2/3):
    # H = ln 3 - (2/3) ln 2 = 0.636514
    # dH/dz_j = -q_j (ln q_j + H): v0: -(1/3)(-1.098612 + 0.636514) = +0.154033;
    #   v1 (dropped): 0;  v2: -(2/3)(-0.405465 + 0.636514) = -0.154033
    logits = torch.log(torch.tensor([0.25, 0.25, 0.5])).requires_grad_()
    h = nucleus_entropy(logits, 0.6)
    assert_close(h, torch.tensor(0.636514))
    (g,) = torch.autograd.grad(h, logits)
    assert_close(g, torch.tensor([0.154033, 0.0, -0.154033]))


def test_nucleus_entropy_top_p_one_is_token_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 11, generator=g) * 2
    logits[0, 0, 3] = float("-inf")  # a masked vocabulary entry: 0 log 0 = 0, no NaN
    assert_close(nucleus_entropy(logits, 1.0), token_entropy(logits))
    assert_close(nucleus_entropy(logits, 1.0, temperature=0.7), token_entropy(logits, temperature=0.7))


@pytest.mark.parametrize("top_p, temperature", [(0.3, 1.0), (0.8, 1.0), (0.9, 0.6), (1.0, 1.3)])
def test_nucleus_entropy_chunks_and_gradients_match_a_plain_reference(top_p, temperature):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 13, generator=g) * 2).requires_grad_()
    upstream = torch.randn(2, 5, generator=g)
    ref = _plain_nucleus_entropy(logits, top_p, temperature)
    (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), logits)
    for chunk in (1, 3, 4, 10, 1000):
        h = nucleus_entropy(logits, top_p, temperature, chunk_size=chunk)
        assert h.shape == (2, 5) and h.dtype == torch.float32
        assert_close(h.double(), ref.detach(), atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad((h * upstream).sum(), logits)
        assert_close(grad.double(), ref_grad.double(), atol=1e-5, rtol=1e-5)


def test_nucleus_entropy_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nucleus_entropy(x, 0.7, 1.4, chunk_size=2), (logits,))


def test_nucleus_entropy_sorts_at_most_chunk_size_rows(monkeypatch):
    # the (rows, V) sorted copy exists for one chunk at a time, in forward and in backward
    seen = []
    real_sort = torch.sort

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return real_sort(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", spy)
    logits = torch.randn(10, 7, requires_grad=True)
    nucleus_entropy(logits, 0.5, chunk_size=4).sum().backward()
    # 10 rows in chunks of 4: 4, 4, 2 -- once in forward, once in backward
    assert seen == [4, 4, 2, 4, 4, 2]


def test_nucleus_entropy_dtypes_and_shapes():
    # bf16 logits -> fp32 entropy; a single (V,) row -> a 0-d result
    z = torch.zeros(2, 4, dtype=torch.bfloat16)
    out = nucleus_entropy(z, 0.5)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert_close(out, torch.tensor([LN2, LN2]))
    assert nucleus_entropy(torch.zeros(4, dtype=torch.float64), 0.6).dtype == torch.float64


def test_nucleus_entropy_validates():
    z = torch.zeros(2, 4)
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError):
            nucleus_entropy(z, bad)
    with pytest.raises(ValueError):
        nucleus_entropy(z, 0.5, chunk_size=0)
    with pytest.raises(ValueError):
        nucleus_entropy(z, 0.5, temperature=0.0)
    with pytest.raises(ValueError):
        nucleus_entropy(torch.zeros(2, 4, dtype=torch.long), 0.5)
