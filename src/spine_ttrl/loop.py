"""The adaptation loop: label-free test-time RL (TTRL / SPINE) of a causal LM on its questions.

One step, in this order (the whole loop is in :func:`adapt`, readable top to bottom):

1. **Prompt** each question with the model's chat template and an instruction to put the
   final answer in ``\\boxed{}`` (encoded once, before the first step).
2. **Sample** ``num_votes`` completions per question (own KV-cache decoding loop; finished
   rows leave the batch; temperature and top-p; an explicit sampling generator).
3. **Vote and reward**: extract answers, cluster them by equivalence, majority label,
   reward 1 for the majority cluster. Questions where nothing parsed are skipped (counted).
   Keep ``num_train_samples`` completions per question — a random subset drawn with the
   selection generator — *before* any forward pass, so no compute is spent on dropped rows.
   GRPO advantages per question group.
4. **Select**: the selection entropies of the whole optimiser batch are the sampler's (the
   entropy of softmax(logits / temperature) it drew each token from). The forking mask (top-ρ
   over the batch / group / response, or Otsu) and the band edges are computed once here, from
   the whole batch, *before* micro-batching (``band_anchor=first``: pooled once at the first
   update, then fixed for the run and saved in checkpoints). The old log-probs are the
   detached log-probs of the first update's gradient pass, which runs with the sampling
   weights (ratio exactly 1 then): no separate scoring pass.
5. **Loss** per micro-batch with gradient: clipped policy term on the selected tokens and
   band term, both divided by the total number of completion tokens of the optimiser batch
   (the paper's convention: SPINE's step is then about ρ × TTRL's at equal learning rate);
   KL (k3, to the frozen initial model) divided by the number of tokens it is computed on.
   Log-probs and entropies come from the chunked ``logprobs_and_entropy`` path, which never
   materialises (B, T, V) logits.
6. **Step**: AdamW (fused), gradient clipping; a NaN/inf loss or gradient skips the step (logged).
   bf16 autocast with fp32 master weights where the CPU supports bf16.

Then log metrics, evaluate every ``eval_every`` steps, save. With ``updates_per_batch`` > 1
the sampled batch is reused for several updates (PPO epochs) and the clip acts.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config as config_mod
from .answers import extract_answer, is_equivalent, majority_vote
from .assessment import EvalResult, eos_token_ids, evaluate_prompts
from .checkpoint import (
    count_lines,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
    truncate_lines,
)
from .config import Config
from .data import load_examples, resolve_task
from .losses import band_edges, band_penalty, group_advantages, kl_penalty, policy_loss, pooled_band_edges
from .models import forward_hidden, load_model_and_tokenizer, output_head
from .prompting import encode_examples
from .report import collapse_warnings, read_jsonl, write_report
from .rewards import majority_rewards
from .sampling import autocast_context as _autocast
from .sampling import sample, select_cache_rows, shared_rows
from .tokens import logprobs_and_entropy, otsu_mask, top_entropy_mask


@dataclass
class RunResult:
    """What :func:`adapt` returns: the run directory, the per-step metrics and evaluations."""

    out_dir: Path
    config: Config
    metrics: list[dict] = field(default_factory=list)
    eval_before: EvalResult | None = None
    eval_after: EvalResult | None = None
    model: object = None
    tokenizer: object = None


# ------------------------------------------------------------------ plumbing helpers
def bf16_supported() -> bool:
    """True when bf16 matmuls are native here (CUDA bf16, or CPU AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    check = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def autocast_dtype_for(precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and bf16_supported()):
        return torch.bfloat16
    return None


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
    return input_ids, attn, position_ids, completion, token_mask, P


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


def score_completions(model, batch, rows, *, temperature: float, chunk_size: int, share_prompts: bool = True,
                      stats: dict | None = None):
    """Log-probs and entropies (B_mb, T) of the completion tokens of ``rows`` of ``batch``.

    Uses the final hidden states and the output head through the chunked
    ``logprobs_and_entropy``: no (B, T, V) logits tensor is ever built.

    Rows that share a prompt (the G samples of one question) run it once: the distinct prompts
    go through the model with a KV cache, the cache is expanded to the rows (``index_select``:
    its backward sums the rows' gradients into the shared prompt), and the completions run on
    top of it. Same log-probs, entropies and gradients as the plain (B_mb, P + T) pass up to
    float rounding, with ``(G - 1) / G`` of the prompt tokens' forward and backward saved.
    ``share_prompts=False`` forces the plain pass; so does a model whose cache is not a plain
    full-attention ``DynamicCache`` (sliding windows: found at the first call, remembered for the
    model). ``stats["positions"]``, if given, is
    increased by the number of sequence positions run through the model.
    """
    input_ids, attn, pos, completion, token_mask, P = batch
    # Drop the columns that are padding in every row of this micro-batch.
    a = attn[rows]
    first = int(a.long().argmax(dim=1).min())
    last = int(token_mask[rows].long().sum(dim=1).max())
    T = max(last, 1)
    weight, bias = output_head(model)
    h = None
    if share_prompts and model not in _NO_PROMPT_SHARING:
        keep, inverse = shared_rows(input_ids[rows, first:P], a[:, first:P])
        if keep.numel() < len(rows):
            u = [rows[i] for i in keep.tolist()]
            hp, cache = forward_hidden(model, input_ids[u, first:P], attn[u, first:P].long(), pos[u, first:P],
                                       return_cache=True)
            if _plain_cache(cache):
                parts = [hp[inverse, -1:]]
                if T > 1:
                    cache = select_cache_rows(cache, inverse)
                    parts.append(forward_hidden(model, input_ids[rows, P:P + T - 1], a[:, first:P + T - 1].long(),
                                                pos[rows, P:P + T - 1], past_key_values=cache))
                h = torch.cat(parts, dim=1)
                positions = len(u) * (P - first) + len(rows) * (T - 1)
            else:
                _NO_PROMPT_SHARING.add(model)
    if h is None:
        sl = slice(first, P + T)
        hidden = forward_hidden(model, input_ids[rows, sl], a[:, sl].long(), pos[rows, sl])
        h = hidden[:, P - first - 1:P - first - 1 + T]
        positions = len(rows) * (P - first + T)
    if stats is not None:
        stats["positions"] = stats.get("positions", 0) + positions
    logp, ent = logprobs_and_entropy(h, weight, completion[rows, :T], chunk_size=chunk_size,
                                     temperature=temperature, lm_head_bias=bias)
    return logp, ent, T


def _pad_cols(x: torch.Tensor, T: int, value=0.0) -> torch.Tensor:
    if x.shape[1] == T:
        return x
    out = torch.full((x.shape[0], T), value, dtype=x.dtype)
    out[:, :x.shape[1]] = x
    return out


def select_tokens(entropies, token_mask, spine_cfg, group_size):
    """The forking mask (B, T) for the configured selection rule (all / top-ρ / Otsu)."""
    if spine_cfg.selection == "all":
        return token_mask.clone()
    if spine_cfg.selection == "top":
        return top_entropy_mask(entropies, token_mask, spine_cfg.rho, scope=spine_cfg.scope, group_size=group_size)
    if spine_cfg.selection == "otsu":
        return otsu_mask(entropies, token_mask)
    raise ValueError(f"unknown selection {spine_cfg.selection!r}")


def make_optimizer(params, o) -> torch.optim.Optimizer:
    """AdamW with ``o``'s settings; the fused kernel where torch has one for the parameters' device
    (CPU and CUDA in torch >= 2.4: one pass over the parameters, ~6x faster than the per-tensor
    loop on CPU and no temporary copies), else the default implementation."""
    kw = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def micro_batches(B: int, size: int) -> list[list[int]]:
    """Row indices of consecutive micro-batches of at most ``size`` rows."""
    return [list(range(i, min(i + size, B))) for i in range(0, B, size)]


def score_batch(model, batch, micro_batch_size: int, *, temperature: float, chunk_size: int, amp=None):
    """No-grad log-probs and entropies (B, T) of a whole batch, micro-batch by micro-batch."""
    token_mask = batch[4]
    B, T = token_mask.shape
    logp, ent = torch.zeros(B, T), torch.zeros(B, T)
    with torch.no_grad(), _autocast(amp, model):
        for rows in micro_batches(B, micro_batch_size):
            lp, en, t = score_completions(model, batch, rows, temperature=temperature, chunk_size=chunk_size)
            logp[rows, :t] = lp.float()
            ent[rows, :t] = en.float()
    return logp, ent


def update_on_batch(model, optimizer, params, batch, advantages, sp, o, *, temperature: float, group_size: int,
                    amp=None, ref_logp=None, log=None, behaviour_entropy=None,
                    band_anchor: tuple[float, float] | None = None) -> dict[str, float]:
    """Select forking tokens and run ``o.updates_per_batch`` optimiser updates on one batch.

    ``batch`` is :func:`build_training_batch`'s output, ``advantages`` (B,), ``sp`` the
    SpineConfig (selection, band, KL) and ``o`` the OptimConfig. The forking mask and band
    edges come from the behaviour policy's entropies over the *whole* batch, known before
    micro-batching; losses use one global normaliser (the batch's completion tokens), so
    gradient accumulation over micro-batches equals the full-batch gradient. Returns metrics.

    Where the entropies come from:

    - ``behaviour_entropy`` (B, T) given (the sampler's, ``sample(return_entropy=True)``): no
      extra pass; the behaviour log-probs (PPO's old log-probs) are the detached log-probs of
      the first update's gradient pass, which runs with the sampling weights.
    - one micro-batch and one update: the gradient pass itself provides them (detached).
    - otherwise: one no-grad scoring pass over the batch before the first update.

    With ``sp.band_anchor == "first"`` every response gets the same edges ``band_anchor``
    (low, high); when it is None (the run's first update) they are pooled over this batch's
    forking tokens (:func:`pooled_band_edges`) and returned as ``band/anchor_low`` and
    ``band/anchor_high`` for the caller to keep.
    """
    token_mask = batch[4]
    B, T = token_mask.shape
    mbs = micro_batches(B, o.micro_batch_size)
    n_tokens = int(token_mask.sum())
    m: dict[str, float] = {}

    t0 = time.perf_counter()
    # One micro-batch and one update: the gradient pass itself provides the (detached)
    # behaviour log-probs and entropies, so the extra no-grad pass is skipped.
    single_pass = behaviour_entropy is None and len(mbs) == 1 and o.updates_per_batch == 1
    old_logp = ent_sel = fork = low = high = None

    def select(ent):
        f = select_tokens(ent, token_mask, sp, group_size)
        if sp.band == "none":
            return f, None, None
        if sp.band_anchor == "first":
            a_lo, a_hi = band_anchor if band_anchor is not None else pooled_band_edges(
                ent, f, sp.band, sp.band_low_q, sp.band_high_q)
            m["band/anchor_low"], m["band/anchor_high"] = a_lo, a_hi
            has = f.any(dim=1)  # rows without a forking token keep NaN edges (no band, no metrics)
            nan = torch.full((B,), float("nan"))
            return f, torch.where(has, torch.tensor(a_lo), nan), torch.where(has, torch.tensor(a_hi), nan)
        lo, hi = band_edges(ent, f, sp.band, sp.band_low_q, sp.band_high_q)
        return f, lo, hi

    if behaviour_entropy is not None:
        if behaviour_entropy.shape != token_mask.shape:
            raise ValueError(f"behaviour_entropy has shape {tuple(behaviour_entropy.shape)}, expected {tuple(token_mask.shape)}")
        ent_sel = behaviour_entropy.float().masked_fill(~token_mask, 0.0)
        fork, low, high = select(ent_sel)
        old_logp = torch.zeros(B, T)  # filled by the first update's gradient pass
    elif not single_pass:
        old_logp, ent_sel = score_batch(model, batch, o.micro_batch_size, temperature=temperature,
                                        chunk_size=o.logit_chunk_size, amp=amp)
        fork, low, high = select(ent_sel)
    m["time/scoring_s"] = time.perf_counter() - t0

    t_fb = t_opt = 0.0
    agg = {"loss/policy": 0.0, "loss/band": 0.0, "loss/kl": 0.0, "policy/clip_fraction": 0.0, "policy/approx_kl": 0.0}
    grad_norm = float("nan")
    pass_stats: dict[str, int] = {}
    model.train()
    for epoch in range(o.updates_per_batch):
        t0 = time.perf_counter()
        bad = False
        # One autocast context per update: weights are cast to the low precision once, not per
        # micro-batch (the cast cache is dropped on exit, before the optimiser changes them).
        with _autocast(amp, model):
            for rows in mbs:
                lp, en, _ = score_completions(model, batch, rows, temperature=temperature,
                                              chunk_size=o.logit_chunk_size, stats=pass_stats)
                lp, en = _pad_cols(lp.float(), T), _pad_cols(en.float(), T)
                if single_pass:
                    old_logp, ent_sel = lp.detach(), en.detach()
                    fork, low, high = select(ent_sel)
                elif behaviour_entropy is not None and epoch == 0:
                    old_logp[rows] = lp.detach()
                fork_mb = fork[rows]
                loss_pl, stats = policy_loss(lp, old_logp[rows], advantages[rows], fork_mb, o.clip_eps, n_tokens)
                loss = loss_pl
                loss_band = torch.zeros(())
                if low is not None:
                    loss_band = band_penalty(en, fork_mb, low[rows], high[rows], sp.beta_low, sp.beta_up, n_tokens)
                    loss = loss + loss_band
                loss_kl = torch.zeros(())
                if ref_logp is not None:
                    kl_mask = fork if sp.kl_tokens == "selected" else token_mask
                    loss_kl = kl_penalty(lp, ref_logp[rows], kl_mask[rows], max(int(kl_mask.sum()), 1))
                    loss = loss + sp.kl_coef * loss_kl
                if not torch.isfinite(loss):
                    bad = True
                    break
                with _autocast(amp, model, enabled=False):  # backward outside autocast, cache kept
                    loss.backward()
                if epoch == o.updates_per_batch - 1:
                    w = len(rows) / B
                    agg["loss/policy"] += loss_pl.item()
                    agg["loss/band"] += loss_band.item()
                    agg["loss/kl"] += loss_kl.item()
                    agg["policy/clip_fraction"] += stats["clip_fraction"].item() * w
                    agg["policy/approx_kl"] += stats["approx_kl"].item() * w
        t_fb += time.perf_counter() - t0
        t0 = time.perf_counter()
        if not bad:
            max_norm = o.max_grad_norm if o.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            bad = not math.isfinite(grad_norm)
        if bad:
            if log is not None:
                log.info("non-finite loss or gradient: update skipped")
            m["optim/skipped_updates"] = m.get("optim/skipped_updates", 0.0) + 1
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_opt += time.perf_counter() - t0
    model.eval()
    m["time/forward_backward_s"] = t_fb
    m["tokens/model_positions"] = float(pass_stats.get("positions", 0))
    m["time/optimizer_s"] = t_opt
    m.update(agg)
    m["optim/grad_norm"] = grad_norm
    m["optim/lr"] = optimizer.param_groups[0]["lr"]
    m.update(selection_metrics(ent_sel, token_mask, fork, low, high))
    return m


# ------------------------------------------------------------------ the loop
def adapt(config: Config) -> RunResult:
    """Run test-time adaptation as configured; returns a :class:`RunResult`.

    Example::

        from spine_ttrl import adapt, make_config
        cfg = make_config("spine", overrides={"data": {"data": "arith:2:24"}, "optim": {"steps": 2}})
        result = adapt(cfg)
        print(result.eval_before.metrics, result.eval_after.metrics)
    """
    cfg = config.validate()
    s, sp, o, ev, run = cfg.sampling, cfg.spine, cfg.optim, cfg.eval, cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    log = _Logger(run.progress)

    # Data first: bad input fails before the (slow) model load.
    examples = load_examples(cfg.data.data)
    if cfg.data.limit:
        examples = examples[:cfg.data.limit]
    task = resolve_task(examples, cfg.data.task)

    out_dir = Path(run.resume or run.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}")
    if run.resume and not (out_dir / "config.toml").exists():
        raise ValueError(f"{out_dir}: not a run directory (no config.toml) - nothing to resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The saved config describes the run itself: reusable with --config for a new run.
    saved = copy.deepcopy(cfg)
    saved.run.resume, saved.run.out = "", str(out_dir)
    _write_atomic(out_dir / "config.toml", config_mod.to_toml(saved))
    checkpoints = list_checkpoints(out_dir) if run.resume else []
    if not run.resume:  # a fresh run in an old directory: nothing of the old run may be resumed
        for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)

    lora = None
    if cfg.model.lora_r:
        targets = cfg.model.lora_target
        lora = {"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha, "dropout": cfg.model.lora_dropout,
                "target_modules": targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]}
    model, tokenizer = load_model_and_tokenizer(cfg.model.model, lora=lora)
    amp = autocast_dtype_for(cfg.model.precision)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)

    examples, prompt_ids, length_report = encode_examples(
        tokenizer, examples, task, max_prompt_tokens=cfg.data.max_prompt_tokens,
        long_prompts=cfg.data.long_prompts, system_prompt=cfg.data.system_prompt)
    log.info(length_report)
    log.info(f"{len(examples)} questions, task={task}, preset={cfg.preset}, precision={'bf16 autocast' if amp else 'fp32'}")

    eval_n = ev.eval_limit or len(examples)
    eval_kwargs = dict(max_new_tokens=ev.eval_max_new_tokens or s.max_new_tokens, num_samples=ev.eval_samples,
                       temperature=ev.eval_temperature, top_p=ev.eval_top_p, seed=run.seed + 2,
                       batch_size=s.sample_batch_size, autocast_dtype=amp)

    def run_eval(tag: str, step: int) -> EvalResult:
        t0 = time.perf_counter()
        model.eval()
        with log.bar(f"eval {tag}", unit="tok") as bar:
            res = evaluate_prompts(model, tokenizer, examples[:eval_n], prompt_ids[:eval_n], task,
                                   progress=bar, **eval_kwargs)
        res.metrics["time_s"] = time.perf_counter() - t0
        _append_jsonl(out_dir / "eval.jsonl", {"tag": tag, "step": step, **{f"eval/{k}": v for k, v in res.metrics.items()}})
        log.info(f"eval {tag}: " + format_eval(res.metrics))
        return res

    result = RunResult(out_dir=out_dir, config=cfg, model=model, tokenizer=tokenizer)

    # Frozen reference for the KL term, only when it is used.
    # With LoRA the reference is the same model with its adapter disabled: no copy needed.
    ref_model = None
    if sp.kl_coef > 0 and o.steps > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if lora is None else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, o) if params else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o)) if optimizer else None

    # Separate generators, so that evaluation or a change of selection never shifts sampling.
    sampling_gen = torch.Generator().manual_seed(run.seed)
    selection_gen = torch.Generator().manual_seed(run.seed + 1)
    order: list[int] = []
    metrics_file, samples_file = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
    G = s.num_train_samples
    start_step = 1
    warned: set[str] = set()
    band_anchor: tuple[float, float] | None = None  # band_anchor=first: edges fixed at the first update

    if checkpoints:
        state = load_checkpoint(checkpoints[-1])
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampling_gen.set_state(state["sampling_rng"])
        selection_gen.set_state(state["selection_rng"])
        order, start_step = list(state["order"]), state["step"] + 1
        for name, n in state["lines"].items():
            truncate_lines(out_dir / name, n)
        result.metrics = read_jsonl(metrics_file)
        warned = set(state.get("warned", []))
        band_anchor = tuple(state["band_anchor"]) if state.get("band_anchor") else None
        log.info(f"resumed {out_dir} from {checkpoints[-1].name}: continuing at step {start_step}")
    elif run.resume:
        log.info(f"{out_dir}: no checkpoint yet, starting the run again from step 1")
        for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
    before = [r for r in read_jsonl(out_dir / "eval.jsonl") if r.get("tag") == "before"]
    if before:
        result.eval_before = EvalResult({k[5:]: v for k, v in before[-1].items() if k.startswith("eval/")})
    elif not ev.skip_eval_before:
        result.eval_before = run_eval("before", 0)

    def save(step: int) -> None:
        lines = {n: count_lines(out_dir / n) for n in ("metrics.jsonl", "eval.jsonl", "samples.jsonl")}
        save_checkpoint(out_dir, step, {
            "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "sampling_rng": sampling_gen.get_state(),
            "selection_rng": selection_gen.get_state(), "order": list(order), "step": step,
            "lines": lines, "warned": sorted(warned),
            "band_anchor": list(band_anchor) if band_anchor else None}, keep=run.keep_checkpoints)

    for step in range(start_step, o.steps + 1):
        t_step = time.perf_counter()
        m: dict[str, float] = {"step": step}

        # ---- sample: draw this step's questions (epochs over a seeded permutation)
        q_idx = []
        while len(q_idx) < min(o.questions_per_step, len(examples)):
            if not order:
                order = torch.randperm(len(examples), generator=sampling_gen).tolist()
            q_idx.append(order.pop(0))
        model.eval()
        t0 = time.perf_counter()
        with log.bar(f"step {step}: sampling", unit="tok") as bar:
            roll = sample(model, [prompt_ids[q] for q in q_idx], num_samples=s.num_votes,
                          max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          eos_token_ids=eos_ids, pad_token_id=pad_id, generator=sampling_gen,
                          batch_size=s.sample_batch_size, progress=bar, tokenizer=tokenizer, autocast_dtype=amp,
                          return_entropy=True)
        m["time/sampling_s"] = time.perf_counter() - t0
        lengths = roll.completion_mask.sum(dim=1)
        m["completion/length_mean"] = lengths.float().mean().item()
        m["completion/truncated_fraction"] = roll.truncated.float().mean().item()
        m["completion/sampled_tokens"] = float(lengths.sum())

        # ---- vote and reward (labels, if any, only for diagnostics)
        t0 = time.perf_counter()
        answers = [extract_answer(t, task) for t in roll.texts]
        keep_rows, rewards, ratios, label_hits, reward_hits, sample_hits, skipped = [], [], [], [], [], [], 0
        for j, q in enumerate(q_idx):
            rows = list(range(j * s.num_votes, (j + 1) * s.num_votes))
            ans_q = [answers[r] for r in rows]
            vote = majority_vote(ans_q, task)
            ratios.append(vote.ratio)
            label = examples[q].answer
            truth = None
            if label is not None:
                truth = [float(a is not None and is_equivalent(a, label, task)) for a in ans_q]
                sample_hits.extend(truth)
            if label is not None and vote.label is not None:
                label_hits.append(float(is_equivalent(vote.label, label, task)))
            if vote.label is None:
                skipped += 1
                continue
            r_q = majority_rewards(ans_q, task)
            if truth is not None:
                reward_hits.extend(float(a == b) for a, b in zip(r_q, truth))
            pick = torch.randperm(s.num_votes, generator=selection_gen)[:G].sort().values.tolist()
            keep_rows.extend(rows[i] for i in pick)
            rewards.extend(r_q[i] for i in pick)
        _append_jsonl(samples_file, {
            "step": step,
            "completion_ids_sha256": hashlib.sha256(roll.completion_ids.numpy().tobytes()).hexdigest(),
            "questions": [{"id": examples[q].id, "answers": answers[j * s.num_votes:(j + 1) * s.num_votes],
                           "texts": roll.texts[j * s.num_votes:(j + 1) * s.num_votes]} for j, q in enumerate(q_idx)]})
        m["reward/mean"] = sum(rewards) / len(rewards) if rewards else float("nan")
        m["vote/majority_ratio"] = sum(ratios) / len(ratios)
        m["vote/parsed_fraction"] = sum(a is not None for a in answers) / len(answers)
        m["questions/skipped"] = float(skipped)
        if label_hits:
            m["vote/label_accuracy"] = sum(label_hits) / len(label_hits)
        if reward_hits:
            m["reward/accuracy"] = sum(reward_hits) / len(reward_hits)
        if sample_hits:
            m["vote/sample_accuracy"] = sum(sample_hits) / len(sample_hits)

        if not keep_rows or optimizer is None:
            m["optim/skipped_step"] = 1.0
            _finish_step(m, t_step, metrics_file, log)
            result.metrics.append(m)
            continue

        advantages = group_advantages(torch.tensor(rewards), G)
        m["reward/nonzero_advantage_fraction"] = (advantages.abs() > 0).float().mean().item()
        p_rows = [prompt_ids[q_idx[r // s.num_votes]] for r in keep_rows]
        c_rows = [roll.completion_ids[r][roll.completion_mask[r]].tolist() for r in keep_rows]
        batch = build_training_batch(p_rows, c_rows, pad_id)
        token_mask = batch[4]
        behaviour_entropy = roll.entropies[keep_rows, :token_mask.shape[1]]
        n_tokens = int(token_mask.sum())

        m["time/vote_s"] = time.perf_counter() - t0

        # ---- reference log-probs for the KL term (frozen initial model), no grad
        ref_logp = None
        if ref_model is not None:
            t0 = time.perf_counter()
            with (model.disable_adapter() if lora is not None else contextlib.nullcontext()):
                ref_logp = score_batch(ref_model, batch, o.micro_batch_size, temperature=s.temperature,
                                       chunk_size=o.logit_chunk_size, amp=amp)[0]
            m["time/reference_s"] = time.perf_counter() - t0

        # ---- score, select, loss, optimiser step(s)
        m.update(update_on_batch(model, optimizer, params, batch, advantages, sp, o, temperature=s.temperature,
                                 group_size=G, amp=amp, ref_logp=ref_logp, log=log,
                                 behaviour_entropy=behaviour_entropy, band_anchor=band_anchor))
        if sp.band_anchor == "first" and band_anchor is None and math.isfinite(m.get("band/anchor_low", math.nan)):
            band_anchor = (m["band/anchor_low"], m["band/anchor_high"])
            log.info(f"band anchored at [{band_anchor[0]:.4f}, {band_anchor[1]:.4f}] (pooled forking-token entropy, step {step})")
        scheduler.step()
        m["tokens/trained"] = float(n_tokens)
        _finish_step(m, t_step, metrics_file, log)
        result.metrics.append(m)

        for w in collapse_warnings(result.metrics):
            kind = w.split(":", 1)[0]
            if kind not in warned:
                warned.add(kind)
                log.info(f"warning: {w}")

        if ev.eval_every and step % ev.eval_every == 0 and step != o.steps:
            run_eval(f"step{step}", step)
        if run.save_every and step % run.save_every == 0 and step != o.steps:
            save(step)

    if o.steps > 0 or ev.skip_eval_before or result.eval_before is None:
        after = [r for r in read_jsonl(out_dir / "eval.jsonl") if r.get("tag") == "after"]
        if after and start_step > o.steps:  # resumed a run that had already finished
            result.eval_after = EvalResult({k[5:]: v for k, v in after[-1].items() if k.startswith("eval/")})
        else:
            result.eval_after = run_eval("after", o.steps)
    else:
        result.eval_after = result.eval_before
    if o.steps > 0:
        save_final_model(model, tokenizer, out_dir / "final")
        if run.save_every:
            save(o.steps)
    write_report(out_dir)
    log.info(summary_line(result))
    return result


def selection_metrics(entropies, token_mask, fork, low, high) -> dict[str, float]:
    """Entropy at forking vs other tokens, selected fraction, share of forks below/above band."""
    out: dict[str, float] = {}
    other = token_mask & ~fork
    out["tokens/selected_fraction"] = fork.sum().item() / max(int(token_mask.sum()), 1)
    out["entropy/forking_mean"] = entropies[fork].mean().item() if fork.any() else float("nan")
    out["entropy/other_mean"] = entropies[other].mean().item() if other.any() else float("nan")
    out["entropy/all_mean"] = entropies[token_mask].mean().item() if token_mask.any() else float("nan")
    if low is not None:
        has_band = ~torch.isnan(low)
        f = fork & has_band.unsqueeze(1)
        n = max(int(f.sum()), 1)
        out["band/below_fraction"] = (f & (entropies < low.unsqueeze(1))).sum().item() / n
        out["band/above_fraction"] = (f & (entropies > high.unsqueeze(1))).sum().item() / n
        out["band/low_mean"] = low[has_band].mean().item() if has_band.any() else float("nan")
        out["band/high_mean"] = high[has_band].mean().item() if has_band.any() else float("nan")
    return out


def save_final_model(model, tokenizer, path: Path) -> None:
    """Save the adapted model with ``save_pretrained`` (LoRA merged into a copy), atomically.

    The result loads with ``AutoModelForCausalLM.from_pretrained(path)``.
    """
    to_save = model
    if hasattr(model, "merge_and_unload"):  # PEFT: merge a copy, keep training the adapter
        to_save = copy.deepcopy(model).merge_and_unload()
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _lr_lambda(o):
    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine" and o.steps > o.warmup_steps:
            frac = (step - o.warmup_steps) / max(o.steps - o.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0
    return f


def _finish_step(m, t_step, metrics_file, log) -> None:
    m["time/step_s"] = time.perf_counter() - t_step
    m["tokens/per_second"] = m.get("completion/sampled_tokens", 0.0) / max(m["time/step_s"], 1e-9)
    _append_jsonl(metrics_file, m)
    keys = ["reward/mean", "vote/majority_ratio", "completion/length_mean", "loss/policy", "optim/grad_norm", "time/step_s"]
    log.info(f"step {int(m['step'])}: " + "  ".join(f"{k}={m[k]:.4g}" for k in keys if k in m))


def format_eval(metrics: dict[str, float]) -> str:
    """One line of the main evaluation numbers, each accuracy with its standard error."""
    parts = []
    for k, v in metrics.items():
        if k.endswith("_se") or k in ("questions", "time_s"):
            continue
        se = metrics.get(k + "_se")
        parts.append(f"{k}={v:.3f}" + (f"±{se:.3f}" if se is not None and not math.isnan(se) else ""))
    return "  ".join(parts)


def summary_line(result: RunResult) -> str:
    """The one-line end-of-run summary: greedy pass@1 before -> after, with standard errors."""
    def fmt(res, key):
        if res is None or key not in res.metrics:
            return "n/a"
        se = res.metrics.get(key + "_se", float("nan"))
        return f"{res.metrics[key]:.3f}±{se:.3f}"
    key = "greedy_pass@1"
    if result.eval_after is not None and key not in result.eval_after.metrics:
        key = "majority_ratio"
    return (f"done: {result.config.preset}, {len(result.metrics)} steps, {key} "
            f"{fmt(result.eval_before, key)} -> {fmt(result.eval_after, key)}; run dir {result.out_dir}")


class _Logger:
    """Progress bars (tqdm) and log lines that do not break them."""

    def __init__(self, progress: bool):
        self.progress = progress

    def info(self, msg: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(msg)

    @contextlib.contextmanager
    def bar(self, desc: str, unit: str = "it"):
        from tqdm.auto import tqdm

        with tqdm(desc=desc, unit=unit, disable=not self.progress, leave=False, dynamic_ncols=True) as pbar:
            yield pbar.update
