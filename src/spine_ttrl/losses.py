"""GRPO advantages, the clipped surrogate, SPINE's entropy band and the KL penalty, and the
neighbours' variants: ETTRL's entropy-reshaped advantages, STEER's token weights, SIREN's
anchored entropy penalty and Skywork-OR1's adaptive entropy coefficient.

Every function here is pure: tensors in, tensors out, no trainer, no config object.
"How to compute per token" lives here; "what to average over" is the ``normalizer``
argument, computed once per optimiser step by the caller and passed in, so that a batch
split into micro-batches gives exactly the loss and gradient of the whole batch
(OpenRLHF's ``aggregate_loss`` convention).

Shapes, used throughout:

=================  ============  =============================================
name               shape         meaning
=================  ============  =============================================
``rewards``        (B,)          one scalar reward per completion
``advantages``     (B,)          one advantage per completion (same on every token)
``logprobs``       (B, T)        log π_θ(y_t | x, y_<t) of the sampled tokens
``old_logprobs``   (B, T)        the same under the behaviour policy (no grad)
``ref_logprobs``   (B, T)        the same under the frozen initial model (no grad)
``entropies``      (B, T)        token entropy of the current policy (with grad)
``token_mask``     (B, T) bool   True on real completion tokens (not padding)
``fork_mask``      (B, T) bool   True on selected (forking) tokens, ⊆ token_mask
``low``, ``high``  (B,)          per-response band edges (detached; NaN = no band)
=================  ============  =============================================
"""

from __future__ import annotations

import torch

