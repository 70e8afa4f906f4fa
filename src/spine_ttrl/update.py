"""One optimiser batch: select the forking tokens, compute SPINE's loss, step the optimiser.

The order (SPINE v1, eq. 1–4 of ``docs/algorithm.md``):

1. **Select** from the behaviour policy's entropies of the *whole* batch, before
   micro-batching: the forking mask (``SpineConfig.selection`` → :data:`spine_ttrl.selection.SELECTIONS`)
   and the band edges (``SpineConfig.band`` → :data:`spine_ttrl.losses.BANDS`; with
   ``band_anchor=first`` one pooled band fixed at the run's first update). The result travels
   as a :class:`Selection` record.
2. **Loss** per micro-batch, with gradient (:func:`microbatch_loss`): the clipped policy term on
   the selected tokens and the band term, both divided by the batch's number of completion
   tokens Σ|y_i|, plus ``kl_coef`` × the k3 KL to the frozen initial model divided by the
   number of tokens it is computed on. One global normaliser, so gradient accumulation over
   micro-batches gives the full-batch gradient.
3. **Step**: gradient clipping and AdamW; a non-finite loss or gradient skips the update, and so
   does a gradient of exactly zero with ``skip_empty_steps`` (else AdamW's momentum moves the
   weights on a batch that carries no signal).

The neighbours' switches act here too, once per batch from the behaviour policy before the first
micro-batch: the selection signal (``selection_signal`` → :data:`spine_ttrl.tokens.SELECTION_SIGNALS`),
the advantage shaping (``advantage_shaping`` → :data:`spine_ttrl.losses.ADVANTAGE_SHAPINGS`), the
token weights of the policy term (``token_weights`` → :data:`spine_ttrl.losses.TOKEN_WEIGHTS`) and
the entropy regulariser's mask or coefficient (``entropy_reg``); its state (SIREN's anchor,
Skywork-OR1's coefficient) is carried from batch to batch in ``UpdateResult.entropy_reg_state``.

Under AdamW a constant factor on the gradient does not change the step (the update divides by
the gradient's running RMS): the learning rate, not the share of selected tokens, sets how far
one update moves the weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from .engine.models import output_head
from .engine.precision import autocast_context
from .engine.scoring import micro_batches, pad_cols, score_batch, score_completions
from .losses import (ADVANTAGE_SHAPINGS, BAND_ROWS, BANDS, TOKEN_WEIGHTS, adaptive_entropy_coef, anchored_entropy_penalty,
                     band_penalty, entropy_bonus, kl_penalty, policy_loss, pooled_band_edges, quantile_linear,
                     response_mean_entropy)
from .selection import select_tokens, top_entropy_mask
from .tokens import SELECTION_SIGNALS, nucleus_entropy


@dataclass
class Selection:
    """The forking tokens of one optimiser batch and their band.

    ``fork_mask`` (B, T) bool; ``low``/``high`` (B,) band edges (None without a band; NaN for a
    response with no forking token); ``entropies`` (B, T) the behaviour entropies they came
    from; ``anchor`` the pooled (low, high) of an anchored band, else None.
    """

    fork_mask: torch.Tensor
    low: torch.Tensor | None
    high: torch.Tensor | None
    entropies: torch.Tensor
    anchor: tuple[float, float] | None = None
    signal: torch.Tensor | None = None  # (B, T) what was ranked, when not the entropies (window)

    def metrics(self, token_mask: torch.Tensor) -> dict[str, float]:
        """Entropy at forking vs other tokens, selected fraction, share of forks below/above band."""
        ent, fork = self.entropies, self.fork_mask
        other = token_mask & ~fork
        nan = float("nan")
        out = {"tokens/selected_fraction": fork.sum().item() / max(int(token_mask.sum()), 1),
               "entropy/forking_mean": ent[fork].mean().item() if fork.any() else nan,
               "entropy/other_mean": ent[other].mean().item() if other.any() else nan,
               "entropy/all_mean": ent[token_mask].mean().item() if token_mask.any() else nan}
        # the tokens SPINE's default selection would fork on (top 20 % of the batch), whatever this
        # method trains: a fork entropy that compares across methods (TTRL trains every token)
        top = top_entropy_mask(ent, token_mask, 0.2, "batch") if token_mask.any() else token_mask
        out["entropy/top20_mean"] = ent[top].mean().item() if top.any() else nan
        if self.low is not None:
            has_band = ~torch.isnan(self.low)
            f = fork & has_band.unsqueeze(1)
            n = max(int(f.sum()), 1)
            out["band/below_fraction"] = (f & (ent < self.low.unsqueeze(1))).sum().item() / n
            out["band/above_fraction"] = (f & (ent > self.high.unsqueeze(1))).sum().item() / n
            out["band/low_mean"] = self.low[has_band].mean().item() if has_band.any() else nan
            out["band/high_mean"] = self.high[has_band].mean().item() if has_band.any() else nan
        if self.anchor is not None:
            out["band/anchor_low"], out["band/anchor_high"] = self.anchor
        if self.signal is not None:
            out["selection/signal_forking_mean"] = self.signal[fork].mean().item() if fork.any() else nan
        return out


def select_forks(entropies, token_mask, sp, group_size: int, band_anchor=None, signal=None) -> Selection:
    """The :class:`Selection` for behaviour ``entropies`` (B, T) under SpineConfig ``sp``.

    ``signal`` (B, T), if given, is what the selection rule ranks instead of the entropies
    (ARES's window entropy); the band is always over the forking tokens' own entropies.

    With ``sp.band_anchor == "first"`` every response gets the same edges: ``band_anchor``
    (low, high) if given, else the band pooled over this batch's forking tokens
    (:func:`~spine_ttrl.losses.pooled_band_edges`), returned in ``Selection.anchor``.
    """
    fork = select_tokens(sp.selection, entropies if signal is None else signal, token_mask, rho=sp.rho, scope=sp.scope,
                         group_size=group_size)
    if sp.band == "none":
        return Selection(fork, None, None, entropies, signal=signal)
    if sp.band_anchor == "first":
        lo, hi = band_anchor if band_anchor is not None else pooled_band_edges(
            entropies, fork, sp.band, sp.band_low_q, sp.band_high_q)
        has = fork.any(dim=1)  # rows without a forking token keep NaN edges (no band, no metrics)
        nan = torch.full((fork.shape[0],), float("nan"), device=fork.device)
        lo_t, hi_t = torch.tensor(lo, device=fork.device), torch.tensor(hi, device=fork.device)
        return Selection(fork, torch.where(has, lo_t, nan), torch.where(has, hi_t, nan),
                         entropies, (lo, hi), signal)
    low, high = BANDS[sp.band](entropies, fork, sp.band_low_q, sp.band_high_q)
    return Selection(fork, low, high, entropies, signal=signal)


def _select(entropies, token_mask, sp, group_size: int, band_anchor) -> Selection:
    """:func:`select_forks` ranking ``SELECTION_SIGNALS[sp.selection_signal]`` of the entropies."""
    signal = None
    if sp.selection_signal != "token":
        signal = SELECTION_SIGNALS[sp.selection_signal](entropies, token_mask, sp.window_size)
    return select_forks(entropies, token_mask, sp, group_size, band_anchor, signal)


def microbatch_loss(logp, ent, rows, *, old_logp, advantages, sel: Selection, token_mask, ref_logp, sp, clip_eps,
                    n_tokens: int, weights=None):
    """SPINE's loss on micro-batch ``rows`` (its share of the batch loss; see the module docstring).

    ``logp``, ``ent`` (B_mb, T) with gradient; ``old_logp``, ``ref_logp`` (B, T) no grad;
    ``advantages`` (B,); ``weights`` (B, T) per-token weights of the policy term or None. Returns ``(loss, parts)``: ``parts`` holds the terms ``policy``, ``band``,
    ``kl`` (unweighted; the loss adds ``kl_coef`` × kl) and the policy stats ``clip_fraction``,
    ``approx_kl`` (detached).
    """
    fork_mb = sel.fork_mask[rows]
    loss_pl, stats = policy_loss(logp, old_logp[rows], advantages[rows], fork_mb, clip_eps, n_tokens,
                                 weights=None if weights is None else weights[rows])
    loss = loss_pl
    loss_band = torch.zeros((), device=logp.device)
    if sel.low is not None:
        loss_band = band_penalty(ent, fork_mb, sel.low[rows], sel.high[rows], sp.beta_low, sp.beta_up, n_tokens)
        loss = loss + loss_band
    loss_kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        kl_mask = sel.fork_mask if sp.kl_tokens == "selected" else token_mask
        loss_kl = kl_penalty(logp, ref_logp[rows], kl_mask[rows], max(int(kl_mask.sum()), 1))
        loss = loss + sp.kl_coef * loss_kl
    return loss, {"policy": loss_pl, "band": loss_band, "kl": loss_kl, **stats}


@dataclass
class UpdateResult:
    """What one optimiser batch returns: its :class:`Selection`, its metrics, and the entropy
    regulariser's state to pass to the next batch (``anchor`` or ``coef``; empty without one)."""

    selection: Selection
    metrics: dict[str, float]
    entropy_reg_state: dict = field(default_factory=dict)


def _behaviour(model, batch, sp, o, *, temperature, group_size, amp, behaviour_entropy, band_anchor):
    """Old log-probs, the Selection before the first update, and whether the first gradient pass
    fills the old log-probs; (None, None, False) when the first gradient pass itself provides both
    (one micro-batch, one update, no sampler entropies). Token weights (STEER) need the whole
    batch's old log-probs before the first micro-batch: then they are scored here."""
    token_mask = batch[4]
    score = lambda: score_batch(model, batch, o.micro_batch_size, temperature=temperature,  # noqa: E731
                                chunk_size=o.logit_chunk_size, amp=amp)
    if behaviour_entropy is not None:
        if behaviour_entropy.shape != token_mask.shape:
            raise ValueError(f"behaviour_entropy has shape {tuple(behaviour_entropy.shape)}, "
                             f"expected {tuple(token_mask.shape)}")
        ent = behaviour_entropy.float().masked_fill(~token_mask, 0.0)
        sel = _select(ent, token_mask, sp, group_size, band_anchor)
        if sp.token_weights != "none":
            return score()[0], sel, False
        # old log-probs: filled by the first update's gradient pass (sampling weights, ratio 1)
        return torch.zeros(token_mask.shape, device=token_mask.device), sel, True
    if len(micro_batches(token_mask.shape[0], o.micro_batch_size)) == 1 and o.updates_per_batch == 1:
        return None, None, False
    old_logp, ent = score()
    return old_logp, _select(ent, token_mask, sp, group_size, band_anchor), False


def update_on_batch(model, optimizer, batch, advantages, sp, o, *, temperature: float, group_size: int, amp=None,
                    ref_logp=None, behaviour_entropy=None, band_anchor=None, entropy_reg_state=None,
                    log=None, diagnostics: bool | None = None) -> UpdateResult:
    """Select forking tokens and run ``o.updates_per_batch`` optimiser updates on one batch.

    ``batch``: :func:`~spine_ttrl.engine.scoring.build_training_batch`'s tuple; ``advantages``
    (B,); ``sp`` the SpineConfig (selection, band, KL), ``o`` the OptimConfig. Behaviour
    entropies: the sampler's (``behaviour_entropy`` (B, T), no extra pass; the old log-probs are
    the detached log-probs of the first update's gradient pass, which runs with the sampling
    weights), else one no-grad scoring pass — skipped when one micro-batch and one update let
    the gradient pass provide them. ``ref_logp`` (B, T): the frozen model's log-probs (KL on).
    With ``diagnostics`` (default ``o.diagnostics``) the update-size and per-term gradient metrics
    are added; the loop passes it on every ``o.diagnostics_every``-th step only.
    ``entropy_reg_state``: the previous batch's ``UpdateResult.entropy_reg_state`` (None at first).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    diag = o.diagnostics if diagnostics is None else diagnostics
    t0 = time.perf_counter()
    old_logp, sel, fill_old = _behaviour(model, batch, sp, o, temperature=temperature, group_size=group_size, amp=amp,
                                         behaviour_entropy=behaviour_entropy, band_anchor=band_anchor)
    run = _GradientPass(model, batch, advantages, sp, o, temperature, group_size, amp, ref_logp, band_anchor,
                        old_logp, sel, fill_old=fill_old, reg_state=entropy_reg_state, diagnostics=diag)
    m: dict[str, float] = {"time/scoring_s": time.perf_counter() - t0}
    before = [p.detach().clone() for p in params] if diag else None
    grad_norm, t_fb, t_opt = float("nan"), 0.0, 0.0
    model.train()
    for epoch in range(o.updates_per_batch):
        t0 = time.perf_counter()
        bad = run.accumulate_gradients(epoch, params)
        t_fb += time.perf_counter() - t0
        t0 = time.perf_counter()
        grad_norm, status = _optimizer_step(optimizer, params, o.max_grad_norm, bad, o.skip_empty_steps)
        if status == "empty":
            m["optim/skipped_empty_updates"] = m.get("optim/skipped_empty_updates", 0.0) + 1
        elif status == "nonfinite":
            if log is not None:
                log.info("non-finite loss or gradient: update skipped")
            m["optim/skipped_updates"] = m.get("optim/skipped_updates", 0.0) + 1
            break
        t_opt += time.perf_counter() - t0
    model.eval()
    m.update({"time/forward_backward_s": t_fb, "tokens/model_positions": float(run.stats.get("positions", 0)),
              "update/skipped_rows_fraction": run.stats.get("skipped_rows", 0) / max(o.updates_per_batch, 1)
              / max(batch[4].shape[0], 1),
              "time/optimizer_s": t_opt, **run.agg, "optim/grad_norm": grad_norm,
              "optim/lr": optimizer.param_groups[0]["lr"]})
    if diag:
        m.update(run.term_grad_norms())
        m.update(_update_size(model, batch, run.old_logp, params, before, o, temperature, amp))
    m.update(run.sel.metrics(batch[4]))
    m.update(run.neighbour_metrics())
    return UpdateResult(run.sel, m, run.reg_state)


class _GradientPass:
    """The gradient passes of one optimiser batch: micro-batch by micro-batch, loss and backward.

    Holds what the passes share (the batch, the Selection, the behaviour log-probs once known,
    the neighbours' per-batch constants: shaped advantages, token weights, the entropy
    regulariser's mask or coefficient) and what they accumulate (loss terms of the last update
    for logging, per-term gradients with ``diagnostics``).
    """

    def __init__(self, model, batch, advantages, sp, o, temperature, group_size, amp, ref_logp, band_anchor,
                 old_logp, sel, *, fill_old: bool, reg_state: dict | None = None, diagnostics: bool = False):
        self.model, self.batch, self.advantages, self.sp, self.o = model, batch, advantages, sp, o
        self.temperature, self.group_size, self.amp, self.ref_logp = temperature, group_size, amp, ref_logp
        self.band_anchor, self.old_logp, self.sel, self.fill_old = band_anchor, old_logp, sel, fill_old
        self.token_mask, self.diagnostics = batch[4], diagnostics
        self.n_tokens = int(self.token_mask.sum())
        self.agg = dict.fromkeys(("loss/policy", "loss/band", "loss/kl", "policy/clip_fraction",
                                  "policy/approx_kl"), 0.0)
        if sp.entropy_reg != "none":
            self.agg["loss/entropy_reg"] = 0.0
        self.stats: dict[str, int] = {}
        self.term_grads: dict[str, list[torch.Tensor]] = {}
        self.reg_state, self.extra = dict(reg_state or {}), {}
        self.weights, self.prepared, self.nucleus = None, False, [0.0, 0]

    def _prepare(self) -> None:
        """Once the Selection is known, for the whole batch from the behaviour policy: shape the
        advantages (EAR), keep the band to the contested responses (``band_rows``), weigh the
        selected tokens (STEER), fix the entropy regulariser's mask
        (SIREN: positions above the batch's entropy quantile) or its coefficient (Skywork-OR1)."""
        sp, sel, mask, nan = self.sp, self.sel, self.token_mask, float("nan")
        self.prepared = True
        if sp.advantage_shaping != "none":
            shape, h = ADVANTAGE_SHAPINGS[sp.advantage_shaping], response_mean_entropy(sel.entropies, mask)
            factor = shape(torch.ones_like(self.advantages), h, self.group_size)  # A'/A of every response
            self.extra.update({"advantage/shaping_factor_min": factor.min().item(),
                               "advantage/shaping_factor_max": factor.max().item()})
            self.advantages = shape(self.advantages, h, self.group_size)
        self.weights = TOKEN_WEIGHTS[sp.token_weights](self.old_logp, self.old_logp, sel.entropies, self.advantages,
                                                        sel.fork_mask)
        if self.weights is not None:
            w = self.weights[sel.fork_mask]
            self.extra.update({"policy/token_weight_min": w.min().item() if w.numel() else nan,
                               "policy/token_weight_max": w.max().item() if w.numel() else nan})
        if sel.low is not None and sp.band_rows != "all":
            keep = BAND_ROWS[sp.band_rows](self.advantages)
            self.extra["band/rows_fraction"] = keep.float().mean().item()
            gate = lambda e: torch.where(keep, e, torch.full_like(e, nan))  # noqa: E731 (NaN edges: no band)
            self.sel = sel = dataclasses.replace(sel, low=gate(sel.low), high=gate(sel.high))
        if sp.entropy_reg == "anchored":
            cut = quantile_linear(sel.entropies.reshape(1, -1), mask.reshape(1, -1), sp.entropy_reg_quantile)[0]
            self.reg_mask = mask & (sel.entropies > cut)
            self.reg_count = int(self.reg_mask.sum())
        elif sp.entropy_reg == "adaptive":
            e = sel.entropies[mask].mean().item() if mask.any() else nan
            self.reg_state["coef"] = adaptive_entropy_coef(self.reg_state.get("coef", sp.entropy_reg_coef), e,
                                                           sp.entropy_target, sp.entropy_coef_delta, sp.entropy_coef_max)
            # Skywork-OR1 (and TRL's use_adaptive_entropy): the bonus acts only at or below the target
            self.reg_coef = self.reg_state["coef"] if e <= sp.entropy_target else 0.0

    def _entropy_reg(self, hidden: list, en, rows, epoch: int) -> torch.Tensor:
        """This micro-batch's share of the entropy regulariser (0-d, with gradient).

        adaptive: :func:`entropy_bonus` over all completion tokens / the batch's completion tokens.
        anchored: coef x Σ (H_nucleus − anchor)² over the micro-batch's masked positions / the
        batch's masked count (so micro-batches add up to the batch's mean); H_nucleus from the
        logits of those positions only. The first update measures the anchor (its mean over the
        masked positions) and adds no penalty: the policy then *is* the anchor policy.
        """
        sp = self.sp
        if sp.entropy_reg == "adaptive":
            return entropy_bonus(en, self.token_mask[rows], self.reg_coef, self.n_tokens)
        h = hidden[0]
        m = self.reg_mask[rows][:, :h.shape[1]]
        weight, bias = output_head(self.model)
        hn = nucleus_entropy(torch.nn.functional.linear(h[m], weight, bias), sp.entropy_reg_top_p, self.temperature,
                             chunk_size=self.o.logit_chunk_size).float()
        self.nucleus[0] += float(hn.detach().sum())
        self.nucleus[1] += hn.numel()
        anchor = self.reg_state.get("anchor")
        if anchor is None or not hn.numel():
            return torch.zeros((), device=en.device)
        per_row = anchored_entropy_penalty(hn.unsqueeze(0), anchor, torch.ones_like(hn, dtype=torch.bool).unsqueeze(0))
        return sp.entropy_reg_coef * per_row * (hn.numel() / max(self.reg_count, 1))

    def neighbour_metrics(self) -> dict[str, float]:
        """The neighbours' metrics of this batch (advantage shaping, token weights, entropy regulariser)."""
        out, sp = dict(self.extra), self.sp
        if sp.entropy_reg == "anchored":
            out["entropy_reg/masked_fraction"] = self.reg_count / max(self.n_tokens, 1)
            out["entropy_reg/nucleus_mean"] = self.nucleus[0] / self.nucleus[1] if self.nucleus[1] else float("nan")
            out["entropy_reg/anchor"] = self.reg_state.get("anchor", float("nan"))
        elif sp.entropy_reg == "adaptive":
            out["entropy_reg/coef"], out["entropy_reg/applied_coef"] = self.reg_state["coef"], self.reg_coef
        return out

    def accumulate_gradients(self, epoch: int, params) -> bool:
        """One update's gradient over all micro-batches into ``p.grad``; True if the loss was not finite."""
        B, T = self.token_mask.shape
        last = epoch == self.o.updates_per_batch - 1
        if self.diagnostics:
            self.term_grads = {}
        if self.sel is not None and not self.prepared:
            self._prepare()
        self.nucleus = [0.0, 0]
        inert = self._inert_rows()
        # One autocast context per update: weights are cast to the low precision once, not per
        # micro-batch (the cast cache is dropped on exit, before the optimiser changes them).
        with autocast_context(self.amp, self.model):
            for rows in micro_batches(B, self.o.micro_batch_size):
                if inert is not None and bool(inert[rows].all()):  # exactly zero gradient: no pass needed
                    self.stats["skipped_rows"] = self.stats.get("skipped_rows", 0) + len(rows)
                    continue
                hidden = [] if self.sp.entropy_reg == "anchored" else None
                lp, en, _ = score_completions(self.model, self.batch, rows, temperature=self.temperature,
                                              chunk_size=self.o.logit_chunk_size, stats=self.stats, hidden_out=hidden)
                lp, en = pad_cols(lp.float(), T), pad_cols(en.float(), T)
                if self.sel is None:  # single pass: this gradient pass is also the behaviour pass
                    self.old_logp = lp.detach()
                    self.sel = _select(en.detach(), self.token_mask, self.sp, self.group_size, self.band_anchor)
                    self._prepare()
                elif self.fill_old and epoch == 0:
                    self.old_logp[rows] = lp.detach()
                loss, parts = microbatch_loss(lp, en, rows, old_logp=self.old_logp, advantages=self.advantages,
                                              sel=self.sel, token_mask=self.token_mask, ref_logp=self.ref_logp,
                                              sp=self.sp, clip_eps=self.o.clip_eps, n_tokens=self.n_tokens,
                                              weights=self.weights)
                if self.sp.entropy_reg != "none":
                    parts["entropy_reg"] = self._entropy_reg(hidden, en, rows, epoch)
                    loss = loss + parts["entropy_reg"]
                if not torch.isfinite(loss):
                    return True
                with autocast_context(self.amp, self.model, enabled=False):  # backward outside autocast, cache kept
                    if self.diagnostics:
                        self._backward_by_term(parts, params)
                    else:
                        loss.backward()
                if last:
                    _accumulate(self.agg, parts, len(rows) / B)
        if inert is not None and bool(inert.all()):  # every micro-batch skipped: the zero gradients
            for p in params:                          # the passes would have left, so AdamW steps as before
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if self.sp.entropy_reg == "anchored" and "anchor" not in self.reg_state and self.nucleus[1]:
            self.reg_state["anchor"] = self.nucleus[0] / self.nucleus[1]  # SIREN's anchor: the first update's
        return False

    def _inert_rows(self) -> torch.Tensor | None:
        """(B,) bool: the rows whose every loss term is identically zero — advantage exactly 0
        (the policy term is A-linear, also under EAR shaping and STEER weights), no band edges
        (no band, ``band_rows`` gating, or no forking token) — or None when a term acts on every
        row (KL, entropy regulariser), before the Selection exists (its pass needs every row),
        on diagnostics steps, or with ``skip_inert_rows`` off. Skipping such rows' passes leaves
        the gradient bit for bit the same: they would add exact zeros."""
        sp, sel = self.sp, self.sel
        if (not self.o.skip_inert_rows or self.diagnostics or sel is None or sp.entropy_reg != "none"
                or (self.ref_logp is not None and sp.kl_coef != 0)):
            return None
        inert = self.advantages == 0
        if inert.dim() > 1:
            inert = inert.all(dim=1)
        if sel.low is not None:
            inert = inert & (torch.isnan(sel.low) | torch.isnan(sel.high) | ~sel.fork_mask.any(dim=1))
        return inert

    def _backward_by_term(self, parts: dict, params) -> None:
        """Backward each loss term separately (policy, band, kl_coef × kl), keep each term's
        gradient, and add their sum to ``p.grad``."""
        terms = {"policy": parts["policy"], "band": parts["band"], "kl": self.sp.kl_coef * parts["kl"]}
        if "entropy_reg" in parts:
            terms["entropy_reg"] = parts["entropy_reg"]
        live = {k: t for k, t in terms.items() if t.requires_grad}
        for i, (name, term) in enumerate(live.items()):
            grads = torch.autograd.grad(term, params, retain_graph=i < len(live) - 1, allow_unused=True)
            acc = self.term_grads.setdefault(name, [torch.zeros_like(p) for p in params])
            for a, g, p in zip(acc, grads, params):
                if g is not None:
                    a.add_(g)
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def term_grad_norms(self) -> dict[str, float]:
        """``grad/<term>_norm``: the L2 norm of each loss term's gradient (0 for an absent term)."""
        norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))  # noqa: E731
        terms = ("policy", "band", "kl") + (("entropy_reg",) if self.sp.entropy_reg != "none" else ())
        return {f"grad/{k}_norm": norm(self.term_grads[k]) if k in self.term_grads else 0.0 for k in terms}


