"""Per-token statistics of a policy: chunked log-probs and entropies.

:func:`token_entropy`, :func:`token_logprobs` (from ``(B, T, V)`` logits) and
:func:`logprobs_and_entropy` (from final hidden states and the LM-head weight, never building
``(B, T, V)``) are pure functions over tensors. All of them work on chunks of the flattened ``B*T``
rows, so the fp32 softmax over a 49k-152k vocabulary -- the memory peak of a policy-gradient step --
exists for at most ``chunk_size`` rows at a time, in the forward *and* in the backward pass (the
backward recomputes each chunk's softmax instead of keeping it). One chunk loop, :class:`_ChunkLoop`,
serves the forward and the backward of both paths.

Two neighbours' signals live here too: ARES's :func:`window_entropy` (entropy averaged over the next
w tokens) and SIREN's :func:`nucleus_entropy` (entropy of the top-p nucleus, chunked like
:func:`token_entropy`).

Forking-token selection (:func:`top_entropy_mask`, :func:`entropy_threshold`, :func:`otsu_mask`) lives
in :mod:`spine_ttrl.selection`; the three are re-exported here, so ``spine_ttrl.tokens.otsu_mask`` keeps
working.

Vocabulary: ``logits`` (B, T, V), ``hidden`` (B, T, D), ``tokens`` (B, T) int64,
``entropies`` (B, T), ``token_mask`` (B, T) bool (True = a real response token, False = padding).
Entropies are in nats (natural log), over the full vocabulary.

Numerics: softmax, log-softmax and entropy are always evaluated in fp32 (fp64 when the inputs are
fp64, which is what lets ``torch.autograd.gradcheck`` verify the hand-written backward passes).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

# Selection moved to its own module; these names stay importable from here.
from .selection import entropy_threshold, otsu_mask, top_entropy_mask

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "token_entropy",
    "token_logprobs",
    "logprobs_and_entropy",
    "window_entropy",
    "nucleus_entropy",
    "SELECTION_SIGNALS",
    "top_entropy_mask",
    "entropy_threshold",
    "otsu_mask",
]

# Rows of the flattened (B*T) batch per chunk. Measured (bench, 2 shared CPU cores) on SmolLM2-135M's
# head, D=576, V=49152, B*T=4096 rows, forward+backward of logprobs_and_entropy, median of 3
# interleaved runs: fp32 chunk 256 16.2 s, 512 14.6 s (full-logits path 15.0 s); bf16 autocast
# chunk 512 8.1 s (full path 12.4 s); 1024 was no faster than 512. Peak extra memory at 512:
# 309 MB fp32 / 569 MB autocast, vs 3.8-3.9 GB for the full path. The chunk buffers cost
# 2 x chunk x V x 4 B (200 MB at V=49k, 620 MB at V=152k): lower it for big vocabularies.
DEFAULT_CHUNK_SIZE = 512


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _softmax_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 if any input is fp64 (so gradcheck can run)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _check_chunk_and_temperature(chunk_size: int, temperature: float | None) -> float | None:
    """Validate arguments; return the temperature to divide by, or None for "no scaling"."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if temperature is None:
        return None
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    # T = 1 is the identity: skip the division rather than pay a pass over chunk x V.
    return None if temperature == 1.0 else temperature


def _check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    # An out-of-range id would be a silent wrong gather on some devices (a device-side assert on
    # CUDA): fail loudly here. Padding positions must hold some valid id (e.g. the pad token).
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got min {int(tokens.min())}, "
            f"max {int(tokens.max())} (fill padding with a real id such as the pad token)"
        )


# The chunk loop below writes into a few (chunk, V) workspace buffers allocated once per call and
# reused for every chunk (``out=`` and in-place ops). Measured on CPU: a fresh 50 MB tensor per
# elementwise op costs 2-3x the op itself (page faults on first touch, since glibc hands large
# blocks straight back to the OS), so a naive chunk loop was ~2x slower than the full-logits path.


