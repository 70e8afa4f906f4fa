"""Tests for spine_ttrl.selection: hand-computed masks, the name -> rule table, and reference-vs-vectorised
equivalence (slow pure-Python loops) for top-rho and Otsu selection."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from spine_ttrl.selection import (
    SELECTIONS,
    entropy_threshold,
    otsu_mask,
    select_tokens,
    top_entropy_mask,
)


# ---------------------------------------------------------------------------------------------
# top_entropy_mask / entropy_threshold
# ---------------------------------------------------------------------------------------------


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_top_entropy_mask_hand_case_batch():
    # valid: 0.5 0.9 0.1 | 0.9 0.2 (last of row 2 is padding) -> n = 5, k = ceil(0.5 * 5) = 3.
    # Ranking: 0.9 (flat 1), 0.9 (flat 3; tie -> lower index first), 0.5 (flat 0).
    ent = _t([[0.5, 0.9, 0.1], [0.9, 0.2, 0.0]])
    mask = _m([[1, 1, 1], [1, 1, 0]])
    got = top_entropy_mask(ent, mask, 0.5)
    assert torch.equal(got, _m([[1, 1, 0], [1, 0, 0]]))


def test_top_entropy_mask_ties_prefer_lower_index():
    # three equal values, k = ceil(0.5 * 3) = 2 -> the first two positions in row-major order
    ent = _t([[0.7, 0.7], [0.7, 0.1]])
    mask = _m([[1, 1], [1, 0]])
    assert torch.equal(top_entropy_mask(ent, mask, 0.5), _m([[1, 1], [0, 0]]))
    # all-equal entropies, 6 valid, rho = 1/3 -> k = 2 -> flat indices 0 and 1
    ent = torch.full((2, 3), 2.0)
    all_valid = torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(top_entropy_mask(ent, all_valid, 1 / 3), _m([[1, 1, 0], [0, 0, 0]]))


def test_top_entropy_mask_rho_edges_and_empty():
    ent = _t([[0.5, float("nan"), 0.1], [float("inf"), 0.2, 0.0]])
    mask = _m([[1, 0, 1], [0, 1, 1]])
    assert not top_entropy_mask(ent, mask, 0.0).any()
    # rho = 1 is exactly token_mask, even with NaN / +inf on the padding
    assert torch.equal(top_entropy_mask(ent, mask, 1.0), mask)
    # no valid token at all -> nothing
    assert not top_entropy_mask(ent, torch.zeros(2, 3, dtype=torch.bool), 0.5).any()
    # an empty batch is fine
    assert top_entropy_mask(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), 0.5).shape == (0, 4)


def test_top_entropy_mask_padding_with_huge_or_nan_entropy_never_selected():
    # padding carries +inf, 1e30 and NaN; valid values 1, 2, 3, 4 (n = 4), rho = 0.5 -> k = 2 -> {4, 3}
    ent = _t([[float("inf"), 1.0, 1e30, 2.0], [3.0, float("nan"), 4.0, float("inf")]])
    mask = _m([[0, 1, 0, 1], [1, 0, 1, 0]])
    for scope in ("batch", "response"):
        got = top_entropy_mask(ent, mask, 0.5, scope=scope)
        assert not (got & ~mask).any()
    assert torch.equal(top_entropy_mask(ent, mask, 0.5), _m([[0, 0, 0, 0], [1, 0, 1, 0]]))


def test_top_entropy_mask_valid_nan_ranks_last():
    # valid values [nan, 1, 2]: NaN ranks below 1; k = ceil(2/3 * 3) = 2 -> {2, 1}; rho = 1 -> all three
    ent = _t([[float("nan"), 1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(top_entropy_mask(ent, mask, 2 / 3), _m([[0, 1, 1]]))
    assert torch.equal(top_entropy_mask(ent, mask, 1.0), mask)


@pytest.mark.parametrize(
    "rho, n, k",
    [
        (0.2, 5, 1),  # 0.2 * 5 = 1.0
        (0.3, 10, 3),  # 0.3 * 10 = 3.0
        (0.14, 50, 7),  # 0.14 * 50 = 7.000000000000001 in float64: a plain ceil would give 8
        (0.28, 25, 7),  # 7.000000000000001 again
        (0.21, 10, 3),  # 2.1 -> 3: the 1e-9 does not eat real fractions
        (0.2, 1, 1),  # 0.2 -> 1: any positive rho selects at least one token of a non-empty pool
    ],
)
def test_top_entropy_mask_k_is_ceil_without_float_noise(rho, n, k):
    assert 0.14 * 50 > 7  # the float noise the 1e-9 is there for
    ent = torch.arange(n, dtype=torch.float32).unsqueeze(0)
    got = top_entropy_mask(ent, torch.ones(1, n, dtype=torch.bool), rho)
    assert int(got.sum()) == k
    assert torch.equal(got[0, n - k :], torch.ones(k, dtype=torch.bool))  # the k largest


def test_top_entropy_mask_group_and_response_scopes():
    ent = _t([[0.9, 0.8], [0.1, 0.2], [0.5, 0.4], [0.3, 0.6]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    # group_size 2 -> pools rows {0, 1} and {2, 3}; n = 4 each, rho 0.5 -> k = 2 per pool
    # pool 1: 0.9, 0.8 (both in row 0); pool 2: 0.6, 0.5
    got = top_entropy_mask(ent, mask, 0.5, scope="group", group_size=2)
    assert torch.equal(got, _m([[1, 1], [0, 0], [1, 0], [0, 1]]))
    # response: k = ceil(0.5 * 2) = 1 per row -> each row's max
    got = top_entropy_mask(ent, mask, 0.5, scope="response")
    assert torch.equal(got, _m([[1, 0], [0, 1], [1, 0], [0, 1]]))
    # batch: n = 8, k = 4 -> 0.9, 0.8, 0.6, 0.5
    assert torch.equal(top_entropy_mask(ent, mask, 0.5), _m([[1, 1], [0, 0], [1, 0], [0, 1]]))
    # group_size = B is the batch; group_size = 1 is per response
    for size, same_as in ((4, "batch"), (1, "response")):
        want = top_entropy_mask(ent, mask, 0.3, same_as)
        assert torch.equal(top_entropy_mask(ent, mask, 0.3, "group", size), want)


def test_top_entropy_mask_validates_arguments():
    ent, mask = torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of group_size"):
        top_entropy_mask(ent, mask, 0.5, scope="group", group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        top_entropy_mask(ent, mask, 0.5, scope="group")
    with pytest.raises(ValueError, match="scope"):
        top_entropy_mask(ent, mask, 0.5, scope="question")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            top_entropy_mask(ent, mask, bad)
    with pytest.raises(ValueError, match="shape"):
        top_entropy_mask(ent, torch.ones(2, 3, dtype=torch.bool), 0.5)


def _top_entropy_reference(ent, mask, rho, scope, group_size):
    """Slow reference: per pool, sort (-h, flat index) tuples, take the first k valid ones."""
    b, t = len(ent), len(ent[0])
    rows_per_pool = {"batch": b, "group": group_size, "response": 1}[scope]
    out = [[False] * t for _ in range(b)]
    for start in range(0, b, rows_per_pool):
        items = []
        for r in range(start, start + rows_per_pool):
            for c in range(t):
                if mask[r][c]:
                    h = ent[r][c]
                    h = -math.inf if math.isnan(h) else h
                    items.append((-h, (r - start) * t + c, r, c))
        k = math.ceil(float(rho) * len(items) - 1e-9)
        for _, _, r, c in sorted(items)[:k]:
            out[r][c] = True
    return out


def _coarse_entropy(rng):
    """Mostly a few repeated values (to force ties), sometimes uniform, NaN or +inf."""
    value = rng.choice([0.0, 0.5, 1.0, 1.5, None, float("nan"), float("inf")])
    return rng.random() if value is None else value


def test_top_entropy_mask_matches_reference_loop():
    rng = random.Random(0)
    for trial in range(300):
        g = rng.choice([1, 2, 3])
        b = g * rng.randint(1, 4)
        t = rng.randint(1, 9)
        # coarse values force many ties; a few NaN / inf on valid and padding positions
        ent = [[_coarse_entropy(rng) for _ in range(t)] for _ in range(b)]
        mask = [[rng.random() < 0.75 for _ in range(t)] for _ in range(b)]
        rho = rng.choice([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.8, 1.0, rng.random()])
        scope = rng.choice(["batch", "group", "response"])
        want = _top_entropy_reference(ent, mask, rho, scope, g)
        got = top_entropy_mask(torch.tensor(ent), torch.tensor(mask), rho, scope=scope, group_size=g)
        assert got.tolist() == want, (trial, ent, mask, rho, scope, g)


def test_entropy_threshold_hand_cases():
    vals = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.2])
    # k = ceil(0.5 * 5) = 3 -> sorted desc 0.9, 0.9, 0.5 -> threshold 0.5
    assert entropy_threshold(vals, 0.5) == pytest.approx(0.5)
    # k = ceil(0.2 * 5) = 1 -> 0.9; with the tie, >= 0.9 selects two tokens (more than k)
    thr = entropy_threshold(vals, 0.2)
    assert thr == pytest.approx(0.9) and int((vals >= thr).sum()) == 2
    assert entropy_threshold(vals, 0.0) == math.inf  # k = 0 -> selects nothing
    assert entropy_threshold(torch.zeros(0), 0.5) == math.inf
    assert entropy_threshold(vals, 1.0) == pytest.approx(0.1)
    assert entropy_threshold(torch.tensor([float("nan"), 1.0, 2.0]), 2 / 3) == 1.0


def test_entropy_threshold_consistent_with_top_entropy_mask():
    gen = torch.Generator().manual_seed(12)
    for trial in range(50):
        b, t = 1 + trial % 4, 1 + trial % 7
        ent = torch.rand(b, t, generator=gen)  # distinct with probability 1
        mask = torch.rand(b, t, generator=gen) < 0.7
        rho = float(torch.rand((), generator=gen))
        thr = entropy_threshold(ent[mask], rho)
        assert torch.equal((ent >= thr) & mask, top_entropy_mask(ent, mask, rho)), trial
    # pooled across two "micro-batches": one threshold from the gathered values equals the
    # whole-batch mask
    ent, mask = torch.rand(6, 5, generator=gen), torch.rand(6, 5, generator=gen) < 0.8
    thr = entropy_threshold(torch.cat([ent[:3][mask[:3]], ent[3:][mask[3:]]]), 0.2)
    parts = [(ent[s] >= thr) & mask[s] for s in (slice(0, 3), slice(3, 6))]
    assert torch.equal(torch.cat(parts), top_entropy_mask(ent, mask, 0.2))


# ---------------------------------------------------------------------------------------------
# otsu_mask
# ---------------------------------------------------------------------------------------------


def test_otsu_worked_examples():
    # [0, 0, 2, 3], 100 bins over [0, 3], width 0.03: bins 0, 0, 66, 99 (centres 0.015, 1.995, 2.985).
    # k in 0..65: w0 = w1 = 1/2, mu0 = 0.015, mu1 = 2.49 -> 0.25 * 2.475^2 = 1.531
    # k in 66..98: w0 = 3/4, mu0 = 0.675, mu1 = 2.985 -> 0.1875 * 2.31^2 = 1.000  => k* = 0
    # cut = 0 + 1 * 3 / 100 = 0.03 -> select 2, 3. With 0.02 instead of the second 0: same bins.
    ent = _t([[0.0, 0.0, 2.0, 3.0], [0.0, 0.02, 2.0, 3.0]])
    got = otsu_mask(ent, torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(got, _m([[0, 0, 1, 1], [0, 0, 1, 1]]))


def test_otsu_split_not_at_first_bin_and_strict_edge():
    # [0, 1, 9, 10], bins = 10 over [0, 10] (width 1): bins 0, 1, 9, 9; centres 0.5, 1.5, 9.5, 9.5.
    # k = 0: w0 = 1/4, mu0 = 0.5, mu1 = 20.5/3 = 6.833 -> 0.1875 * 6.333^2 = 7.52
    # k = 1..8: w0 = 1/2, mu0 = 1, mu1 = 9.5 -> 0.25 * 8.5^2 = 18.06  => k* = 1, cut = 2 -> {9, 10}
    got = otsu_mask(_t([[0, 1, 9, 10]]), torch.ones(1, 4, dtype=torch.bool), bins=10)
    assert torch.equal(got, _m([[0, 0, 1, 1]]))
    # [0, 1, 2, 3, 4], bins = 4 (width 1): bins 0, 1, 2, 3, 3; counts [1, 1, 1, 2], centres .5 1.5 2.5 3.5
    # k = 0: .2 * .8 * (0.5 - 2.75)^2 = 0.81; k = 1: .4 * .6 * (1 - 3.1667)^2 = 1.127;
    # k = 2: .6 * .4 * (1.5 - 3.5)^2 = 0.96  => k* = 1, cut = 0 + 2 * 4 / 4 = 2.
    # 2.0 sits in bin 2 (high class) but is not > 2: the strict cut leaves it out.
    got = otsu_mask(_t([[0, 1, 2, 3, 4]]), torch.ones(1, 5, dtype=torch.bool), bins=4)
    assert torch.equal(got, _m([[0, 0, 0, 1, 1]]))


def test_otsu_degenerate_rows_select_all_valid():
    ent = _t([[5.0, 1.0, 7.0], [2.0, 2.0, 2.0], [0.3, 9.0, 9.0], [1.0, 2.0, 3.0]])
    mask = _m([[0, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # row 0: one valid token -> it; row 1: all equal -> all; row 2: one valid; row 3: none
    assert torch.equal(otsu_mask(ent, mask), mask)


def test_otsu_padding_ignored_and_never_selected():
    # the padding values (100, NaN, -5) must not stretch [min, max] nor be selected
    ent = _t([[0.0, 100.0, 0.0, 2.0, float("nan"), 3.0, -5.0]])
    mask = _m([[1, 0, 1, 1, 0, 1, 0]])
    assert torch.equal(otsu_mask(ent, mask), _m([[0, 0, 0, 1, 0, 1, 0]]))
    # rows are independent: the same row next to a very different one gives the same answer
    other = _t([[50.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    both = otsu_mask(torch.cat([ent, other]), torch.cat([mask, torch.ones(1, 7, dtype=torch.bool)]))
    assert torch.equal(both[0], _m([[0, 0, 0, 1, 0, 1, 0]])[0])


def test_otsu_validates_arguments():
    with pytest.raises(ValueError, match="bins"):
        otsu_mask(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), bins=1)
    with pytest.raises(ValueError, match="shape"):
        otsu_mask(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool))


def _otsu_reference_row(values, mask, bins):
    """Slow reference for one row: numpy.histogram, then a plain loop over splits k."""
    vals = [v for v, m in zip(values, mask) if m and math.isfinite(v)]
    keep = [bool(m) and math.isfinite(v) for v, m in zip(values, mask)]
    if len(vals) <= 1 or max(vals) == min(vals):
        return keep
    lo, hi = min(vals), max(vals)
    counts, edges = np.histogram(np.array(vals, dtype=np.float64), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    n = len(vals)
    best_k, best = 0, -1.0
    for k in range(bins - 1):
        c0 = sum(int(c) for c in counts[: k + 1])
        c1 = n - c0
        if c0 == 0 or c1 == 0:
            between = 0.0
        else:
            mu0 = sum(float(counts[i]) * float(centres[i]) for i in range(k + 1)) / c0
            mu1 = sum(float(counts[i]) * float(centres[i]) for i in range(k + 1, bins)) / c1
            between = (c0 / n) * (c1 / n) * (mu0 - mu1) ** 2
        if between > best:  # strict: the first k keeps a tie
            best_k, best = k, between
    cut = lo + (best_k + 1) * (hi - lo) / bins
    return [kp and v > cut for v, kp in zip(values, keep)]


def test_otsu_matches_reference_loop():
    rng = np.random.default_rng(0)
    for trial in range(120):
        b, t = int(rng.integers(1, 5)), int(rng.integers(1, 40))
        bins = int(rng.choice([2, 3, 10, 100]))
        kind = trial % 3
        if kind == 0:  # continuous entropies
            ent = rng.gamma(1.5, 1.0, size=(b, t))
        elif kind == 1:  # coarse values: ties and values on bin edges
            ent = rng.integers(0, 6, size=(b, t)) * 0.5
        else:  # bimodal, like fork / non-fork tokens
            ent = np.where(rng.random((b, t)) < 0.2, rng.normal(3, 0.5, (b, t)), rng.exponential(0.1, (b, t)))
        ent = ent.astype(np.float32)
        mask = rng.random((b, t)) < 0.8
        want = [_otsu_reference_row([float(x) for x in ent[r]], mask[r], bins) for r in range(b)]
        got = otsu_mask(torch.from_numpy(ent), torch.from_numpy(mask), bins=bins)
        assert got.tolist() == want, (trial, ent.tolist(), mask.tolist(), bins)


# ---------------------------------------------------------------------------------------------
# SELECTIONS / select_tokens: the name -> rule table
# ---------------------------------------------------------------------------------------------

# Row 0: four valid tokens. Row 1: three valid tokens; the last position is padding with a large
# entropy (9.0) that no rule may select.
TABLE_ENT = [[0.1, 2.0, 0.3, 1.5], [0.0, 0.0, 3.0, 9.0]]
TABLE_MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_selections_table_holds_the_three_rules():
    assert list(SELECTIONS) == ["all", "top", "otsu"]


def test_selection_all_is_a_copy_of_token_mask():
    ent, mask = _t(TABLE_ENT), _m(TABLE_MASK)
    got = SELECTIONS["all"](ent, mask, rho=0.0, scope="response", group_size=1)
    assert torch.equal(got, _m([[1, 1, 1, 1], [1, 1, 1, 0]]))
    got[0, 0] = False  # a copy: the caller may edit it without touching token_mask
    assert bool(mask[0, 0])


def test_selection_top_by_hand():
    ent, mask = _t(TABLE_ENT), _m(TABLE_MASK)
    # batch: n = 7 valid, k = ceil(0.5 * 7) = 4 -> 3.0 (1,2), 2.0 (0,1), 1.5 (0,3), 0.3 (0,2)
    got = SELECTIONS["top"](ent, mask, rho=0.5, scope="batch", group_size=1)
    assert torch.equal(got, _m([[0, 1, 1, 1], [0, 0, 1, 0]]))
    # response: row 0 n = 4, k = 2 -> 2.0, 1.5; row 1 n = 3, k = ceil(1.5) = 2 -> 3.0, then the
    # tied 0.0s -> the lower index (1,0)
    want_rows = _m([[0, 1, 0, 1], [1, 0, 1, 0]])
    assert torch.equal(SELECTIONS["top"](ent, mask, rho=0.5, scope="response", group_size=1), want_rows)
    # group_size is passed through: groups of one response are the responses
    assert torch.equal(SELECTIONS["top"](ent, mask, rho=0.5, scope="group", group_size=1), want_rows)


def test_selection_otsu_by_hand_ignores_rho_and_scope():
    ent, mask = _t(TABLE_ENT), _m(TABLE_MASK)
    # Row 0, valid [0.1, 2.0, 0.3, 1.5]: 100 bins over [0.1, 2.0], width 0.019 -> bins 0, 99, 10, 73,
    # centres 0.1095, 1.9905, 0.2995, 1.4965.
    #   k = 0..9:   w0 = 1/4, mu0 = 0.1095, mu1 = 1.2622 -> 0.1875 * 1.1527^2 = 0.249
    #   k = 10..72: w0 = 1/2, mu0 = 0.2045, mu1 = 1.7435 -> 0.25 * 1.5390^2 = 0.592   (maximum)
    #   k = 73..98: w0 = 3/4, mu0 = 0.6352, mu1 = 1.9905 -> 0.1875 * 1.3553^2 = 0.344
    #   k* = 10, cut = 0.1 + 11 * 0.019 = 0.309 -> select 2.0 and 1.5 (0.3 is just below the cut)
    # Row 1, valid [0, 0, 3] (the 9.0 is padding): bins 0, 0, 99; every split gives the same
    #   sigma_b, k* = 0, cut = 0.03 -> select 3.0 only.
    want = _m([[0, 1, 0, 1], [0, 0, 1, 0]])
    for rho, scope in ((0.0, "batch"), (1.0, "response"), (0.5, "group")):
        assert torch.equal(SELECTIONS["otsu"](ent, mask, rho=rho, scope=scope, group_size=2), want)


def test_select_tokens_looks_up_the_rule_and_its_defaults():
    ent, mask = _t(TABLE_ENT), _m(TABLE_MASK)
    # defaults rho = 0.2, scope = "batch": k = ceil(0.2 * 7) = 2 -> 3.0 and 2.0
    assert torch.equal(select_tokens("top", ent, mask), _m([[0, 1, 0, 0], [0, 0, 1, 0]]))
    assert torch.equal(select_tokens("all", ent, mask), mask)
    assert torch.equal(select_tokens("otsu", ent, mask, rho=0.9), _m([[0, 1, 0, 1], [0, 0, 1, 0]]))
    assert torch.equal(
        select_tokens("top", ent, mask, rho=0.5, scope="response"), _m([[0, 1, 0, 1], [1, 0, 1, 0]])
    )


def test_select_tokens_unknown_name_lists_the_choices():
    ent, mask = _t(TABLE_ENT), _m(TABLE_MASK)
    with pytest.raises(ValueError, match=r"unknown selection 'window'; choices: all, top, otsu"):
        select_tokens("window", ent, mask)
