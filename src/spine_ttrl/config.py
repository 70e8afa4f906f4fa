"""Configuration: dataclasses grouped by concern, presets, TOML files and the generated CLI.

Every setting is a dataclass field documented exactly once, in its ``metadata["help"]``;
``spine-ttrl adapt --help`` and docs are generated from these. Precedence, lowest first:
field default < preset < ``--config`` TOML file < explicit command-line flags.

Presets (``--preset``):

- ``ttrl``: every completion token is trained, no band (TTRL).
- ``spine``: SPINE v1 — top 20 % tokens by entropy over the whole batch, band [Q10, Q50].
- ``spine-v2``: Otsu selection per response, median/MAD band.
- ``ttrv``, ``evol-rl``, ``ettrl``, ``siren``: TTRL plus the neighbour's switches (TTRV reward with
  batch advantages; EVOL-RL novelty reward; ETTRL tree rollout + EAR; SIREN anchored entropy).
- ``none``: no training, evaluation only.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field whose one-line documentation becomes its ``--help`` text."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    model: str | None = _f(None, "HF model id, local directory or .gguf file; empty = the embedded SmolLM2-135M-Instruct.")
    lora_r: int = _f(0, "LoRA rank (PEFT); 0 trains the full model.")
    lora_alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target: str = _f("all-linear", "LoRA target modules: 'all-linear' or a comma-separated list of module names.")
    device: str = _f("auto", "Where the model, reference model, KV caches, random generators and batches live: auto (the first CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N.")
    precision: str = _f("auto", "Compute precision: 'auto' = bf16 autocast where the CPU/GPU supports bf16, else fp32; weights stay fp32.", ("auto", "fp32", "bf16"))
    freeze_vision: bool = _f(True, "Vision-language models: keep the vision tower and projector fixed (the language model and its head train; LoRA goes on the language model only). No effect on text models.")


@dataclass
class DataConfig:
    data: str = _f("arith:2:16:0", "Questions: a .json/.jsonl/.csv file, a saved HF dataset directory, or 'arith:<level>[:<count>[:<seed>]]'.")
    task: str = _f("auto", "Answer type: 'math' (boxed/number answers), 'choice' (option letters), 'label' (one of a few short labels, yes/no/maybe unless the data has a labels column), 'auto' (choice if a choices column exists or the answers are letters; label if a labels column exists or every answer is yes/no/maybe; else math).", ("auto", "math", "choice", "label"))
    limit: int = _f(0, "Use only the first N questions (0 = all).")
    max_prompt_tokens: int = _f(1024, "Longest prompt (chat-formatted, in tokens) accepted.")
    long_prompts: str = _f("skip", "What to do with prompts over max_prompt_tokens: skip them, truncate (keep the last tokens) or error.", ("skip", "truncate", "error"))
    system_prompt: str = _f("", "Optional system message prepended to every chat prompt.")


@dataclass
class SamplingConfig:
    num_votes: int = _f(8, "Completions sampled per question for the majority vote.")
    num_train_samples: int = _f(8, "Completions per question kept for the update (random subset of the votes, chosen before any forward pass).")
    max_new_tokens: int = _f(160, "Longest completion, in tokens.")
    temperature: float = _f(1.0, "Sampling temperature for the votes; training log-probs and entropies use logits / temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold for the votes.")
    sample_batch_size: int = _f(64, "Rows generated at once (memory bound).")
    sampler: str = _f("builtin", "What generates the votes: builtin (our KV-cache sampler, CPU or GPU; returns the entropies selection needs) or vllm (vLLM colocated on the GPU, weights pushed after every update; the entropies then come from one no-grad pass over the kept completions). vllm needs the [vllm] extra and a CUDA device.", ("builtin", "vllm"))
    vllm_gpu_memory_utilization: float = _f(0.3, "Share of the GPU's memory vLLM may take (sampler=vllm); the rest is left to training.")
    rollout: str = _f("flat", "How the votes are drawn: flat (num_votes independent completions per question) or tree (ETTRL's entropy-fork tree, ETMR: tree_samples full completions, then tree_branches continuations from each of their tree_branch_points highest-entropy positions, the prefix shared; the vote is over all leaves, num_votes = M x (1 + N x B)). tree needs the builtin sampler.", ("flat", "tree"))
    tree_samples: int = _f(0, "rollout=tree: M, full completions sampled per question; 0 = derived, num_votes / (1 + tree_branch_points x tree_branches).")
    tree_branch_points: int = _f(1, "rollout=tree: N, highest-entropy positions of each full completion to branch at (a completion shorter than N branches at its positions in turn).")
    tree_branches: int = _f(3, "rollout=tree: B, continuations sampled from each branch point (each re-draws the token at that position).")

    def tree_shape(self) -> tuple[int, int, int]:
        """(M, N, B) of rollout=tree, M derived when ``tree_samples`` is 0 (derived value)."""
        per_sample = 1 + self.tree_branch_points * self.tree_branches
        return self.tree_samples or max(self.num_votes // per_sample, 1), self.tree_branch_points, self.tree_branches


@dataclass
class SpineConfig:
    reward: str = _f("majority", "Label-free reward of each vote: majority (1 if in the majority cluster, TTRL), frequency (share of votes for its answer, TTRV's frequency term), ttrv (frequency + 0.75 x the negative entropy of the vote, TTRV; the entropy term is the same for a whole question, so it only acts with advantage_norm=batch), leave-one-out (1 if its answer is the vote of the other votes) or novelty (EVOL-RL: majority anchor + novelty of the completion's sentence embedding within its group; needs the [evol] extra).", ("majority", "frequency", "ttrv", "leave-one-out", "novelty"))
    advantage_norm: str = _f("group", "How rewards become advantages: group (GRPO: standardised within each question's group) or batch (standardised over the whole optimiser batch, so a per-question reward offset matters).", ("group", "batch"))
    advantage_shaping: str = _f("none", "Reshaping of the advantages: none or ear (ETTRL: A x (1 + (mean_g H - H_i) / mean_g H), H_i the response's mean behaviour token entropy, mean over its question's group).", ("none", "ear"))
    selection: str = _f("top", "Which completion tokens get the policy gradient: all, top (top-rho entropy, v1) or otsu (v2).", ("all", "top", "otsu"))
    rho: float = _f(0.2, "Fraction of tokens selected by 'top' selection.")
    scope: str = _f("batch", "Pool over which 'top' selection ranks entropies: the optimiser batch, each question group, or each response.", ("batch", "group", "response"))
    selection_signal: str = _f("token", "What the selection ranks: token (each token's behaviour entropy) or window (ARES: the mean entropy of the window_size tokens starting at it). The band still acts on token entropies.", ("token", "window"))
    window_size: int = _f(5, "Tokens averaged by selection_signal=window.")
    band: str = _f("quantile", "Entropy band on forking tokens: none, quantile ([Q_low, Q_high], v1) or mad (median/MAD, v2).", ("none", "quantile", "mad"))
    band_low_q: float = _f(0.1, "Lower band quantile (band=quantile).")
    band_high_q: float = _f(0.5, "Upper band quantile (band=quantile).")
    beta_low: float = _f(0.1, "Band weight for forking tokens below the band (pushes entropy up). The paper gives no value; 0.1 was the best of 0.1, 0.3 and 1 on the long benchmark's tuning set (docs/benchmarks/long.md).")
    beta_up: float = _f(0.1, "Band weight for forking tokens above the band (pushes entropy down). The paper gives no value; 0.1 as beta_low.")
    band_anchor: str = _f("none", "Where the band edges come from: none = from each response's own forking tokens at every update (the paper); first = pooled over all forking tokens of the first update, then fixed for the run (a SIREN-style anchor, our option: the per-response band keeps half of every response's forks above its median).", ("none", "first"))
    band_rows: str = _f("all", "Which responses the band acts on: all (the paper: also when every advantage is 0, so the band alone moves the model on a step where every rollout agreed) or contested (our option: only responses with a non-zero advantage, i.e. questions whose rollouts disagree; no reward signal, no band).", ("all", "contested"))
    kl_coef: float = _f(0.0, "Coefficient λ_KL of the k3 KL to the frozen initial model (0 = off, no reference model kept). The paper's objective has the term but gives no value; the spine preset sets 0.1, the only setting on the long benchmark's tuning set that kept the forking tokens' entropy (docs/benchmarks/long.md).")
    kl_tokens: str = _f("selected", "Tokens the KL is computed on: the selected (forking) tokens or all completion tokens.", ("selected", "all"))
    token_weights: str = _f("none", "Per-token weights on the policy term: none or steer (STEER: from the first-order entropy-change estimate |A/pi_old x p(1-p)(log p + H)| of each selected token, mapped to [0.8, 1.2], largest change smallest weight; computed once per batch from the behaviour policy, costs one no-grad scoring pass).", ("none", "steer"))
    entropy_reg: str = _f("none", "Entropy regulariser added to the loss: none, anchored (SIREN: entropy_reg_coef x the mean squared gap between the top-p nucleus entropy and its mean at the first update, at the positions above the entropy_reg_quantile of each batch's token entropies; the first update measures the anchor) or adaptive (Skywork-OR1: an entropy bonus -coef x mean token entropy, coef starting at entropy_reg_coef and moved by entropy_coef_delta toward keeping the entropy at entropy_target; applied only while the batch's entropy is at or below the target).", ("none", "anchored", "adaptive"))
    entropy_reg_coef: float = _f(0.01, "entropy_reg=anchored: weight of the penalty; adaptive: initial bonus coefficient.")
    entropy_reg_quantile: float = _f(0.8, "entropy_reg=anchored: positions whose token entropy is above this quantile of the batch's completion tokens are regularised.")
    entropy_reg_top_p: float = _f(0.95, "entropy_reg=anchored: nucleus mass of the regularised entropy (renormalised over the top-p tokens).")
    entropy_target: float = _f(0.2, "entropy_reg=adaptive: target mean token entropy, in nats.")
    entropy_coef_delta: float = _f(0.005, "entropy_reg=adaptive: change of the coefficient per step.")
    entropy_coef_max: float = _f(1.0, "entropy_reg=adaptive: largest coefficient.")


@dataclass
class OptimConfig:
    steps: int = _f(4, "Optimiser batches (adaptation steps) to run.")
    questions_per_step: int = _f(4, "Questions sampled per step (optimiser batch = questions x num_train_samples completions).")
    micro_batch_size: int = _f(8, "Completions per forward/backward pass (gradient accumulation over the optimiser batch); on CPU 8 rows run as fast as 16 with a third less peak memory.")
    updates_per_batch: int = _f(1, "Optimiser updates on each sampled batch (PPO epochs); > 1 makes the ratio differ from 1 so the clip acts.")
    lr: float = _f(2e-5, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    schedule: str = _f("constant", "Learning-rate schedule after warm-up.", ("constant", "cosine"))
    clip_eps: float = _f(0.2, "PPO clip range epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    skip_empty_steps: bool = _f(False, "Built-in engine: skip the optimiser step when the batch's gradient is exactly zero (every advantage 0, as when all rollouts of every question agree under the majority reward, and no band, KL or entropy-regulariser term acts on any row). Off, AdamW still steps on such a batch and its momentum keeps moving the weights along the earlier steps' direction, about 0.9x the last step's size, with no learning signal (measured in the long benchmark: weight change 0.04-0.11 on its zero-gradient steps, 0.05-0.12 on the other steps after the eighth, decaying about 0.9x per step over consecutive zero-gradient steps). Off by default: the usual behaviour, an optimiser step on every batch.")
    diagnostics: bool = _f(False, "Also log the size of each update (weight change norm, KL(new||old) on the batch after the update) and the gradient norm of each loss term separately; costs one extra no-grad pass and one backward per loss term.")
    diagnostics_every: int = _f(1, "With diagnostics: compute them on steps 1, 1 + k, 1 + 2k, ... only (the other steps run one backward and no extra pass; the update is the same either way, up to floating-point rounding).")
    skip_inert_rows: bool = _f(True, "Built-in engine: skip the forward and backward passes of a micro-batch whose completions carry no loss term: zero advantage (a question whose rollouts all agree, under the majority reward), no band on them, no KL and no entropy regulariser. Their gradient is exactly zero, so the update is the same bit for bit, only faster once the majority saturates. Not on diagnostics steps (which measure every row).")
    logit_chunk_size: int = _f(128, "Rows per chunk in the chunked log-prob/entropy computation (bounds logits memory: chunk x vocabulary floats).")


@dataclass
class EvalConfig:
    eval_every: int = _f(0, "Evaluate every N steps during adaptation (0 = only before and after).")
    eval_limit: int = _f(0, "Evaluate on the first N questions only (0 = all adapted questions).")
    eval_samples: int = _f(4, "Samples per question for avg@k, maj@k and pass@k (0 = greedy only).")
    eval_every_samples: int = _f(-1, "Samples per question at the evaluations during adaptation (eval_every): -1 = eval_samples, 0 = greedy only (cheapest; sampled metrics before and after only).")
    eval_temperature: float = _f(0.6, "Temperature of the sampled evaluation.")
    eval_top_p: float = _f(0.95, "Top-p of the sampled evaluation.")
    eval_max_new_tokens: int = _f(0, "Longest evaluation completion (0 = same as max_new_tokens).")
    skip_eval_before: bool = _f(False, "Skip the evaluation before adaptation.")
    before_from: str = _f("", "Reuse the evaluation before adaptation of this run directory instead of computing it: it must have been made with the same model, data, evaluation and sampling-batch settings, seed, threads and engine, computed in the same precision on the same kind of device (checked; any difference is an error), so it is the evaluation this run would make. Saves the sampled evaluation of the base model when several runs start from it.")


@dataclass
class RunConfig:
    out: str = _f("", "Run directory (default runs/<time>-<preset>).")
    seed: int = _f(0, "Seed of the sampling, selection and evaluation random generators.")
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")
    mmap_threshold_mb: int = _f(1, "On the CPU under Linux (glibc): allocations of at least this many MiB are served by mmap and returned to the system when freed (mallopt M_MMAP_THRESHOLD; a MALLOC_MMAP_THRESHOLD_ environment variable wins). Measured on Qwen2.5-0.5B (LoRA, 4 rows of 470 tokens per micro-batch): the update's peak resident memory 12.0-13.7 GiB with glibc's default, 9.3 GiB at 8, 7.1 GiB at 1; the update took 313-316 s, 342 s and 359-364 s (page faults of fresh memory), sampling 7 per cent longer at 1. 0 = glibc's default.")
    save_every: int = _f(0, "Save a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "How many recent checkpoints to keep.")
    resume: str = _f("", "Run directory of an interrupted run to continue.")
    progress: bool = _f(True, "Show progress bars.")
    engine: str = _f("builtin", "What trains: builtin (spine-ttrl's own single-process engine, CPU or one GPU) or trl (SpineGRPOTrainer on TRL's GRPOTrainer: the same method and run directory, many GPUs/nodes with torchrun or accelerate launch; needs the [trl] extra).", ("builtin", "trl"))


@dataclass
class Config:
    """All settings of an adaptation or evaluation run."""

    preset: str = _f("spine", "Method preset: ttrl, spine (v1), spine-v2, the neighbours ttrv, evol-rl, ettrl, siren (TTRL plus their switches; docs/algorithm.md), or none (evaluation only).", ("ttrl", "spine", "spine-v2", "ttrv", "evol-rl", "ettrl", "siren", "none"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    spine: SpineConfig = field(default_factory=SpineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        """Check cross-field constraints; raise ValueError with a one-line message."""
        s, o = self.sampling, self.optim
        checks = [
            (s.num_votes >= 1, "num_votes must be >= 1"),
            (1 <= s.num_train_samples <= s.num_votes, f"num_train_samples ({s.num_train_samples}) must be between 1 and num_votes ({s.num_votes})"),
            (s.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (s.temperature >= 0, "temperature must be >= 0"),
            (0 < s.top_p <= 1, "top_p must be in (0, 1]"),
            (0 < s.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization must be in (0, 1)"),
            (s.tree_samples >= 0 and min(s.tree_branch_points, s.tree_branches) >= 1,
             "tree_samples must be >= 0, tree_branch_points and tree_branches >= 1"),
            (s.rollout == "flat" or s.num_votes == s.tree_shape()[0] * (1 + s.tree_branch_points * s.tree_branches),
             f"rollout=tree: num_votes ({s.num_votes}) must be the leaves per question, tree_samples x "
             f"(1 + tree_branch_points x tree_branches) = "
             + (f"{s.tree_samples * (1 + s.tree_branch_points * s.tree_branches)}" if s.tree_samples else
                f"a multiple of {1 + s.tree_branch_points * s.tree_branches} (tree_samples 0 derives it)")),
            (s.rollout == "flat" or s.sampler == "builtin", "rollout=tree needs sampler=builtin (it branches on the sampler's entropies)"),
            (not (self.eval.skip_eval_before and self.eval.before_from), "skip_eval_before and before_from exclude each other"),
            (0 <= self.spine.rho <= 1, "rho must be in [0, 1]"),
            (0 <= self.spine.band_low_q <= self.spine.band_high_q <= 1, "need 0 <= band_low_q <= band_high_q <= 1"),
            (self.spine.band_anchor == "none" or self.spine.band != "none", "band_anchor=first needs a band (band=quantile or mad)"),
            (self.spine.band_rows == "all" or self.spine.band != "none", "band_rows=contested needs a band (band=quantile or mad)"),
            (self.spine.window_size >= 1, "window_size must be >= 1"),
            (0 <= self.spine.entropy_reg_quantile < 1, "entropy_reg_quantile must be in [0, 1)"),
            (0 < self.spine.entropy_reg_top_p <= 1, "entropy_reg_top_p must be in (0, 1]"),
            (min(self.spine.entropy_reg_coef, self.spine.entropy_coef_delta, self.spine.entropy_coef_max) >= 0,
             "entropy_reg_coef, entropy_coef_delta and entropy_coef_max must be >= 0"),
            (min(self.spine.beta_low, self.spine.beta_up, self.spine.kl_coef) >= 0,
             "beta_low, beta_up and kl_coef must be >= 0"),
            (self.spine.entropy_target >= 0, "entropy_target must be >= 0"),
            (o.steps >= 0, "steps must be >= 0"),
            (o.questions_per_step >= 1, "questions_per_step must be >= 1"),
            (o.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (o.updates_per_batch >= 1, "updates_per_batch must be >= 1"),
            (o.diagnostics_every >= 1, "diagnostics_every must be >= 1"),
            (o.lr >= 0, "lr must be >= 0"),
            (o.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
            (o.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (o.clip_eps >= 0, "clip_eps must be >= 0"),
            (o.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 = off)"),
            (o.logit_chunk_size >= 1, "logit_chunk_size must be >= 1"),
            (s.sample_batch_size >= 1, "sample_batch_size must be >= 1"),
            (self.data.limit >= 0, "limit must be >= 0 (0 = all)"),
            (self.data.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1"),
            (min(self.eval.eval_every, self.eval.eval_limit, self.eval.eval_max_new_tokens) >= 0,
             "eval_every, eval_limit and eval_max_new_tokens must be >= 0"),
            (self.eval.eval_temperature >= 0, "eval_temperature must be >= 0"),
            (0 < self.eval.eval_top_p <= 1, "eval_top_p must be in (0, 1]"),
            (min(self.run.threads, self.run.save_every) >= 0, "threads and save_every must be >= 0"),
            (self.eval.eval_samples >= 0, "eval_samples must be >= 0"),
            (self.eval.eval_every_samples >= -1, "eval_every_samples must be >= -1"),
            (self.model.lora_r >= 0, "lora_r must be >= 0"),
            (self.model.lora_alpha > 0, "lora_alpha must be > 0"),
            (0 <= self.model.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (0 <= self.run.mmap_threshold_mb <= 1024, "mmap_threshold_mb must be between 0 and 1024"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.model.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.model.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.preset != "none" and s.temperature == 0:
            raise ValueError("temperature 0 (greedy) gives identical votes: adaptation needs temperature > 0")
        return self


#: Preset overrides, applied over the defaults (section -> field -> value).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ttrl": {"spine": {"selection": "all", "band": "none", "kl_tokens": "all"}},
    "spine": {"spine": {"selection": "top", "rho": 0.2, "scope": "batch", "band": "quantile", "band_low_q": 0.1, "band_high_q": 0.5, "kl_tokens": "selected", "kl_coef": 0.1}},
    "spine-v2": {"spine": {"selection": "otsu", "band": "mad", "kl_tokens": "selected"}},
    # The neighbours (paper §6): TTRL's all-token loss plus each paper's own switches.
    "ttrv": {"spine": {"selection": "all", "band": "none", "kl_tokens": "all", "reward": "ttrv", "advantage_norm": "batch"}},
    "evol-rl": {"spine": {"selection": "all", "band": "none", "kl_tokens": "all", "reward": "novelty"}},
    "ettrl": {"sampling": {"rollout": "tree", "tree_samples": 0, "tree_branch_points": 1, "tree_branches": 3},
              "spine": {"selection": "all", "band": "none", "kl_tokens": "all", "advantage_shaping": "ear"}},
    "siren": {"spine": {"selection": "all", "band": "none", "kl_tokens": "all", "entropy_reg": "anchored",
                        "entropy_reg_coef": 0.01, "entropy_reg_quantile": 0.8, "entropy_reg_top_p": 0.95}},
    "none": {"optim": {"steps": 0}},
}

_SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "preset"]


def _section_types() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {name: hints[name] for name in _SECTIONS}


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "config") -> Config:
    """Set fields from a nested mapping {section: {field: value}} (or top-level ``preset``).

    Unknown sections or fields, and values outside a field's choices, raise ValueError naming
    them and the ``source``.
    """
    for key, value in overrides.items():
        if key == "preset":
            cfg.preset = value
            continue
        if key not in _SECTIONS or not isinstance(value, dict):
            raise ValueError(f"{source}: unknown section [{key}] (expected one of {', '.join(_SECTIONS)})")
        section = getattr(cfg, key)
        names = {f.name: f for f in dataclasses.fields(section)}
        for fname, fval in value.items():
            if fname not in names:
                raise ValueError(f"{source}: unknown setting {key}.{fname}")
            val = _coerce(fval, type(section), fname, f"{source}: {key}.{fname}")
            choices = names[fname].metadata.get("choices")
            if choices is not None and val not in choices:
                raise ValueError(f"{source}: {key}.{fname} must be one of {', '.join(map(str, choices))}, got {val!r}")
            setattr(section, fname, val)
    return cfg


def _coerce(value, cls, fname, where):
    hint = get_type_hints(cls)[fname]
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is not None else [hint]
    target = args[0]
    if value is None:
        return None
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    if isinstance(value, str):
        try:
            return target(value)
        except ValueError:
            pass
    raise ValueError(f"{where}: expected {target.__name__}, got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing file or bad syntax raises ValueError (one line)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested dict (None values dropped, so it can be written as TOML)."""
    out: dict[str, Any] = {"preset": cfg.preset}
    for name in _SECTIONS:
        out[name] = {k: v for k, v in dataclasses.asdict(getattr(cfg, name)).items() if v is not None}
    return out