def _guard_zero_probs(logp: torch.Tensor, p: torch.Tensor, scratch: torch.Tensor) -> None:
    """Set log p to 0 where p == 0, so p * log p and p * (log p + H) are 0 there, not 0 * -inf = NaN.

    Exact: wherever p == 0 every term that multiplies log p by p is 0 anyway. Needed only when a
    logit can be -inf (masked vocabulary entries); NaN logits still propagate (NaN != 0).
    """
    logp.masked_fill_(torch.eq(p, 0, out=scratch), 0.0)


def _chunk_forward(z, logp_buf, p_buf, tok, need_entropy, guard_buf):
    """Per-row (logprob of ``tok`` or None, entropy or None) of a (c, V) chunk of scaled logits.

    ``z`` is read only; ``logp_buf`` and ``p_buf`` (softmax dtype) are overwritten and may alias
    ``z``'s storage only if it is ``p_buf`` itself (z is dead once log p is computed).
    """
    logp = torch.log_softmax(z, dim=-1, out=logp_buf)
    lp = None if tok is None else logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    ent = None
    if need_entropy:
        p = torch.exp(logp, out=p_buf)
        if guard_buf is not None:
            _guard_zero_probs(logp, p, guard_buf)
        ent = p.mul_(logp).sum(-1).neg_()  # H = -sum p log p
    return lp, ent


def _chunk_grad_logits(z, logp_buf, p_buf, ent, tok, g_lp, g_ent, guard_buf):
    """Gradient w.r.t. the scaled logits ``z`` (c, V) of sum(g_lp * logp_y + g_ent * H).

    Per row, with p = softmax(z):
        d logp_y / dz = onehot(y) - p
        d H / dz_j    = -p_j (log p_j + H)      (from H = -sum p log p, dp_i/dz_j = p_i(d_ij - p_j))
    so  grad_z = g_lp * onehot(y) - p * (g_ent * log p + g_lp + g_ent * H).
    ``g_lp`` / ``g_ent`` may be None (output unused) and arrive already divided by the temperature
    (the chain rule through z = logits / T, folded into the per-row factors to save a pass).
    Returns the gradient, written into ``logp_buf`` (or ``p_buf``).
    """
    logp = torch.log_softmax(z, dim=-1, out=logp_buf)
    p = torch.exp(logp, out=p_buf)
    if g_ent is None:
        grad = p.mul_(g_lp.neg().unsqueeze(-1))
    else:
        if guard_buf is not None:
            _guard_zero_probs(logp, p, guard_buf)
        coef = g_ent * ent if g_lp is None else g_ent * ent + g_lp
        grad = logp.mul_(g_ent.unsqueeze(-1)).add_(coef.unsqueeze(-1)).mul_(p).neg_()
    if g_lp is not None:
        grad.scatter_add_(-1, tok.unsqueeze(-1), g_lp.unsqueeze(-1))
    return grad


def _scaled_chunk(chunk, temperature, sdt, buf):
    """``chunk / temperature`` in the softmax dtype; ``chunk`` itself when nothing is to be done."""
    if temperature is None and chunk.dtype == sdt:
        return chunk
    if chunk.dtype == sdt:
        return torch.div(chunk, temperature, out=buf)
    z = buf.copy_(chunk)  # upcast first: dividing bf16 logits in bf16 would round them again
    return z if temperature is None else z.div_(temperature)


def _scaled_output_grads(g_lp, g_ent, sdt, temperature):
    """Incoming gradients in the softmax dtype, times 1 / T: the chain rule through z = logits / T."""
    scale = 1.0 if temperature is None else 1.0 / temperature
    g_lp = None if g_lp is None else g_lp.to(sdt) * scale
    g_ent = None if g_ent is None else g_ent.to(sdt) * scale
    return g_lp, g_ent