def _update_size(model, batch, old_logp, params, before, o, temperature, amp) -> dict[str, float]:
    """``update/weight_change_norm`` = ‖θ_after − θ_before‖₂ over the trained parameters, and
    ``update/kl_new_old`` = KL(π_new ‖ π_old) per completion token, estimated on the batch's
    sampled tokens (drawn from π_old) as the mean of r·log r, r = π_new(y_t) / π_old(y_t)."""
    change = math.sqrt(sum(float((p.detach() - b).double().pow(2).sum()) for p, b in zip(params, before)))
    new_logp, _ = score_batch(model, batch, o.micro_batch_size, temperature=temperature,
                              chunk_size=o.logit_chunk_size, amp=amp)
    mask = batch[4]
    log_r = (new_logp - old_logp)[mask].double()
    kl = float((log_r.exp() * log_r).mean()) if mask.any() else float("nan")
    return {"update/weight_change_norm": change, "update/kl_new_old": kl}


def _accumulate(agg: dict, parts: dict, weight: float) -> None:
    """Add a micro-batch's loss terms (already batch-normalised) and its row-weighted stats."""
    agg["loss/policy"] += parts["policy"].item()
    agg["loss/band"] += parts["band"].item()
    agg["loss/kl"] += parts["kl"].item()
    agg["policy/clip_fraction"] += parts["clip_fraction"].item() * weight
    agg["policy/approx_kl"] += parts["approx_kl"].item() * weight
    if "entropy_reg" in parts:
        agg["loss/entropy_reg"] += parts["entropy_reg"].item()


def _optimizer_step(optimizer, params, max_grad_norm: float, bad: bool, skip_empty: bool = False) -> tuple[float, str]:
    """Clip and step, then zero the gradients. A non-finite loss (``bad``) or gradient takes no
    step, nor, with ``skip_empty``, does a gradient of norm exactly 0 (AdamW would move the
    weights by its momentum alone). Returns (gradient norm before clipping, status): ``"step"``,
    ``"empty"`` or ``"nonfinite"``."""
    grad_norm = float("nan")
    if not bad:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
        bad = not math.isfinite(grad_norm)
    status = "nonfinite" if bad else "empty" if skip_empty and grad_norm == 0.0 else "step"
    if status == "step":
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, status


def make_optimizer(params, o) -> torch.optim.Optimizer:
    """AdamW with OptimConfig ``o``'s settings; the fused kernel where torch has one for the
    parameters' device (one pass over the parameters, ~6x faster than the per-tensor loop on
    CPU), else the default implementation."""
    kw = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def lr_lambda(o):
    """The learning-rate multiplier per scheduler step: linear warm-up, then constant or cosine."""
    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine" and o.steps > o.warmup_steps:
            frac = (step - o.warmup_steps) / max(o.steps - o.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0
    return f