def to_toml(cfg: Config) -> str:
    """Render the resolved config as TOML (flat sections of scalars)."""
    lines = [f'preset = "{cfg.preset}"']
    for section, values in to_dict(cfg).items():
        if section == "preset":
            continue
        lines.append(f"\n[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v!r}")
            else:
                escaped = str(v).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{k} = "{escaped}"')
    return "\n".join(lines) + "\n"


def make_config(preset: str = "spine", config_file: str | None = None, overrides: dict | None = None) -> Config:
    """Build a validated Config: defaults, then the preset, then a TOML file, then overrides.

    ``overrides`` is a nested mapping like ``{"optim": {"lr": 1e-5}}``. A preset named in the
    TOML file (top-level ``preset = "..."``) is applied before that file's other settings.
    """
    file_values = load_toml(config_file) if config_file else {}
    preset = (overrides or {}).get("preset") or file_values.get("preset") or preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    cfg = Config(preset=preset)
    apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if file_values:
        apply_overrides(cfg, {k: v for k, v in file_values.items() if k != "preset"}, str(config_file))
    if overrides:
        apply_overrides(cfg, {k: v for k, v in overrides.items() if k != "preset"}, "command line")
    cfg.preset = preset
    return cfg.validate()


# ------------------------------------------------------------------ CLI generation
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: The settings ``spine-ttrl eval`` uses (section -> fields); the others only matter for adaptation.
EVAL_SETTINGS: dict[str, tuple[str, ...]] = {
    "model": ("model", "device", "precision"),
    "data": ("data", "task", "limit", "max_prompt_tokens", "long_prompts", "system_prompt"),
    "sampling": ("max_new_tokens", "sample_batch_size"),
    "eval": ("eval_limit", "eval_samples", "eval_temperature", "eval_top_p", "eval_max_new_tokens"),
    "run": ("out", "seed", "threads", "progress"),
}