class _ChunkLoop:
    """The one chunk loop over N rows, shared by the forward and backward of both autograd functions.

    For each slice ``[s, e)`` of at most ``chunk_size`` rows:

        x = rows_of(s, e)                       the source rows: logits (c, V), or hidden (c, D)
        logits = to_logits(x, out)              x itself, or x @ W^T + b into ``out`` (the zc buffer)
        z = logits / T                          in the softmax dtype (:func:`_scaled_chunk`)

    then :meth:`forward` stores logp_y and H of z, and :meth:`grads` yields grad_z. The (chunk, V)
    workspace -- ``logp`` and ``p`` (softmax dtype), ``guard`` (bool, only when -inf logits are
    possible) and ``zc`` (compute dtype, for a matmul's output; ``p`` shares it when the dtypes
    agree) -- is allocated once here and reused by every chunk.
    """

    def __init__(self, like, n, vocab, chunk_size, temperature, sdt, *, guard, cdt=None):
        rows = min(chunk_size, n)
        self.n, self.chunk_size, self.temperature, self.sdt = n, chunk_size, temperature, sdt
        self.zc = None if cdt is None else like.new_empty(rows, vocab, dtype=cdt)
        self.logp = like.new_empty(rows, vocab, dtype=sdt)
        self.p = self.zc if cdt == sdt else like.new_empty(rows, vocab, dtype=sdt)
        self.guard = like.new_empty(rows, vocab, dtype=torch.bool) if guard else None

    def chunks(self, rows_of, to_logits):
        """Yield ``(s, e, x, z)`` per chunk: its rows, its source rows x and its scaled logits z."""
        for s in range(0, self.n, self.chunk_size):
            e = min(s + self.chunk_size, self.n)
            m = e - s
            x = rows_of(s, e)
            logits = to_logits(x, None if self.zc is None else self.zc[:m])
            yield s, e, x, _scaled_chunk(logits, self.temperature, self.sdt, self.p[:m])

    def forward(self, rows_of, to_logits, tokens, lp, ent):
        """Write logp_y into ``lp`` (N,) and H into ``ent`` (N,); either may be None (not needed)."""
        for s, e, _, z in self.chunks(rows_of, to_logits):
            m = e - s
            guard = None if self.guard is None else self.guard[:m]
            tok = None if lp is None else tokens[s:e]
            c_lp, c_ent = _chunk_forward(z, self.logp[:m], self.p[:m], tok, ent is not None, guard)
            if lp is not None:
                lp[s:e] = c_lp
            if ent is not None:
                ent[s:e] = c_ent

    def grads(self, rows_of, to_logits, ent, tokens, g_lp, g_ent):
        """Yield ``(s, e, x, grad_z)`` per chunk (:func:`_chunk_grad_logits`; grad_z lives in a buffer).

        ``g_lp`` / ``g_ent`` (N,) come from :func:`_scaled_output_grads`; None = that output unused.
        """
        for s, e, x, z in self.chunks(rows_of, to_logits):
            m = e - s
            yield s, e, x, _chunk_grad_logits(
                z,
                self.logp[:m],
                self.p[:m],
                None if g_ent is None else ent[s:e],
                None if g_lp is None else tokens[s:e],
                None if g_lp is None else g_lp[s:e],
                None if g_ent is None else g_ent[s:e],
                None if self.guard is None else self.guard[:m],
            )


def _same_logits(x, out):
    """``to_logits`` of the logits path: the rows are the logits already."""
    return x


# ---------------------------------------------------------------------------------------------
# Statistics from (B, T, V) logits
# ---------------------------------------------------------------------------------------------


