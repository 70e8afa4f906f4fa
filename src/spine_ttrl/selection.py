"""Forking-token selection: which completion tokens get the policy gradient, from their entropies.

Pure functions over ``(B, T)`` tensors, no gradients:

* :func:`top_entropy_mask` -- SPINE v1 / "Beyond the 80/20 Rule": the top-rho share of valid tokens by
  entropy, over a batch, a question group or each response;
* :func:`entropy_threshold` -- the same cut as a number, for pools gathered across micro-batches or
  processes;
* :func:`otsu_mask` -- SPINE v2: a per-response Otsu split of the entropy histogram;
* :data:`SELECTIONS` / :func:`select_tokens` -- the rules ``all``, ``top`` and ``otsu`` behind one
  signature ``fn(entropies, token_mask, *, rho, scope, group_size) -> fork_mask``, looked up by the
  name of the ``selection`` setting.

Vocabulary: ``entropies`` (B, T) in nats, ``token_mask`` (B, T) bool (True = a real response token,
False = padding), ``fork_mask`` (B, T) bool (True = selected; always a subset of ``token_mask``).
The entropies come from :mod:`spine_ttrl.tokens`, which re-exports the three mask functions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "top_entropy_mask",
    "entropy_threshold",
    "otsu_mask",
    "SELECTIONS",
    "select_tokens",
]


# ---------------------------------------------------------------------------------------------
# Selection rules
# ---------------------------------------------------------------------------------------------


def _check_rho(rho: float) -> float:
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:  # also rejects NaN
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    return rho


def _num_selected(rho: float, n: int) -> int:
    """k = ceil(rho * n) without float noise: 0.14 * 50 = 7.000000000000001 must give 7, not 8."""
    return min(n, max(0, math.ceil(rho * n - 1e-9)))


def _check_selection_inputs(entropies: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    if entropies.dim() != 2:
        raise ValueError(f"entropies must be (B, T), got shape {tuple(entropies.shape)}")
    if tuple(token_mask.shape) != tuple(entropies.shape):
        raise ValueError(
            f"token_mask shape {tuple(token_mask.shape)} != entropies shape {tuple(entropies.shape)}"
        )
    return token_mask if token_mask.dtype == torch.bool else token_mask != 0


def top_entropy_mask(
    entropies: torch.Tensor,
    token_mask: torch.Tensor,
    rho: float,
    scope: str = "batch",
    group_size: int | None = None,
) -> torch.Tensor:
    """Forking tokens: the k highest-entropy valid tokens of each pool (SPINE v1, 80/20 rule).

        n    = number of valid tokens (token_mask True) in the pool
        k    = ceil(rho * n - 1e-9)              (float64; the 1e-9 absorbs 0.14 * 50 = 7.0000000001)
        mask = the k valid tokens of largest entropy; ties -> lower row-major index in the pool

    ===========  =======  ===============================================================
    argument     shape    notes
    ===========  =======  ===============================================================
    entropies    (B, T)   any float dtype; detached (selection takes no gradient)
    token_mask   (B, T)   bool (or 0/1); False = padding, never selected
    returns      (B, T)   bool, exactly k True per pool
    ===========  =======  ===============================================================

    ``scope`` sets the pool: ``"batch"`` (all B x T positions; the default, as in "Beyond the
    80/20 Rule"), ``"group"`` (each block of ``group_size`` consecutive responses -- the G samples
    of one question; B % group_size must be 0) or ``"response"`` (each row). rho = 0 selects
    nothing, rho = 1 returns exactly ``token_mask``. Padding is never selected whatever its entropy
    (+inf, NaN); a NaN entropy on a *valid* token ranks below every number (so it is selected only
    when k reaches it). Exactly k per pool, deterministic: a stable sort on descending entropy keeps
    the lower index first among equal values. Uses sort, not ``torch.quantile`` (2^24 size limit,
    interpolation between tied values). For a pool spread over micro-batches or processes, gather
    the valid entropies and use :func:`entropy_threshold`.
    """
    rho = _check_rho(rho)
    valid = _check_selection_inputs(entropies, token_mask)
    b, t = entropies.shape
    if scope == "batch":
        pools = 1
    elif scope == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"scope='group' needs a positive int group_size, got {group_size!r}")
        if b % group_size:
            raise ValueError(f"scope='group': batch size {b} is not a multiple of group_size {group_size}")
        pools = b // group_size
    elif scope == "response":
        pools = b
    else:
        raise ValueError(f"scope must be 'batch', 'group' or 'response', got {scope!r}")
    if b * t == 0:
        return torch.zeros_like(valid)

    # Row-major reshape: pool p holds responses [p*G, (p+1)*G) laid end to end, so a position's
    # index along dim 1 is its flat index within the pool -- the tie-break order.
    h = entropies.detach().reshape(pools, -1)
    v = valid.reshape(pools, -1)
    if not h.is_floating_point():
        h = h.float()
    # Padding and NaN -> -inf so they sort last; padding is then skipped by counting only valid
    # entries below (a valid -inf and a padding -inf may interleave, but only valid ones count).
    key = h.masked_fill(~v | torch.isnan(h), float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    v_sorted = v.gather(1, order)
    rank = v_sorted.cumsum(1)  # 1-based rank among valid tokens in sorted order
    n = v.sum(1)
    # Same float64 arithmetic as _num_selected (IEEE: identical to math.ceil(rho * n - 1e-9)).
    k = torch.ceil(n.to(torch.float64) * rho - 1e-9).clamp_(min=0).to(n.dtype)
    k = torch.minimum(k, n)
    chosen_sorted = v_sorted & (rank <= k.unsqueeze(1))
    mask = torch.zeros_like(v).scatter_(1, order, chosen_sorted)
    return mask.reshape(b, t)


def entropy_threshold(values: torch.Tensor, rho: float) -> float:
    """The entropy of the k-th largest value of a pool, k = ceil(rho * n - 1e-9).

    ========  =====  ==============================================================
    argument  shape  notes
    ========  =====  ==============================================================
    values    (n,)   valid entropies only (any shape is flattened), e.g. gathered
                     across micro-batches or processes
    returns   float  +inf when k == 0 (then ``entropies >= threshold`` selects nothing)
    ========  =====  ==============================================================

    Apply it as ``(entropies >= threshold) & token_mask``. With distinct values this selects the
    same k tokens as :func:`top_entropy_mask` (scope="batch"); with ties at the threshold it selects
    *every* tied token, i.e. possibly more than k, whereas :func:`top_entropy_mask` breaks ties by
    index and selects exactly k. NaN values rank below every number.
    """
    rho = _check_rho(rho)
    flat = values.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.float()
    k = _num_selected(rho, flat.numel())
    if k == 0:
        return math.inf
    flat = flat.masked_fill(torch.isnan(flat), float("-inf"))
    # k-th largest == (n - k + 1)-th smallest; kthvalue is a selection, not a full sort.
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def otsu_mask(entropies: torch.Tensor, token_mask: torch.Tensor, bins: int = 100) -> torch.Tensor:
    """SPINE v2 forking tokens: per response, the high class of an Otsu split of its entropies.

    For each row, over its valid tokens (token_mask True, finite entropy) with min m, max M:

        histogram into ``bins`` equal-width bins over [m, M] (exactly as numpy.histogram: bin i is
        [e_i, e_{i+1}), the last bin also holds M; e = linspace(m, M, bins + 1))
        c_i = count in bin i,  x_i = (e_i + e_{i+1}) / 2  (bin centre),  n = sum c_i
        for k = 0 .. bins-2 (low class = bins 0..k, high class = bins k+1..):
            w0 = sum_{i<=k} c_i / n,          w1 = 1 - w0
            mu0 = sum_{i<=k} c_i x_i / (n w0), mu1 = sum_{i>k} c_i x_i / (n w1)
            sigma_b(k) = w0 w1 (mu0 - mu1)^2  (0 if a class is empty)
        k* = the first (smallest) k maximising sigma_b
        select  H > m + (k* + 1) (M - m) / bins      (strictly above the upper edge of bin k*)

    A row with <= 1 valid token, or with all valid entropies equal, selects all its valid tokens.
    Because of the strict ">", a value lying exactly on that edge is not selected even though the
    histogram puts it in bin k*+1 (e.g. [0, 1, 2, 3, 4] with bins=4 -> k* = 1, edge 2 -> only 3, 4).

    ===========  ========  ==================================================
    argument     shape     notes
    ===========  ========  ==================================================
    entropies    (B, T)    any float dtype (binned in float64); detached
    token_mask   (B, T)    bool (or 0/1); padding never selected
    returns      (B, T)    bool
    ===========  ========  ==================================================

    Non-finite entropies on valid positions are ignored (excluded from the statistics, never
    selected). Examples: [0, 0, 2, 3] -> [F, F, T, T]; [0, 0.02, 2, 3] -> [F, F, T, T] (0.02 shares
    bin 0 with 0; the cut is the bin's upper edge 0.03, not its centre 0.015).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    valid = _check_selection_inputs(entropies, token_mask)
    if entropies.numel() == 0:
        return torch.zeros_like(valid)
    f64 = torch.float64
    h = entropies.detach().to(f64)
    valid = valid & torch.isfinite(h)
    n = valid.sum(1)
    lo = h.masked_fill(~valid, math.inf).amin(1)
    hi = h.masked_fill(~valid, -math.inf).amax(1)
    degenerate = (n <= 1) | (lo == hi)
    # Placeholder range [0, 1] for degenerate rows keeps the arithmetic below NaN-free; their
    # result is overwritten at the end.
    lo = torch.where(degenerate, torch.zeros_like(lo), lo)
    hi = torch.where(degenerate, torch.ones_like(hi), hi)
    span = hi - lo
    x = torch.where(valid, h, lo.unsqueeze(1))  # padding parked at the row minimum, weight 0 below

    # Bin edges and indices computed as numpy.histogram does (linspace edges, then a +-1 fix-up for
    # values within an ulp of an edge), so a numpy-based reference agrees bin for bin.
    edges = torch.arange(bins + 1, dtype=f64, device=h.device) * (span / bins).unsqueeze(1) + lo.unsqueeze(1)
    edges[:, -1] = hi
    idx = (((x - lo.unsqueeze(1)) / span.unsqueeze(1)) * bins).long()  # trunc == floor, x >= lo
    idx = idx.clamp_(max=bins - 1)  # only x == hi reaches `bins`: numpy puts it in the last bin
    idx -= (x < edges.gather(1, idx)).long()
    idx += ((x >= edges.gather(1, idx + 1)) & (idx != bins - 1)).long()

    counts = torch.zeros(h.shape[0], bins, dtype=f64, device=h.device)
    counts.scatter_add_(1, idx, valid.to(f64))
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    mass = counts * centres
    # Class sums for every split k = 0..bins-2 at once: prefix sums for the low class, suffix sums
    # for the high class (suffix rather than total - prefix: no cancellation).
    c0 = counts.cumsum(1)[:, :-1]
    c1 = counts.flip(1).cumsum(1).flip(1)[:, 1:]
    s0 = mass.cumsum(1)[:, :-1]
    s1 = mass.flip(1).cumsum(1).flip(1)[:, 1:]
    nf = n.to(f64).clamp(min=1).unsqueeze(1)
    both = (c0 > 0) & (c1 > 0)
    mu0 = s0 / c0.clamp(min=1)
    mu1 = s1 / c1.clamp(min=1)
    between = torch.where(both, (c0 / nf) * (c1 / nf) * (mu0 - mu1) ** 2, torch.zeros_like(mu0))
    k = between.argmax(1)  # first maximum on ties (documented torch.argmax behaviour)
    cut = lo + (k + 1).to(f64) * span / bins
    mask = valid & (h > cut.unsqueeze(1))
    return torch.where(degenerate.unsqueeze(1), valid, mask)


# ---------------------------------------------------------------------------------------------
# One signature, looked up by name
# ---------------------------------------------------------------------------------------------

Selection = Callable[..., torch.Tensor]
"""``fn(entropies, token_mask, *, rho, scope, group_size) -> fork_mask``, all tensors (B, T)."""


def _select_all(
    entropies: torch.Tensor, token_mask: torch.Tensor, *, rho: float, scope: str, group_size: int
) -> torch.Tensor:
    """Every valid token (TTRL: no selection): fork_mask = token_mask (a copy). Ignores the rest."""
    return token_mask.clone()


def _select_top(
    entropies: torch.Tensor, token_mask: torch.Tensor, *, rho: float, scope: str, group_size: int
) -> torch.Tensor:
    """SPINE v1: :func:`top_entropy_mask` with k = ceil(rho * n) per ``scope`` pool."""
    return top_entropy_mask(entropies, token_mask, rho, scope=scope, group_size=group_size)


def _select_otsu(
    entropies: torch.Tensor, token_mask: torch.Tensor, *, rho: float, scope: str, group_size: int
) -> torch.Tensor:
    """SPINE v2: :func:`otsu_mask` per response (100 bins); ``rho``, ``scope``, ``group_size`` unused."""
    return otsu_mask(entropies, token_mask)


SELECTIONS: dict[str, Selection] = {
    "all": _select_all,
    "top": _select_top,
    "otsu": _select_otsu,
}
"""Selection name (the ``selection`` setting) -> rule with one shared signature:

    fn(entropies, token_mask, *, rho, scope, group_size) -> fork_mask

=============  =======  ================================================================
argument       shape    notes
=============  =======  ================================================================
entropies      (B, T)   float, per-token entropy in nats (detached; no gradient flows)
token_mask     (B, T)   bool; False = padding, never selected
rho            float    share of valid tokens selected by ``top`` (k = ceil(rho * n))
scope          str      ``top``'s pool: ``"batch"``, ``"group"`` or ``"response"``
group_size     int      G, responses per question (``scope="group"``)
fork_mask      (B, T)   bool, a subset of token_mask
=============  =======  ================================================================

``all``: fork_mask = token_mask; ``top``: :func:`top_entropy_mask`; ``otsu``: :func:`otsu_mask`
(``rho`` and ``scope`` ignored). A new rule is one entry here with the same signature.
"""


def select_tokens(
    name: str,
    entropies: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    rho: float = 0.2,
    scope: str = "batch",
    group_size: int = 1,
) -> torch.Tensor:
    """The forking mask (B, T) of the selection rule ``name`` (a key of :data:`SELECTIONS`).

        fork_mask = SELECTIONS[name](entropies, token_mask, rho=rho, scope=scope, group_size=group_size)

    ``entropies`` and ``token_mask`` are (B, T); returns a (B, T) bool mask. Raises ValueError
    naming the choices for an unknown ``name``.
    """
    try:
        rule = SELECTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selection {name!r}; choices: {', '.join(SELECTIONS)}") from None
    return rule(entropies, token_mask, rho=rho, scope=scope, group_size=group_size)
