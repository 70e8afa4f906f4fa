"""Tests for spine_ttrl.tokens: hand-computed values, chunking invariance, gradients (vs plain autograd
and gradcheck) and memory. Forking-token selection is tested in test_selection.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from spine_ttrl.tokens import (
    DEFAULT_CHUNK_SIZE,
    logprobs_and_entropy,
    token_entropy,
    token_logprobs,
)

LN3 = math.log(3.0)
# p = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.25 * 1.386294 + 0.75 * 0.287682 = 0.562335
H_QUARTER = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))


# ---------------------------------------------------------------------------------------------
# token_entropy / token_logprobs: hand-computed values
# ---------------------------------------------------------------------------------------------


def test_entropy_uniform_is_log_vocab():
    # 4 equal logits -> p = 1/4 each -> H = ln 4 = 1.386294
    h = token_entropy(torch.zeros(1, 1, 4))
    assert h.shape == (1, 1) and h.dtype == torch.float32
    assert_close(h, torch.tensor([[math.log(4.0)]]))
    # and every token's log-prob is ln 1/4 = -1.386294, whichever token it is
    lp = token_logprobs(torch.zeros(1, 3, 4), torch.tensor([[0, 2, 3]]))
    assert_close(lp, torch.tensor([[-1.3862944, -1.3862944, -1.3862944]]))


def test_entropy_and_logprobs_two_logits_by_hand():
    # logits [0, ln 3] -> exp = [1, 3] -> p = [1/4, 3/4]; H = 0.562335
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]])
    assert_close(token_entropy(logits), torch.tensor([[0.5623351, 0.5623351]]))
    # logprob of token 1 = ln 3/4 = -0.287682, of token 0 = ln 1/4 = -1.386294
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert_close(lp, torch.tensor([[math.log(0.75), math.log(0.25)]]))


def test_gradients_two_logits_by_hand():
    # p = [1/4, 3/4], log p = [-1.386294, -0.287682], H = 0.562335 (logits [0, ln 3], as above).
    # dH/dz_j = -p_j (log p_j + H):  -0.25 * (-1.386294 + 0.562335) = +0.205990
    #                                -0.75 * (-0.287682 + 0.562335) = -0.205990
    # d logp_y/dz = onehot(y) - p:    y = 1 -> [-0.25, 0.25];  y = 0 -> [0.75, -0.75]
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]], requires_grad=True)
    (g_h,) = torch.autograd.grad(token_entropy(logits, chunk_size=1).sum(), logits)
    assert_close(g_h, torch.tensor([[[0.2059898, -0.2059898], [0.2059898, -0.2059898]]]))
    (g_lp,) = torch.autograd.grad(token_logprobs(logits, torch.tensor([[1, 0]]), chunk_size=1).sum(), logits)
    assert_close(g_lp, torch.tensor([[[-0.25, 0.25], [0.75, -0.75]]]))
    # the hidden-state path: hidden = I (2 rows), W = logits^T -> the same logits, so the same
    # gradients w.r.t. W's columns (grad_W = grad_z^T @ hidden)
    w = logits.detach()[0].t().contiguous().requires_grad_(True)  # (V=2, D=2)
    lp, h = logprobs_and_entropy(torch.eye(2), w, torch.tensor([1, 0]), chunk_size=1)
    (g_w,) = torch.autograd.grad(h.sum() + lp.sum(), w)
    assert_close(g_w, (g_h + g_lp)[0].t())


def test_temperature_divides_logits():
    # logits [0, 2 ln 3] at T = 2 -> z = [0, ln 3] -> p = [1/4, 3/4] -> H = 0.562335, lp(1) = ln 3/4.
    # Without the temperature: p = [1/10, 9/10], H = -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.325083.
    logits = torch.tensor([[[0.0, 2 * LN3]]])
    tok = torch.tensor([[1]])
    assert_close(token_entropy(logits, temperature=2.0), torch.tensor([[H_QUARTER]]))
    assert_close(token_logprobs(logits, tok, temperature=2.0), torch.tensor([[math.log(0.75)]]))
    h_plain = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert_close(token_entropy(logits), torch.tensor([[h_plain]]))
    # T = 1 and T = None are the same computation
    assert torch.equal(token_entropy(logits, temperature=1.0), token_entropy(logits))


def test_masked_vocab_entries_contribute_zero():
    # logits [0, 0, -inf] -> p = [1/2, 1/2, 0] -> H = ln 2; 0 * log 0 must not become NaN,
    # neither in the value nor in the gradient.
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = token_entropy(logits)
    assert_close(h, torch.tensor([[math.log(2.0)]]))
    (g,) = torch.autograd.grad(h.sum(), logits)
    # dH/dz_j = -p_j (ln p_j + H): for j = 0, 1: -(1/2)(ln 1/2 + ln 2) = 0; for j = 2: p = 0 -> 0
    assert torch.isfinite(g).all()
    assert_close(g, torch.zeros_like(g))
    lp = token_logprobs(logits, torch.tensor([[1]]))
    (g,) = torch.autograd.grad(lp.sum(), logits)
    assert_close(g, torch.tensor([[[-0.5, 0.5, 0.0]]]))  # onehot(1) - p


def _plain_stats(logits, tokens=None, temperature=None):
    z = logits.double()
    if temperature is not None:
        z = z / temperature
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    lp = None if tokens is None else logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return lp, ent


@pytest.mark.parametrize("temperature", [None, 0.7])
def test_logits_functions_chunk_invariant_and_match_plain_autograd(temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 17, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    up_h, up_lp = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    ref_lp, ref_h = _plain_stats(logits, tokens, temperature)
    (ref_g_h,) = torch.autograd.grad((ref_h * up_h).sum(), logits, retain_graph=True)
    (ref_g_lp,) = torch.autograd.grad((ref_lp * up_lp).sum(), logits)
    for cs in (1, 3, 4, 1000):
        h = token_entropy(logits, chunk_size=cs, temperature=temperature)
        lp = token_logprobs(logits, tokens, chunk_size=cs, temperature=temperature)
        assert_close(h.double(), ref_h, atol=1e-5, rtol=1e-5)
        assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
        (g_h,) = torch.autograd.grad((h * up_h).sum(), logits)
        (g_lp,) = torch.autograd.grad((lp * up_lp).sum(), logits)
        assert_close(g_h.double(), ref_g_h.to(torch.float64), atol=1e-5, rtol=1e-5)
        assert_close(g_lp.double(), ref_g_lp.to(torch.float64), atol=1e-5, rtol=1e-5)


def test_logits_functions_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=2, temperature=1.3), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, chunk_size=4), (logits,))


def test_logits_functions_bf16_input_fp32_output():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g).bfloat16().requires_grad_()
    h = token_entropy(logits, chunk_size=3)
    assert h.dtype == torch.float32
    # softmax of the bf16 values evaluated in fp32: equal to the fp32 computation on the same values
    _, ref = _plain_stats(logits.detach().float())
    assert_close(h.double(), ref, atol=1e-6, rtol=1e-6)
    (g_logits,) = torch.autograd.grad(h.sum(), logits)
    assert g_logits.dtype == torch.bfloat16


def test_logits_functions_validate_arguments():
    logits = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(logits, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        token_logprobs(logits, torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="token ids"):
        token_logprobs(logits, torch.tensor([[-100, 1]]))


# ---------------------------------------------------------------------------------------------
# logprobs_and_entropy: against the plain full-logits computation
# ---------------------------------------------------------------------------------------------


def _full_path(hidden, weight, tokens, temperature=None, bias=None):
    """The straightforward path: materialise (B, T, V) logits, fp64 log-softmax."""
    z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return _plain_stats(z, tokens, temperature)


@pytest.mark.parametrize(
    "shape, chunk, temperature, with_bias, seed",
    [
        ((2, 5, 8, 13), 3, None, False, 0),
        ((1, 7, 4, 50), 1, 0.6, False, 1),
        ((3, 4, 16, 31), 5, 1.7, True, 2),
        ((4, 9, 6, 7), 1000, None, True, 3),
        ((2, 6, 12, 97), 4, 1.0, False, 4),
    ],
)
def test_logprobs_and_entropy_matches_full_logits(shape, chunk, temperature, with_bias, seed):
    b, t, d, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, requires_grad=True)
    weight = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_() if with_bias else None
    tokens = torch.randint(0, v, (b, t), generator=g)
    up_lp, up_h = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    ref_lp, ref_h = _full_path(hidden, weight, tokens, temperature, bias)
    ref_grads = torch.autograd.grad((ref_lp * up_lp).sum() + (ref_h * up_h).sum(), inputs)

    lp, h = logprobs_and_entropy(
        hidden, weight, tokens, chunk_size=chunk, temperature=temperature, lm_head_bias=bias
    )
    assert lp.shape == h.shape == (b, t) and lp.dtype == h.dtype == torch.float32
    assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    assert_close(h.double(), ref_h, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((lp * up_lp).sum() + (h * up_h).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_logprobs_and_entropy_each_output_alone():
    # An unused output arrives in backward as None and its terms are skipped: each output's
    # gradient alone must still be right.
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    ref_lp, ref_h = _full_path(hidden, weight, tokens, 0.8)
    lp, h = logprobs_and_entropy(hidden, weight, tokens, chunk_size=2, temperature=0.8)
    for out, ref in ((lp, ref_lp), (h, ref_h)):
        got = torch.autograd.grad(out.sum(), [hidden, weight], retain_graph=True)
        want = torch.autograd.grad(ref.sum(), [hidden, weight], retain_graph=True)
        for a, w in zip(got, want):
            assert_close(a.double(), w.double(), atol=1e-5, rtol=1e-5)


def test_logprobs_and_entropy_frozen_head_gives_no_weight_grad():
    # LoRA / frozen head: W.requires_grad = False -> no grad_W is computed or stored.
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    weight = torch.randn(9, 5, generator=g)
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    lp, h = logprobs_and_entropy(hidden, weight, tokens, chunk_size=3, temperature=1.4)
    (lp.sum() + h.sum()).backward()
    assert weight.grad is None
    ref_lp, ref_h = _full_path(hidden, weight, tokens, 1.4)
    (want,) = torch.autograd.grad(ref_lp.sum() + ref_h.sum(), hidden)
    assert_close(hidden.grad.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_logprobs_and_entropy_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 3), generator=g)

    def fn(h, w, b):
        return logprobs_and_entropy(h, w, tokens, chunk_size=4, temperature=0.9, lm_head_bias=b)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_logprobs_and_entropy_chunk_invariant_and_noncontiguous_hidden():
    g = torch.Generator().manual_seed(8)
    full_hidden = torch.randn(3, 8, 10, generator=g)
    hidden = full_hidden[:, :-1]  # the usual "drop the last position" slice: not contiguous as (B*T, D)
    weight = torch.randn(23, 10, generator=g)
    tokens = torch.randint(0, 23, (3, 7), generator=g)
    results = [logprobs_and_entropy(hidden, weight, tokens, chunk_size=cs) for cs in (1, 3, 1000)]
    with torch.no_grad():  # the old / reference log-prob pass
        lp0, h0 = logprobs_and_entropy(hidden, weight, tokens, chunk_size=3)
    assert lp0.grad_fn is None and torch.equal(lp0, results[1][0]) and torch.equal(h0, results[1][1])
    for lp, h in results[1:]:
        assert_close(lp, results[0][0], atol=1e-6, rtol=1e-6)
        assert_close(h, results[0][1], atol=1e-6, rtol=1e-6)
    # and the values agree with the logits-based functions on the materialised logits
    logits = F.linear(hidden, weight)
    assert_close(results[0][0], token_logprobs(logits, tokens), atol=1e-6, rtol=1e-6)
    assert_close(results[0][1], token_entropy(logits), atol=1e-6, rtol=1e-6)


def test_logprobs_and_entropy_bf16_follows_lm_head_dtype():
    # bf16 model: the matmul runs in bf16 (like lm_head(hidden)), softmax in fp32; grads in bf16.
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 5, 16, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(40, 16, generator=g) * 0.3).bfloat16().requires_grad_()
    tokens = torch.randint(0, 40, (2, 5), generator=g)
    lp, h = logprobs_and_entropy(hidden, weight, tokens, chunk_size=3)
    assert lp.dtype == h.dtype == torch.float32
    logits = F.linear(hidden, weight)  # bf16 logits, as the model would produce them
    assert_close(lp, token_logprobs(logits, tokens), atol=1e-2, rtol=1e-2)
    assert_close(h, token_entropy(logits), atol=1e-2, rtol=1e-2)
    gh, gw = torch.autograd.grad(lp.sum() + h.sum(), [hidden, weight])
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref_loss = token_logprobs(logits, tokens).sum() + token_entropy(logits).sum()
    rh, rw = torch.autograd.grad(ref_loss, [hidden, weight])
    assert_close(gh.float(), rh.float(), atol=5e-2, rtol=5e-2)
    assert_close(gw.float(), rw.float(), atol=5e-2, rtol=5e-2)


def test_logprobs_and_entropy_under_autocast():
    # fp32 parameters under bf16 autocast: matmul in bf16, softmax in fp32, fp32 grads.
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_()
    tokens = torch.randint(0, 40, (2, 5), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, h = logprobs_and_entropy(hidden, weight, tokens, chunk_size=4)
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16 and lp.dtype == torch.float32
    assert_close(lp, token_logprobs(logits, tokens), atol=1e-4, rtol=1e-4)
    assert_close(h, token_entropy(logits), atol=1e-4, rtol=1e-4)
    gh, gw = torch.autograd.grad(lp.sum() + h.sum(), [hidden, weight])
    assert gh.dtype == gw.dtype == torch.float32
    ref_lp, ref_h = _full_path(hidden, weight, tokens)
    rh, rw = torch.autograd.grad(ref_lp.sum() + ref_h.sum(), [hidden, weight])
    assert_close(gh.double(), rh.double(), atol=5e-2, rtol=5e-2)
    assert_close(gw.double(), rw.double(), atol=5e-2, rtol=5e-2)


def test_logprobs_and_entropy_bias_masking_vocab_with_minus_inf():
    # A bias of -inf removes vocabulary entries: p = 0 there, and 0 * log 0 must stay 0 (no NaN).
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, requires_grad=True)
    bias = torch.tensor([0.0, float("-inf"), 0.5, float("-inf"), 0.0, 0.0], requires_grad=True)
    tokens = torch.tensor([[0, 2, 4], [5, 0, 2]])
    lp, h = logprobs_and_entropy(hidden, weight, tokens, chunk_size=2, lm_head_bias=bias)
    logits = F.linear(hidden, weight, bias)
    ref_lp, ref_h = token_logprobs(logits, tokens), token_entropy(logits)
    assert_close(lp, ref_lp)
    assert_close(h, ref_h)
    # same as the 4-word vocabulary without the masked entries
    keep = torch.tensor([0, 2, 4, 5])
    _, small_h = _full_path(hidden, weight[keep], None, bias=bias[keep])
    assert_close(h.double(), small_h, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(lp.sum() + h.sum(), [hidden, weight])
    want = torch.autograd.grad(ref_lp.sum() + ref_h.sum(), [hidden, weight])
    for a, w in zip(grads, want):
        assert torch.isfinite(a).all()
        assert_close(a, w, atol=1e-5, rtol=1e-5)


def test_logprobs_and_entropy_validates_arguments():
    hidden, weight = torch.zeros(1, 2, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="lm_head_weight"):
        logprobs_and_entropy(hidden, torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens shape"):
        logprobs_and_entropy(hidden, weight, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        logprobs_and_entropy(hidden, weight, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="lm_head_bias"):
        logprobs_and_entropy(hidden, weight, torch.zeros(1, 2, dtype=torch.long), lm_head_bias=torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# Memory: peak of forward + backward stays flat in T (measured with the torch profiler)
# ---------------------------------------------------------------------------------------------


def _peak_bytes(fn) -> int:
    """Peak bytes allocated by torch's CPU allocator while ``fn`` runs, above the level at entry.

    ``profile_memory=True`` records every allocation and free as a "[memory]" event with its signed
    size; their running sum in time order is the allocated total, its maximum the peak. (tracemalloc
    does not see torch's allocations and RSS is blurred by malloc caching, so neither is used.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def test_logprobs_and_entropy_peak_memory_flat_in_sequence_length():
    torch.manual_seed(11)
    v, d, chunk = 8192, 64, 256
    weight = (torch.randn(v, d) * 0.1).requires_grad_()

    def plain_stats(hidden, tokens):
        logp = torch.log_softmax(F.linear(hidden, weight), -1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def run(t, kind):
        hidden = torch.randn(1, t, d, requires_grad=True)
        tokens = torch.randint(0, v, (1, t))

        def step():
            if kind == "ours":
                lp, h = logprobs_and_entropy(hidden, weight, tokens, chunk_size=chunk)
            elif kind == "autograd_chunks":  # chunked forward, but autograd keeps every chunk
                spans = [slice(s, s + chunk) for s in range(0, t, chunk)]
                parts = [plain_stats(hidden[:, sl], tokens[:, sl]) for sl in spans]
                lp, h = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
            else:
                lp, h = plain_stats(hidden, tokens)
            torch.autograd.grad(lp.sum() + h.sum(), [hidden, weight])

        return _peak_bytes(step)

    mb = 2**20
    logits_bytes = 2048 * v * 4  # one fp32 (T, V) logits tensor at T = 2048: 64 MB
    full_long = run(2048, "full")
    short, long = run(256, "ours"), run(2048, "ours")
    control_short, control_long = run(256, "autograd_chunks"), run(2048, "autograd_chunks")
    # The measurement is meaningful: it sees the full path materialise several (T, V) tensors, and
    # it sees a chunked forward whose backward keeps all chunks grow with T (measured: 40 -> 152 MB).
    assert full_long >= 2 * logits_bytes, full_long / mb
    assert control_long - control_short > logits_bytes, (control_short / mb, control_long / mb)
    # Flat in T: 8x more rows add only O(T * D) hidden/grad terms (0.5 MB), far below one (T, V).
    # (measured: 18.1 MB at T = 256, 18.5 MB at T = 2048)
    assert long - short < 0.1 * logits_bytes, (short / mb, long / mb)
    # Bounded by a few chunk x V fp32 buffers (8 MB each) plus W and grad_W (2 MB each).
    assert long < 6 * chunk * v * 4 + 4 * v * d * 4, long / mb
    assert long * 4 < full_long, (long / mb, full_long / mb)


def test_selection_names_still_importable_from_tokens():
    from spine_ttrl import selection, tokens

    for name in ("top_entropy_mask", "entropy_threshold", "otsu_mask"):
        assert getattr(tokens, name) is getattr(selection, name)
        assert name in tokens.__all__


def test_default_chunk_size_splits_rows_without_changing_results():
    # 2 * DEFAULT_CHUNK_SIZE + 5 rows: the default runs two full chunks and a partial one; the result
    # (values and gradients) must match a single chunk holding every row.
    g = torch.Generator().manual_seed(5)
    n, v, d = 2 * DEFAULT_CHUNK_SIZE + 5, 7, 3
    logits = (torch.randn(1, n, v, generator=g) * 2).requires_grad_()
    tokens = torch.randint(0, v, (1, n), generator=g)
    hidden = torch.randn(1, n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    results = []
    for chunk in ({}, {"chunk_size": n}):
        h = token_entropy(logits, **chunk)
        lp = token_logprobs(logits, tokens, **chunk)
        lp2, h2 = logprobs_and_entropy(hidden, weight, tokens, **chunk)
        grads = torch.autograd.grad((h + lp + lp2 + h2).sum(), (logits, hidden, weight))
        results.append((h, lp, lp2, h2, *grads))
    for default, single in zip(*results):
        assert_close(default, single)