class _LogitsStats(torch.autograd.Function):
    """Chunked log-softmax statistics of a (N, V) logits matrix; backward recomputes per chunk.

    Plain autograd over the chunk loop would save every chunk's fp32 log-softmax for backward, i.e.
    an fp32 copy of all N x V logits (twice the memory of bf16 logits). Saving only the logits
    (already alive) and the per-row entropy keeps the extra memory at O(chunk x V).
    """

    @staticmethod
    def forward(ctx, logits, tokens, chunk_size, temperature, need_lp, need_entropy):
        sdt = _softmax_dtype(logits.dtype)
        n, vocab = logits.shape
        lp = logits.new_empty(n if need_lp else 0, dtype=sdt)
        ent = logits.new_empty(n if need_entropy else 0, dtype=sdt)
        # user logits may hold -inf (masked vocabulary): guard p * log p
        loop = _ChunkLoop(logits, n, vocab, chunk_size, temperature, sdt, guard=need_entropy)
        rows_of = lambda s, e: logits[s:e]  # noqa: E731
        loop.forward(rows_of, _same_logits, tokens, lp if need_lp else None, ent if need_entropy else None)
        ctx.save_for_backward(logits, tokens if need_lp else None, ent if need_entropy else None)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.set_materialize_grads(False)  # None = "this output is unused": skip its terms
        if not need_lp:
            ctx.mark_non_differentiable(lp)
        if not need_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, tokens, ent = ctx.saved_tensors
        if (g_lp is None and g_ent is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        sdt = _softmax_dtype(logits.dtype)
        n, vocab = logits.shape
        g_lp, g_ent = _scaled_output_grads(g_lp, g_ent, sdt, ctx.temperature)
        grad_logits = torch.empty_like(logits)
        loop = _ChunkLoop(logits, n, vocab, ctx.chunk_size, ctx.temperature, sdt, guard=g_ent is not None)
        rows_of = lambda s, e: logits[s:e]  # noqa: E731
        for s, e, _, grad in loop.grads(rows_of, _same_logits, ent, tokens, g_lp, g_ent):
            grad_logits[s:e] = grad
        return grad_logits, None, None, None, None, None


def _logits_stats(logits, tokens, chunk_size, temperature, need_lp, need_entropy):
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating (..., V) tensor, got {logits.dtype} {tuple(logits.shape)}"
        )
    tau = _check_chunk_and_temperature(chunk_size, temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat_tokens = None
    if need_lp:
        if tuple(tokens.shape) != tuple(lead):
            raise ValueError(f"tokens shape {tuple(tokens.shape)} != logits shape without V {tuple(lead)}")
        _check_tokens(tokens, vocab)
        flat_tokens = tokens.reshape(-1).long()
    flat_logits = logits.reshape(-1, vocab)
    lp, ent = _LogitsStats.apply(flat_logits, flat_tokens, chunk_size, tau, need_lp, need_entropy)
    return lp.reshape(lead) if need_lp else None, ent.reshape(lead) if need_entropy else None


def token_entropy(
    logits: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float | None = None,
) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, in nats.

        z = logits / temperature        (only if temperature is given and != 1)
        p = softmax(z)                  over the full vocabulary
        H = -sum_v p_v log p_v          (entries with p_v = 0, e.g. logit -inf, contribute 0)

    ============  ===========  ==========================================
    argument      shape        dtype
    ============  ===========  ==========================================
    logits        (B, T, V)    any float (bf16 / fp16 / fp32 / fp64)
    returns       (B, T)       fp32 (fp64 for fp64 logits)
    ============  ===========  ==========================================

    Any leading shape works (``(..., V) -> (...)``). The fp32 softmax is computed for at most
    ``chunk_size`` flattened rows at a time, in forward and backward (the backward recomputes it
    from the saved logits). Differentiable w.r.t. ``logits``: dH/dz_j = -p_j (log p_j + H).
    Sampling at a temperature T draws from softmax(logits / T); pass the same T to score the
    entropy of the distribution that was actually sampled.
    """
    return _logits_stats(logits, None, chunk_size, temperature, need_lp=False, need_entropy=True)[1]


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float | None = None,
) -> torch.Tensor:
    """Log-probability of each given token under the (temperature-scaled) softmax.

        z = logits / temperature        (only if temperature is given and != 1)
        logprob_t = z[t, y_t] - logsumexp_v z[t, v]

    ============  ===========  ==========================================
    argument      shape        dtype
    ============  ===========  ==========================================
    logits        (B, T, V)    any float; logits[:, t] scores tokens[:, t]
    tokens        (B, T)       integer ids in [0, V) (padding: any valid id)
    returns       (B, T)       fp32 (fp64 for fp64 logits)
    ============  ===========  ==========================================

    Chunked over the flattened rows like :func:`token_entropy`; differentiable w.r.t. ``logits``
    (d logprob / dz = onehot(y) - p). Masking padding is the caller's job (``token_mask``).
    """
    return _logits_stats(logits, tokens, chunk_size, temperature, need_lp=True, need_entropy=False)[0]


# ---------------------------------------------------------------------------------------------
# Statistics from hidden states and the LM head, never building (B, T, V)
# ---------------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype on ``device_type``, or None (works on torch 2.2 and later)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def _linear_into(h, w, b, out):
    """out = h @ w.T (+ b), written into a preallocated (c, V) buffer."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


class _LinearLogitsStats(torch.autograd.Function):
    """Chunked logprob + entropy of ``hidden @ W.T (+ b)``; backward recomputes each chunk's logits.

    Saved for backward: hidden (N, D), W (V, D), bias, tokens (N,) and the per-row entropy (N,).
    Nothing of size N x V survives between forward and backward, so peak memory is
    O(chunk x V + N x D + V x D) in both passes. The price is one extra (chunk x D x V) matmul per
    chunk in backward (4 matmuls in all instead of the full-logits path's 3).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, chunk_size, temperature, cdt, guard):
        sdt = _softmax_dtype(cdt)
        n, vocab = hidden.shape[0], weight.shape[0]
        w, b = weight.to(cdt), None if bias is None else bias.to(cdt)
        lp = hidden.new_empty(n, dtype=sdt)
        ent = hidden.new_empty(n, dtype=sdt)
        loop = _ChunkLoop(hidden, n, vocab, chunk_size, temperature, sdt, guard=guard, cdt=cdt)
        rows_of = lambda s, e: hidden[s:e].to(cdt)  # noqa: E731
        to_logits = lambda h, out: _linear_into(h, w, b, out)  # noqa: E731
        # Autocast is handled by hand (cdt chosen by the caller); keep it from re-casting our ops.
        with torch.autocast(hidden.device.type, enabled=False):
            loop.forward(rows_of, to_logits, tokens, lp, ent)
        ctx.save_for_backward(hidden, weight, bias, tokens, ent)
        ctx.chunk_size, ctx.temperature, ctx.cdt, ctx.guard = chunk_size, temperature, cdt, guard
        ctx.set_materialize_grads(False)  # None = "this output is unused": skip its terms
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, tokens, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None
        cdt, sdt = ctx.cdt, ent.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        g_lp, g_ent = _scaled_output_grads(g_lp, g_ent, sdt, ctx.temperature)  # z = (h W^T + b) / T
        w, b = weight.to(cdt), None if bias is None else bias.to(cdt)
        grad_h = hidden.new_empty(hidden.shape, dtype=cdt) if need_h else None
        # grad_W and grad_b are sums over all rows: accumulate in the softmax dtype (fp32) even when
        # the matmuls run in bf16, so that many chunks do not add up bf16 rounding errors.
        grad_w = torch.zeros(weight.shape, dtype=sdt, device=weight.device) if need_w else None
        # bf16 matmuls: each chunk's grad_W lands in one reused V x D buffer before the fp32 sum.
        grad_w_chunk = torch.empty(weight.shape, dtype=cdt, device=weight.device) if need_w and cdt != sdt else None
        grad_b = torch.zeros(bias.shape, dtype=sdt, device=bias.device) if need_b else None
        guard = ctx.guard and g_ent is not None
        loop = _ChunkLoop(hidden, n, vocab, ctx.chunk_size, ctx.temperature, sdt, guard=guard, cdt=cdt)
        rows_of = lambda s, e: hidden[s:e].to(cdt)  # noqa: E731
        to_logits = lambda h, out: _linear_into(h, w, b, out)  # noqa: E731
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e, h, g in loop.grads(rows_of, to_logits, ent, tokens, g_lp, g_ent):
                if need_b:
                    grad_b += g.sum(0)
                # The matmuls run in the compute dtype, as the forward's did (zc is free by now).
                gc = g if cdt == sdt else loop.zc[: e - s].copy_(g)
                if need_h:
                    torch.mm(gc, w, out=grad_h[s:e])  # (c, V) @ (V, D)
                if need_w:
                    if grad_w_chunk is None:
                        grad_w.addmm_(gc.t(), h)  # (V, c) @ (c, D), accumulated in place
                    else:
                        grad_w += torch.mm(gc.t(), h, out=grad_w_chunk)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and entropies straight from final hidden states, without (B, T, V) logits.

        z = (hidden @ W^T + b) / temperature      (b only if given; / T only if given and != 1)
        logprobs  = z[y] - logsumexp(z)
        entropies = -sum_v p_v log p_v,  p = softmax(z)

    =================  ===========  =============================================================
    argument           shape        notes
    =================  ===========  =============================================================
    hidden             (B, T, D)    final hidden states; hidden[:, t] predicts tokens[:, t]
    lm_head_weight     (V, D)       may be frozen (requires_grad=False: grad_W is skipped)
    tokens             (B, T)       integer ids in [0, V)
    lm_head_bias       (V,)         optional
    logprobs           (B, T)       fp32 (fp64 for fp64 inputs)
    entropies          (B, T)       fp32 (fp64 for fp64 inputs)
    =================  ===========  =============================================================

    Any leading shape works (``hidden (..., D)``, ``tokens (...)``).

    Memory: the flattened rows are processed ``chunk_size`` at a time; the custom backward
    recomputes each chunk's logits instead of storing them, so forward and backward both peak at
    O(chunk_size x V) on top of hidden, W and their gradients. Gradients flow from both outputs to
    ``hidden``, ``lm_head_weight`` and ``lm_head_bias`` (those that require grad), and are returned
    in their dtypes; grad_W is accumulated across chunks in fp32. Double backward is not supported.

    Precision: the matmul runs in the dtype the model's own ``lm_head(hidden)`` would use -- the
    autocast dtype when autocast is active on hidden's device, otherwise the promoted dtype of
    hidden and W (bf16 for a bf16 model, fp32 for fp32) -- and its output is upcast to fp32 before
    the log-softmax and entropy. So the values match ``lm_head(hidden).float()`` followed by an fp32
    log-softmax (the usual full-logits path) up to matmul blocking, and no fp32 copy of a bf16 W is
    made. (Upcasting W for an fp32 matmul would cost a V x D fp32 copy per pass -- 0.9 GB for a
    152k x 1536 head -- for precision the rest of the pipeline, e.g. the sampler, does not have.)
    """
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating (..., D) tensor, got {hidden.dtype} {tuple(hidden.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (vocab,):
        raise ValueError(f"lm_head_bias must be ({vocab},), got {tuple(lm_head_bias.shape)}")
    lead = hidden.shape[:-1]
    if tuple(tokens.shape) != tuple(lead):
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != hidden shape without D {tuple(lead)}")
    tau = _check_chunk_and_temperature(chunk_size, temperature)
    _check_tokens(tokens, vocab)

    dtypes = [hidden.dtype, lm_head_weight.dtype] + ([] if lm_head_bias is None else [lm_head_bias.dtype])
    cdt = _autocast_dtype(hidden.device.type)
    if cdt is None or torch.float64 in dtypes:  # autocast never casts fp64, mirror that
        cdt = dtypes[0]
        for dt in dtypes[1:]:
            cdt = torch.promote_types(cdt, dt)

    # Logits from a matmul are finite; only a bias with -inf entries (vocabulary masking) needs the
    # p = 0 guard, and checking V numbers once is cheaper than guarding every chunk.
    guard = lm_head_bias is not None and not bool(torch.isfinite(lm_head_bias).all())
    lp, ent = _LinearLogitsStats.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        tokens.reshape(-1).long(),
        chunk_size,
        tau,
        cdt,
        guard,
    )
    return lp.reshape(lead), ent.reshape(lead)


# ---------------------------------------------------------------------------------------------
# Neighbours: ARES's window entropy, SIREN's nucleus entropy
# ---------------------------------------------------------------------------------------------


def window_entropy(entropies: torch.Tensor, token_mask: torch.Tensor, window: int = 5) -> torch.Tensor:
    """ARES's window entropy: the mean entropy of the next ``window`` tokens of the same response.

        H̄_{i,t} = Σ_{s=t}^{t+w−1} m_{i,s} H_{i,s} / Σ_{s=t}^{t+w−1} m_{i,s}     where m_{i,t} = 1
        H̄_{i,t} = 0                                                            where m_{i,t} = 0

    Only valid positions of the window count (m = ``token_mask``), so near the end of a response
    the window holds fewer tokens, and padding (even NaN) never enters. Window 1 is H itself on
    the mask. Example, H = (1, 2, 3, 4, 5), w = 2: (1.5, 2.5, 3.5, 4.5, 5).

    Vectorised with cumulative sums along T (in float64, so long rows lose no precision):
    S_t = C_{min(t+w, T)} − C_t with C the zero-prefixed cumsum. Differentiable w.r.t.
    ``entropies``. Shapes: entropies (B, T), token_mask (B, T) bool → (B, T) in ``entropies``'
    dtype. ``window`` < 1 → ValueError.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if entropies.dim() != 2 or tuple(token_mask.shape) != tuple(entropies.shape):
        raise ValueError(f"entropies and token_mask must both be (B, T), got "
                         f"{tuple(entropies.shape)} and {tuple(token_mask.shape)}")
    mask = token_mask.bool()
    h = torch.where(mask, entropies.to(torch.float64), torch.zeros((), dtype=torch.float64, device=mask.device))
    m = mask.to(torch.float64)
    t = entropies.shape[1]
    zero = h.new_zeros(h.shape[0], 1)
    csum_h = torch.cat([zero, h.cumsum(1)], dim=1)  # (B, T + 1): csum[:, t] = Σ_{s<t}
    csum_m = torch.cat([zero, m.cumsum(1)], dim=1)
    start = torch.arange(t, device=mask.device)
    end = (start + window).clamp(max=t)
    total = csum_h[:, end] - csum_h[:, start]
    count = csum_m[:, end] - csum_m[:, start]
    out = torch.where(mask, total / count.clamp(min=1), torch.zeros_like(total))
    return out.to(entropies.dtype)



def _token_signal(entropies: torch.Tensor, token_mask: torch.Tensor, window: int) -> torch.Tensor:
    """The token entropies themselves (``window`` unused)."""
    return entropies


#: Selection signal (the ``--selection-signal`` setting) → ``fn(entropies (B, T), token_mask (B, T),
#: window) -> (B, T)``: what the forking-token rules of :mod:`spine_ttrl.selection` rank. ``token``
#: is H itself, ``window`` ARES's :func:`window_entropy` over ``window`` tokens. A new signal is one
#: entry here and one choice in ``SpineConfig.selection_signal``.
SELECTION_SIGNALS = {"token": _token_signal, "window": window_entropy}

def _nucleus_chunk(z: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log q, q, H) of a (c, V) chunk of scaled logits, q = softmax restricted to the nucleus.

    Nucleus: in descending order of probability (a stable sort: of equal probabilities the lower
    vocabulary index ranks first), a token is kept while the mass ranked above it is < top_p --
    :func:`spine_ttrl.engine.sampling.top_p_filter`'s rule. Outside it q = 0 and log q is set to
    0, so q log q and q (log q + H) are 0 there (also for -inf logits).
    """
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        p = torch.softmax(sorted_z, dim=-1)
        keep_sorted = (p.cumsum(dim=-1) - p) < top_p
        del sorted_z, p
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        z = z.masked_fill(~keep, float("-inf"))
    logq = torch.log_softmax(z, dim=-1)
    q = logq.exp()
    logq = logq.masked_fill(q == 0, 0.0)
    return logq, q, -(q * logq).sum(-1)


class _NucleusEntropy(torch.autograd.Function):
    """Chunked nucleus entropy of (N, V) logits; saves only the logits, backward recomputes.

    d H / d z_j = −q_j (log q_j + H) inside the nucleus and 0 outside: the nucleus (which tokens
    are kept) is piecewise constant in z, so it carries no gradient.
    """

    @staticmethod
    def forward(ctx, logits, top_p, chunk_size, temperature):
        sdt = _softmax_dtype(logits.dtype)
        ent = logits.new_empty(logits.shape[0], dtype=sdt)
        for s in range(0, logits.shape[0], chunk_size):
            z = logits[s : s + chunk_size].to(sdt)
            z = z if temperature is None else z / temperature
            ent[s : s + chunk_size] = _nucleus_chunk(z, top_p)[2]
        ctx.save_for_backward(logits)
        ctx.top_p, ctx.chunk_size, ctx.temperature = top_p, chunk_size, temperature
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (logits,) = ctx.saved_tensors
        sdt = _softmax_dtype(logits.dtype)
        g = g.to(sdt) * (1.0 if ctx.temperature is None else 1.0 / ctx.temperature)  # z = logits / T
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk_size):
            z = logits[s : s + ctx.chunk_size].to(sdt)
            z = z if ctx.temperature is None else z / ctx.temperature
            logq, q, h = _nucleus_chunk(z, ctx.top_p)
            gz = logq.add_(h.unsqueeze(-1)).mul_(q).mul_(-g[s : s + ctx.chunk_size].unsqueeze(-1))
            grad[s : s + ctx.chunk_size] = gz
        return grad, None, None, None


def nucleus_entropy(
    logits: torch.Tensor,
    top_p: float,
    temperature: float | None = 1.0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """SIREN's entropy of the top-p nucleus only, renormalised, in nats.

        z = logits / temperature,  p = softmax(z)
        K = the smallest set of most likely tokens whose probability reaches top_p: sorted by
            descending p, token k is in K iff Σ_{j ranked above k} p_j < top_p
        q_v = p_v / Σ_{u∈K} p_u  for v ∈ K (0 outside),   H = −Σ_{v∈K} q_v log q_v

    Ties at the boundary follow the sort order: a stable descending sort, so of equal
    probabilities the lower vocabulary index is kept first. This is the sampler's nucleus
    (:func:`spine_ttrl.engine.sampling.top_p_filter`) for the same logits and temperature.
    ``top_p`` must lie in (0, 1]; ``top_p = 1`` keeps every token and gives
    :func:`token_entropy`. Example: p = (0.5, 0.3, 0.2), top_p = 0.7 → K = the first two,
    q = (0.625, 0.375), H = 0.6616.

    ============  ===========  ==========================================
    argument      shape        dtype
    ============  ===========  ==========================================
    logits        (..., V)     any float
    returns       (...)        fp32 (fp64 for fp64 logits)
    ============  ===========  ==========================================

    Differentiable w.r.t. ``logits`` (dH/dz_j = −q_j (log q_j + H) in K, 0 outside; the choice
    of K carries no gradient). Memory: rows are processed ``chunk_size`` at a time in forward
    and backward (the backward recomputes each chunk from the saved logits), so the sorted
    copy, the sort indices and the softmax exist for at most ``chunk_size`` rows at once.
    Double backward is not supported.
    """
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (..., V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    try:
        p = float(top_p)
    except (TypeError, ValueError):
        p = float("nan")
    if isinstance(top_p, (bool, str)) or not 0.0 < p <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    tau = _check_chunk_and_temperature(chunk_size, temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    ent = _NucleusEntropy.apply(logits.reshape(-1, vocab), p, chunk_size, tau)
    return ent.reshape(lead)
