"""Scoring: log-probs and entropies of given completions under the model being trained.

The update's forward pass (with gradient) and the no-grad passes (behaviour and reference
log-probs) both go through :func:`score_completions`, which never materialises (B, T, V)
logits: hidden states and the output head go to :func:`spine_ttrl.tokens.logprobs_and_entropy`
in vocabulary chunks. A batch is :func:`build_training_batch`'s tuple::

    input_ids (B, P + T), attention_mask (B, P + T) bool, position_ids (B, P + T),
    completion (B, T), token_mask (B, T) bool, P

with prompts left-padded and completions right-padded: the hidden state at position P − 1 + t
predicts completion token t.
"""

from __future__ import annotations

import weakref

import torch

from ..tokens import logprobs_and_entropy
from .models import forward_hidden, output_head
from .precision import autocast_context
from .sampling import select_cache_rows, shared_rows


def build_training_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Pack prompts (left-padded) and completions (right-padded) into one input tensor.

    Returns ``input_ids`` (B, P + T), ``attention_mask`` (B, P + T) bool, ``position_ids``,
    ``completion`` (B, T) token ids, ``token_mask`` (B, T) bool, and P: the hidden state at
    position P − 1 + t predicts completion token t.
    """
    P = max(len(p) for p in prompt_ids)
    T = max(len(c) for c in completion_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = True
    position_ids = (attn.long().cumsum(dim=1) - 1).clamp(min=0)
    completion = input_ids[:, P:]
    token_mask = attn[:, P:]
    batch = (input_ids, attn, position_ids, completion, token_mask, P)
    if any(getattr(p, "pixels", None) for p in prompt_ids):  # prompts with images carry their pixel inputs
        from ..vision import VisionBatch

        return VisionBatch(batch, prompt_ids)
    return batch


def batch_to_device(batch, device):
    """``batch`` (:func:`build_training_batch`'s) with its tensors on ``device``; keeps a VisionBatch's images."""
    if hasattr(batch, "to"):
        return batch.to(device)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)


def micro_batches(B: int, size: int) -> list[list[int]]:
    """Row indices of consecutive micro-batches of at most ``size`` rows."""
    return [list(range(i, min(i + size, B))) for i in range(0, B, size)]


def _plain_cache(cache) -> bool:
    """True when every layer of ``cache`` keeps all columns (no sliding window): safe to extend."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


# Models found to return a cache that cannot be extended (sliding windows): decided at the first
# shared-prompt attempt, so later micro-batches do not run (and discard) their prompts again.
_NO_PROMPT_SHARING: "weakref.WeakSet" = weakref.WeakSet()


def _shared_prompt_hidden(model, batch, rows, first: int, T: int):
    """Hidden states (B_mb, T, d) with each distinct prompt run once, or None if the model's cache
    cannot be extended; also returns the number of positions run."""
    input_ids, attn, pos, _, _, P = batch
    a = attn[rows]
    keep, inverse = shared_rows(input_ids[rows, first:P], a[:, first:P])
    if keep.numel() == len(rows):
        return None, 0
    u = [rows[i] for i in keep.tolist()]
    hp, cache = forward_hidden(model, input_ids[u, first:P], attn[u, first:P].long(), pos[u, first:P],
                               return_cache=True)
    if not _plain_cache(cache):
        _NO_PROMPT_SHARING.add(model)
        return None, 0
    parts = [hp[inverse, -1:]]
    if T > 1:
        cache = select_cache_rows(cache, inverse)
        parts.append(forward_hidden(model, input_ids[rows, P:P + T - 1], a[:, first:P + T - 1].long(),
                                    pos[rows, P:P + T - 1], past_key_values=cache))
    return torch.cat(parts, dim=1), len(u) * (P - first) + len(rows) * (T - 1)


def score_completions(model, batch, rows, *, temperature: float, chunk_size: int, share_prompts: bool = True,
                      stats: dict | None = None, hidden_out: list | None = None):
    """Log-probs and entropies (B_mb, T) of the completion tokens of ``rows`` of ``batch``.

    Uses the final hidden states and the output head through the chunked
    ``logprobs_and_entropy``: no (B, T, V) logits tensor is ever built. Returns
    ``(logprobs, entropies, T)`` with T the longest completion among ``rows``.

    Rows that share a prompt (the G samples of one question) run it once: the distinct prompts
    go through the model with a KV cache, the cache is expanded to the rows (``index_select``:
    its backward sums the rows' gradients into the shared prompt), and the completions run on
    top of it. Same log-probs, entropies and gradients as the plain (B_mb, P + T) pass up to
    float rounding, with ``(G - 1) / G`` of the prompt tokens' forward and backward saved.
    ``share_prompts=False`` forces the plain pass; so does a model whose cache is not a plain
    full-attention ``DynamicCache`` (sliding windows: found at the first call, remembered for the
    model). ``stats["positions"]``, if given, is increased by the number of sequence positions
    run through the model. ``hidden_out``, if given, receives the final hidden states (B_mb, T, D)
    that predict the completion tokens, with gradient (for a regulariser on other statistics of
    the same logits, SIREN's nucleus entropy).
    """
    input_ids, attn, pos, completion, token_mask, P = batch
    # Drop the columns that are padding in every row of this micro-batch.
    a = attn[rows]
    first = int(a.long().argmax(dim=1).min())
    T = max(int(token_mask[rows].long().sum(dim=1).max()), 1)
    weight, bias = output_head(model)
    h = None
    if hasattr(batch, "prompts"):  # images: the batch runs the multimodal backbone with its pixel inputs
        h, positions = batch.hidden(model, rows, first, T, share=share_prompts)
    elif share_prompts and model not in _NO_PROMPT_SHARING:
        h, positions = _shared_prompt_hidden(model, batch, rows, first, T)
    if h is None:
        sl = slice(first, P + T)
        hidden = forward_hidden(model, input_ids[rows, sl], a[:, sl].long(), pos[rows, sl])
        h = hidden[:, P - first - 1:P - first - 1 + T]
        positions = len(rows) * (P - first + T)
    if stats is not None:
        stats["positions"] = stats.get("positions", 0) + positions
    if hidden_out is not None:
        hidden_out.append(h)
    logp, ent = logprobs_and_entropy(h, weight, completion[rows, :T], chunk_size=chunk_size,
                                     temperature=temperature, lm_head_bias=bias)
    return logp, ent, T


def pad_cols(x: torch.Tensor, T: int, value=0.0) -> torch.Tensor:
    """``x`` (B, t ≤ T) right-padded with ``value`` to (B, T)."""
    if x.shape[1] == T:
        return x
    out = torch.full((x.shape[0], T), value, dtype=x.dtype, device=x.device)
    out[:, :x.shape[1]] = x
    return out


def score_batch(model, batch, micro_batch_size: int, *, temperature: float, chunk_size: int, amp=None):
    """No-grad log-probs and entropies (B, T) of a whole batch, micro-batch by micro-batch."""
    token_mask = batch[4]
    B, T = token_mask.shape
    logp, ent = torch.zeros(B, T, device=token_mask.device), torch.zeros(B, T, device=token_mask.device)
    with torch.no_grad(), autocast_context(amp, model):
        for rows in micro_batches(B, micro_batch_size):
            lp, en, t = score_completions(model, batch, rows, temperature=temperature, chunk_size=chunk_size)
            logp[rows, :t] = lp.float()
            ent[rows, :t] = en.float()
    return logp, ent