def _field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _field_type(cls: type, name: str) -> type:
    hint = get_type_hints(cls)[name]
    return ([a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is not None else [hint])[0]


def add_config_arguments(parser: argparse.ArgumentParser, only: dict[str, tuple[str, ...]] | None = None) -> None:
    """Add one ``--flag`` per config field, help text from the field's documentation.

    ``only`` restricts the flags to some fields (section -> field names) and leaves out
    ``--preset`` (used for ``spine-ttrl eval``). Defaults are left as None on the parser so that
    only flags the user typed override the preset and the config file; the help shows each
    field's built-in default.
    """
    parser.add_argument("--config", help="TOML file of settings ([section] tables as in config.toml of a run).")
    if only is None:
        pf = next(f for f in dataclasses.fields(Config) if f.name == "preset")
        parser.add_argument("--preset", choices=pf.metadata["choices"], default=None,
                            help=pf.metadata["help"] + " (default: spine)")
    for section, cls in _section_types().items():
        if only is not None and section not in only:
            continue
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only[section]:
                continue
            typ = _field_type(cls, f.name)
            help_text = f"{f.metadata['help']} (default: {_field_default(f)!r})"
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": None, "help": help_text}
            if typ is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif "choices" in f.metadata:
                kwargs.update(type=typ, choices=f.metadata["choices"])
            else:
                kwargs.update(type=typ, metavar=typ.__name__.upper())
            group.add_argument(_flag(f.name), **kwargs)


def configuration_markdown() -> str:
    """``docs/configuration.md``: every setting with its flag, type, default and documentation,
    and what each preset changes. Generated from the dataclasses (``python scripts/write_config_docs.py``)."""
    lines = ["# Configuration", "",
             "Every setting of `spine-ttrl adapt`, generated from the config dataclasses in",
             "`src/spine_ttrl/config.py` (regenerate with `python scripts/write_config_docs.py`; a test fails",
             "when this file is stale). Set a value with its flag, in a TOML file passed with `--config`",
             "(`[section]` tables, as in a run's `config.toml`), or in Python with",
             "`make_config(preset, overrides={section: {name: value}})`. Precedence, lowest first:",
             "default < preset < `--config` file < flags. `spine-ttrl eval` takes the settings marked *eval*.",
             "", "## Presets", "", "| preset | sets |", "|---|---|"]
    for name, values in PRESETS.items():
        sets = "; ".join(f"`{sec}.{k} = {v!r}`" for sec, kv in values.items() for k, v in kv.items())
        lines.append(f"| `{name}` | {sets} |")
    for section, cls in _section_types().items():
        lines += ["", f"## `[{section}]`", "", "| setting | flag | type | default | description |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            choices = f" One of: {', '.join(f'`{c}`' for c in f.metadata['choices'])}." if "choices" in f.metadata else ""
            mark = " *eval*" if f.name in EVAL_SETTINGS.get(section, ()) else ""
            text = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| `{f.name}`{mark} | `{_flag(f.name)}` | {_field_type(cls, f.name).__name__} | "
                         f"`{_field_default(f)!r}` | {text}{choices} |")
    return "\n".join(lines) + "\n"


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """Collect the flags the user actually gave into a nested override mapping."""
    out: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if "." not in key or value is None:
            continue
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    if getattr(ns, "preset", None):
        out["preset"] = ns.preset
    return out