__all__ = [
    "group_advantages",
    "band_edges",
    "pooled_band_edges",
    "band_penalty",
    "contested_rows",
    "policy_loss",
    "kl_penalty",
    "quantile_linear",
    "entropy_reshaped_advantages",
    "steer_token_weights",
    "anchored_entropy_penalty",
    "adaptive_entropy_coef",
    "batch_advantages",
    "entropy_bonus",
    "response_mean_entropy",
    "BANDS",
    "ADVANTAGE_NORMS",
    "ADVANTAGE_SHAPINGS",
    "TOKEN_WEIGHTS",
    "ENTROPY_REGULARIZERS",
]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages, normalised within each consecutive group of ``group_size`` rows.

    A_i = (r_i − mean_g(r)) / (std_g(r) + eps), std the *population* standard deviation
    (divide by G, not G − 1), as in GRPO / TTRL. Rows ``g·G .. g·G + G − 1`` form group g.
    All-equal rewards in a group give A = 0 exactly; a group of one response gives A = 0.

    Args:
        rewards: (B,) float, B a multiple of ``group_size``.
        group_size: G ≥ 1.
        eps: added to the standard deviation.

    Returns:
        (B,) float32 advantages.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"B={rewards.numel()} is not a multiple of group_size={group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def batch_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Advantages normalised over the whole optimiser batch instead of each question's group.

    A_i = (r_i − mean_B(r)) / (std_B(r) + eps), mean and population std over all B rows.
    A reward term that is constant within a question (TTRV's α·Σ p log p) cancels under
    :func:`group_advantages` but not here: questions whose vote is more peaked get higher
    advantages on all their responses. Example: rewards (1, 0 | 3, 3), G = 2: mean 1.75,
    std 1.299 → A = (−0.577, −1.347, 0.962, 0.962), where per-group normalisation gives
    (1, −1, 0, 0). ``group_size`` is only checked (B a multiple of it), so the two share one
    signature (:data:`ADVANTAGE_NORMS`).

    Shapes: rewards (B,) → (B,) float32.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"B={rewards.numel()} is not a multiple of group_size={group_size}")
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def quantile_linear(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile of the masked values, by linear interpolation (numpy's default).

    For the n sorted valid values v_0 ≤ … ≤ v_{n−1} of a row, position h = q·(n − 1),
    Q_q = v_⌊h⌋ + (h − ⌊h⌋)·(v_⌊h⌋+1 − v_⌊h⌋). The median of {2, 3} is 2.5. A row with no
    valid value gives NaN. Shapes: values (B, T), mask (B, T) bool → (B,).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    values = values.detach().to(torch.float64)
    mask = mask.bool()
    n = mask.sum(dim=1)  # (B,)
    # Invalid entries sort to the end (+inf) so the first n entries of a row are its values.
    filled = torch.where(mask, values, torch.full_like(values, float("inf")))
    sorted_vals, _ = torch.sort(filled, dim=1)
    pos = q * (n.to(torch.float64) - 1).clamp(min=0)  # (B,)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    frac = pos - lo.to(torch.float64)
    v_lo = sorted_vals.gather(1, lo.unsqueeze(1)).squeeze(1)
    v_hi = sorted_vals.gather(1, hi.unsqueeze(1)).squeeze(1)
    # v_lo + frac·(v_hi − v_lo) is NaN-free when frac = 0 and v_hi = v_lo.
    out = v_lo + frac * (v_hi - v_lo)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def band_edges(
    entropies: torch.Tensor,
    fork_mask: torch.Tensor,
    kind: str = "quantile",
    low_q: float = 0.1,
    high_q: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response entropy band [low_i, high_i] over the response's forking tokens S_i.

    - ``kind="quantile"`` (SPINE v1): low_i = Q_low_q(H_S_i), high_i = Q_high_q(H_S_i),
      defaults [Q_0.10, Q_0.50]; quantiles by linear interpolation.
    - ``kind="mad"`` (SPINE v2, robust): c = median(H_S_i), s = max(1.4826 · median(|H_S_i − c|), 1e-6),
      band = [max(c − s, 0), c]. Example: S = {2, 3} → c = 2.5, MAD = 0.5,
      low = 2.5 − 0.7413 = 1.7587, high = 2.5.

    The edges are detached (computed from the behaviour policy's entropies, no gradient).
    A response with no forking token gets NaN edges: it contributes no band penalty and
    is left out of band metrics.

    Shapes: entropies (B, T), fork_mask (B, T) bool → (low (B,), high (B,)) float32.
    """
    entropies = entropies.detach()
    fork_mask = fork_mask.bool()
    if kind == "quantile":
        if low_q > high_q:
            raise ValueError(f"low_q={low_q} must be <= high_q={high_q}")
        low = quantile_linear(entropies, fork_mask, low_q)
        high = quantile_linear(entropies, fork_mask, high_q)
    elif kind == "mad":
        c = quantile_linear(entropies, fork_mask, 0.5)
        dev = (entropies.to(torch.float64) - c.unsqueeze(1)).abs()
        mad = quantile_linear(dev, fork_mask, 0.5)
        s = (1.4826 * mad).clamp(min=1e-6)
        low = (c - s).clamp(min=0.0)
        high = c
    else:
        raise ValueError(f"unknown band kind {kind!r}: expected 'quantile' or 'mad'")
    return low.to(torch.float32), high.to(torch.float32)


def pooled_band_edges(
    entropies: torch.Tensor,
    fork_mask: torch.Tensor,
    kind: str = "quantile",
    low_q: float = 0.1,
    high_q: float = 0.5,
) -> tuple[float, float]:
    """One band [low, high] over the forking tokens of the *whole* batch (for an anchored band).

    The same statistics as :func:`band_edges`, but over the pooled set S = ∪_i S_i instead of
    each response's own S_i: ``quantile`` → [Q_low_q(H_S), Q_high_q(H_S)]; ``mad`` →
    [max(c − s, 0), c] with c = median(H_S), s = max(1.4826 · median(|H_S − c|), 1e-6).
    Example: forks {1, 2} in one row and {3, 4, 5} in another, quantile 0.1/0.5 → pooled
    values 1..5 → low = 1 + 0.4·(2 − 1) = 1.4, high = 3.

    Computed once at the first update and then held fixed, the edges stop moving with the
    policy (the per-response v1 band always has half of a response's forks above its median).
    No forking token → (nan, nan). Shapes: entropies (B, T), fork_mask (B, T) → two floats.
    """
    low, high = band_edges(entropies.reshape(1, -1), fork_mask.reshape(1, -1), kind, low_q, high_q)
    return float(low[0]), float(high[0])


def band_penalty(
    entropies: torch.Tensor,
    fork_mask: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    beta_low: float,
    beta_up: float,
    normalizer: float | torch.Tensor,
) -> torch.Tensor:
    """SPINE's entropy-band regulariser (minimised).

    R_band = Σ_{i,t} m_{i,t} · [β_low · (low_i − H_{i,t})₊ + β_up · (H_{i,t} − high_i)₊] / normalizer

    with m = ``fork_mask``. Gradient flows through ``entropies`` (the current policy's);
    ``low``/``high`` are treated as constants. Minimising it pushes a forking token's entropy
    *up* when it lies below the band (keep exploring) and *down* when above (suppress noise).
    Rows whose edges are NaN (no forking token) contribute 0.

    Shapes: entropies (B, T), fork_mask (B, T) bool, low/high (B,) → scalar.
    ``normalizer``: the paper's convention is the total number of completion tokens of the
    optimiser batch, Σ_i |y_i|.
    """
    low = low.detach().to(entropies.dtype).unsqueeze(1)
    high = high.detach().to(entropies.dtype).unsqueeze(1)
    # relu, not clamp: on an edge the gradient is 0 (clamp would pass it through at x == 0).
    below = torch.relu(low - entropies)
    above = torch.relu(entropies - high)
    per_token = beta_low * below + beta_up * above
    valid = fork_mask.bool() & ~torch.isnan(low) & ~torch.isnan(high)
    # torch.where, not multiplication: a NaN edge times a 0 mask would still be NaN.
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return per_token.sum() / normalizer


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    clip_eps: float,
    normalizer: float | torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate, summed over masked tokens and divided by ``normalizer``.

    L = −Σ_{i,t} m_{i,t} · w_{i,t} · min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1 − ε, 1 + ε) A_i) / normalizer,
    ρ_{i,t} = exp(logprobs − old_logprobs), w = ``weights`` (B, T) constants (STEER's token
    weights, :data:`TOKEN_WEIGHTS`), or 1 when None.

    With m = all completion tokens this is TTRL's loss; with m = the forking mask it is
    SPINE's policy term. With one update per sampled batch ρ ≡ 1 and the clip is inactive.

    Shapes: logprobs, old_logprobs (B, T); advantages (B,) or (B, T); token_mask (B, T) bool.

    Returns:
        (loss scalar, stats) with detached stats over the masked tokens:
        ``clip_fraction`` — share of tokens where the clipped branch is the one taken
        (ρA > clip(ρ)A, i.e. the gradient is cut); ``approx_kl`` — mean of the k3 estimate
        (ρ − 1) − log ρ of KL(π_old ‖ π_θ).
    """
    mask = token_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach().to(per_token.dtype)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    loss = per_token.sum() / normalizer
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clip_fraction = ((clipped < unclipped) & mask).sum() / n
        approx_kl = torch.where(mask, (ratio - 1) - log_ratio, torch.zeros_like(ratio)).sum() / n
    return loss, {"clip_fraction": clip_fraction.detach(), "approx_kl": approx_kl.detach()}


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    normalizer: float | torch.Tensor,
) -> torch.Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) on the sampled tokens (Schulman's "low-variance KL").

    KL ≈ Σ_{i,t} m_{i,t} · (exp(ref − logp) − (ref − logp) − 1) / normalizer,
    ref = ``ref_logprobs``, logp = ``logprobs``. Each term is ≥ 0 and 0 where the two agree.
    SPINE masks it to forking tokens and normalises by the number of masked tokens; TTRL
    uses all completion tokens.

    Shapes: logprobs, ref_logprobs (B, T); token_mask (B, T) bool → scalar.
    """
    diff = ref_logprobs.detach() - logprobs
    per_token = torch.exp(diff) - diff - 1
    per_token = torch.where(token_mask.bool(), per_token, torch.zeros_like(per_token))
    return per_token.sum() / normalizer


# ---------------------------------------------------------------------------------------------
# Neighbours (paper §6): each a switch in the same loop
# ---------------------------------------------------------------------------------------------


def entropy_reshaped_advantages(
    advantages: torch.Tensor, response_entropy: torch.Tensor, group_size: int
) -> torch.Tensor:
    """ETTRL's entropy-based advantage reshaping (EAR), within each group of ``group_size`` rows.

        Y_i = 1 + (mean_g(H) − H_i) / mean_g(H),      A'_i = Y_i · A_i

    H_i = ``response_entropy``: response i's mean token entropy over its completion tokens.
    A response less uncertain than its group's average (H_i < mean) is up-weighted (Y > 1), a
    more uncertain one down-weighted; Y is not clipped, so H_i > 2·mean gives Y < 0 (the
    formula as published). A group whose mean entropy is 0 is returned unchanged (Y = 1).
    Example: H = (1, 3), mean 2 → Y = (1.5, 0.5). Both inputs are treated as constants (no
    gradient; advantages never carry one).

    Shapes: advantages (B,), response_entropy (B,), B a multiple of ``group_size`` → (B,),
    in ``advantages``' dtype (float32 for an integer tensor).
    """
    advantages = torch.as_tensor(advantages).detach()
    if not advantages.is_floating_point():
        advantages = advantages.to(torch.float32)
    h = torch.as_tensor(response_entropy).detach().to(device=advantages.device, dtype=torch.float64)
    if advantages.dim() != 1 or h.shape != advantages.shape:
        raise ValueError(f"advantages and response_entropy must both be (B,), got "
                         f"{tuple(advantages.shape)} and {tuple(h.shape)}")
    if group_size < 1 or advantages.numel() % group_size:
        raise ValueError(f"B={advantages.numel()} is not a multiple of group_size={group_size}")
    grouped = h.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    safe = torch.where(mean == 0, torch.ones_like(mean), mean)
    y = torch.where(mean == 0, torch.ones_like(grouped), 1 + (mean - grouped) / safe)
    return (y.reshape(-1) * advantages.to(torch.float64)).to(advantages.dtype)


def steer_token_weights(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    w_min: float = 0.8,
    w_max: float = 1.2,
) -> torch.Tensor:
    """STEER's per-token loss weights from a first-order estimate of each token's entropy change.

        x = clamp(exp(logp), 1e−8, 1 − 1e−8)        probability of the sampled token
        Ω = −(A / exp(old_logp)) · x (1 − x) (log x + H)
        w = w_max − (|Ω| − min|Ω|) / (max|Ω| − min|Ω|) · (w_max − w_min)

    min/max over the masked tokens of the whole batch (linear symmetric mode): the token whose
    update moves the entropy least gets ``w_max``, the one moving it most ``w_min``. All |Ω|
    equal (or no masked token) → 1.0 on the masked tokens; unmasked tokens get 0. The weights
    multiply the per-token policy loss. Example, A = 1, old_logp = logp, H = 0: x = 0.5 gives
    |Ω| = (1/0.5)·0.25·ln 2 = 0.3466, x = 0.9 gives (1/0.9)·0.09·ln(1/0.9) = 0.0105 → weights
    0.8 and 1.2.

    Shapes: logp, old_logp, entropy, mask (B, T); advantages (B,) (or (B, T)) → (B, T) in
    ``logp``'s dtype, computed without gradient (float64 inside).
    """
    with torch.no_grad():
        mask = mask.bool()
        adv = advantages.detach().to(torch.float64)
        if adv.dim() == 1:
            adv = adv.unsqueeze(1)
        x = torch.exp(logp.detach().to(torch.float64)).clamp(1e-8, 1 - 1e-8)
        h = entropy.detach().to(torch.float64)
        omega = -(adv / torch.exp(old_logp.detach().to(torch.float64))) * x * (1 - x) * (torch.log(x) + h)
        size = omega.abs()
        weights = torch.zeros_like(size)
        if mask.any():
            lo, hi = size[mask].min(), size[mask].max()
            if hi > lo:
                scaled = w_max - (size - lo) / (hi - lo) * (w_max - w_min)
            else:
                scaled = torch.ones_like(size)
            weights = torch.where(mask, scaled, weights)
        return weights.to(logp.dtype)


def anchored_entropy_penalty(
    entropy: torch.Tensor, target: float | torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """SIREN's self-anchor: a masked MSE pulling token entropies toward a fixed target.

        P = Σ_{i,t} m_{i,t} (H_{i,t} − target_{i,t})² / max(Σ m, 1)

    ``target`` is a scalar or a tensor broadcastable to (B, T) (in SIREN, the entropy of the
    same positions at the start of adaptation); it is a constant (detached). Gradient flows
    through ``entropy``: dP/dH = 2 m (H − target) / max(Σ m, 1). No masked token → 0.
    Example: H = (1, 3), target 2, both masked → (1 + 1)/2 = 1.

    Shapes: entropy (B, T), mask (B, T) bool, target scalar or (B, T) → 0-d tensor.
    """
    mask = mask.bool()
    if isinstance(target, torch.Tensor):
        target = target.detach().to(entropy.dtype)
    diff = entropy - target
    # torch.where before squaring, not a multiplication after: a NaN/inf entropy on padding
    # would otherwise give NaN in the value (NaN·0) or in the gradient (2·NaN·0).
    diff = torch.where(mask, diff, torch.zeros_like(diff))
    return (diff**2).sum() / mask.sum().clamp(min=1).to(diff.dtype)


def adaptive_entropy_coef(
    coef: float, entropy: float | torch.Tensor, target: float, delta: float, max_coef: float
) -> float:
    """Skywork-OR1's adaptive entropy-bonus coefficient, updated once per step.

        coef' = clamp(coef + δ, 0, max_coef)   if entropy ≤ target   (too little exploration)
        coef' = clamp(coef − δ, 0, max_coef)   otherwise

    ``entropy`` is the step's mean token entropy (a float or a 0-d tensor). The loss then adds
    −coef' · mean entropy (an entropy bonus). Example: coef 0.01, δ 0.005, target 0.2:
    entropy 0.1 → 0.015; entropy 0.3 → 0.005; from 0.002 with entropy 0.3 → 0.0 (clamped).
    Returns a Python float.
    """
    value = float(entropy.detach()) if isinstance(entropy, torch.Tensor) else float(entropy)
    coef = coef + delta if value <= target else coef - delta
    return float(min(max(coef, 0.0), max_coef))


def _no_band(entropies, fork_mask, low_q, high_q):
    return None


def _quantile_band(entropies, fork_mask, low_q, high_q):
    return band_edges(entropies, fork_mask, "quantile", low_q, high_q)


def _mad_band(entropies, fork_mask, low_q, high_q):
    return band_edges(entropies, fork_mask, "mad", low_q, high_q)


def entropy_bonus(entropies: torch.Tensor, mask: torch.Tensor, coef: float, normalizer: float | torch.Tensor) -> torch.Tensor:
    """An entropy bonus (minimised, so it raises entropy): −coef · Σ_{i,t} m_{i,t} H_{i,t} / normalizer.

    Skywork-OR1's adaptive entropy control adds it with the coefficient of
    :func:`adaptive_entropy_coef`; the normaliser is the optimiser batch's completion tokens, as
    for the policy term, so micro-batches add up to the batch's bonus. Gradient through
    ``entropies``. Example: H = (1, 3), both masked, coef 0.1, normalizer 2 → −0.2.

    Shapes: entropies (B, T), mask (B, T) bool → scalar.
    """
    masked = torch.where(mask.bool(), entropies, torch.zeros_like(entropies))
    return -coef * masked.sum() / normalizer


def response_mean_entropy(entropies: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Each response's mean token entropy over its completion tokens (0 for an empty response).

    H_i = Σ_t m_{i,t} H_{i,t} / max(Σ_t m_{i,t}, 1) — the H_i of ETTRL's EAR. Example: rows
    (1, 3) and (2, pad) → (2, 2). Shapes: entropies, token_mask (B, T) → (B,), no gradient.
    """
    mask = token_mask.bool()
    h = torch.where(mask, entropies.detach().float(), torch.zeros((), device=mask.device))
    return h.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


#: Advantage normalisation (the ``--advantage-norm`` setting) →
#: ``fn(rewards (B,), group_size) -> advantages (B,)``. A new one is one entry here and one choice
#: in ``SpineConfig.advantage_norm``.
ADVANTAGE_NORMS = {"group": group_advantages, "batch": batch_advantages}


def _no_shaping(advantages, response_entropy, group_size):
    return advantages


#: Advantage shaping (``--advantage-shaping``) → ``fn(advantages (B,), response_entropy (B,),
#: group_size) -> advantages (B,)``, applied after normalisation; ``ear`` is ETTRL's
#: :func:`entropy_reshaped_advantages`.
ADVANTAGE_SHAPINGS = {"none": _no_shaping, "ear": entropy_reshaped_advantages}


def _no_weights(logp, old_logp, entropy, advantages, mask):
    return None


#: Per-token policy-loss weights (``--token-weights``) →
#: ``fn(logp, old_logp, entropy, advantages, mask) -> (B, T) weights or None`` (None = all 1);
#: ``steer`` is :func:`steer_token_weights` ([0.8, 1.2]).
TOKEN_WEIGHTS = {"none": _no_weights, "steer": steer_token_weights}

#: Entropy regularisers (``--entropy-reg``) → their loss term: ``anchored`` (SIREN) is
#: :func:`anchored_entropy_penalty` on the nucleus entropy of the high-entropy positions,
#: ``adaptive`` (Skywork-OR1) :func:`entropy_bonus` with :func:`adaptive_entropy_coef`'s
#: coefficient. The loop's state (the anchor, the coefficient) lives in
#: :mod:`spine_ttrl.update`.
ENTROPY_REGULARIZERS = {"none": None, "anchored": anchored_entropy_penalty, "adaptive": entropy_bonus}


def contested_rows(advantages: torch.Tensor) -> torch.Tensor:
    """The responses that carry a reward signal: keep_i = (A_i ≠ 0).

    Under a 0/1 reward with group normalisation, a question's advantages are all 0 exactly when
    its rewards are all equal (every vote agrees, or none parses) and all non-zero otherwise, so
    this keeps whole questions whose rollouts disagree. Shapes: advantages (B,) → (B,) bool.
    Example: [0.5, −0.5, 0, 0] → [True, True, False, False].
    """
    return advantages != 0


def _all_rows(advantages: torch.Tensor) -> torch.Tensor:
    return torch.ones(advantages.shape, dtype=torch.bool, device=advantages.device)


#: ``band_rows`` setting → which responses the band acts on, ``(advantages (B,)) -> (B,) bool``:
#: ``all`` (the paper: the band acts on every response, also when all advantages are 0) or
#: ``contested`` (:func:`contested_rows`). A new rule is one entry here and one choice in
#: ``SpineConfig.band_rows``.
BAND_ROWS = {"all": _all_rows, "contested": contested_rows}


#: Band name (the ``--band`` setting) → edge function
#: ``(entropies (B, T), fork_mask (B, T), low_q, high_q) -> (low (B,), high (B,))``, or None for
#: no band. ``quantile`` and ``mad`` are :func:`band_edges` of that kind (``mad`` ignores the
#: quantiles). A new band is one entry here and one choice in ``SpineConfig.band``.
BANDS = {"none": _no_band, "quantile": _quantile_band, "mad": _mad_band}
