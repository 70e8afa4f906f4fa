"""SPINE / TTRL as a Hugging Face TRL trainer: ``SpineGRPOConfig`` and ``SpineGRPOTrainer``.

A thin adapter: TRL generates, gathers, splits and steps; the method's math is spine-ttrl's own
pure functions, called from two TRL hooks.

- **Reward** (``_calculate_rewards``): the label-free vote. Each process extracts the answers of
  its local completions (:func:`spine_ttrl.answers.extract_answer`); the answers are gathered
  (``accelerate.utils.gather_object``) so that a group of ``num_generations`` completions split
  over processes is voted on whole, once, on the main process
  (:data:`spine_ttrl.rewards.REWARDS`), and the rewards are broadcast back in TRL's gathered
  shape ``(num_processes × local rows, 1)``. No ``reward_funcs`` are needed.
- **Selection and band** (after ``_generate_and_score_completions``): one no-grad pass of the
  current (= behaviour) policy over the process's whole generation batch gives the behaviour
  entropies; they are gathered across processes (padded to a common length), and the forking mask
  (:func:`spine_ttrl.selection.select_tokens`) and the band edges
  (:data:`spine_ttrl.losses.BANDS`) are computed on that pool -- the *whole generation batch of
  all processes* (``generation_batch_size`` completions), before TRL shuffles and splits it into
  ``steps_per_generation`` micro-batches. Each process keeps its rows. This pass is skipped for
  ``selection="all"`` with ``band="none"`` (nothing to select).
- **Loss** (``_compute_loss``): log-probs and entropies *with gradient* from TRL's fused LM head
  (``_get_per_token_logps_and_entropies(..., compute_entropy=True)``; in TRL 1.16 its entropy
  output is differentiable), then :func:`~spine_ttrl.losses.policy_loss`,
  :func:`~spine_ttrl.losses.band_penalty` and :func:`~spine_ttrl.losses.kl_penalty` with TRL's
  normaliser for ``loss_type`` (table below).

Normalisers. Every loss type is written as per-row weights w_i and one scalar Z per micro-batch,
term = Σ_{i,t} w_i · m_{i,t} · ℓ_{i,t} / Z (ℓ the per-token policy, band or KL value):

==========  =========  ==============================================================
loss_type   w_i        Z (``accum`` = gradient-accumulation steps in training, else 1)
==========  =========  ==============================================================
``dapo``    1          num_items_in_batch / num_processes × accum / steps_per_generation
``bnpo``    1          completion tokens of the micro-batch × accum
``dr_grpo`` 1          rows of the micro-batch × max_completion_length × accum
``grpo``    1 / |y_i|  rows of the micro-batch × accum
==========  =========  ==============================================================

``dapo`` (TRL's default) is the built-in engine's convention: policy and band divided by all
completion tokens of the optimiser batch. Other loss types (``cispo``, ``sapo``, ``luspo``,
``vespo``) are refused. Positive row weights are applied by scaling the advantages (policy:
min(ρ·cA, clip(ρ)·cA) = c·min(ρA, clip(ρ)A)) and the entropies and band edges (band:
relu(c·low − c·H) = c·relu(low − H)); TRL's vLLM importance-sampling ratio (≥ 0, per token) scales
the advantages the same way, as TRL does (policy term only). The KL term uses the same w_i and Z,
times the share of selected tokens in the pool when ``kl_tokens="selected"`` -- with ``dapo``
that is the engine's "divide by the tokens the KL is computed on". With selection ``all``, no band
and ``kl_tokens="all"`` the loss equals ``GRPOTrainer._compute_loss`` (tested).

Difference from TRL's own ``top_entropy_quantile``: TRL keeps the tokens at or above the
``1 − ρ`` quantile of one micro-batch (about 1 + ⌊ρ(n − 1)⌋ of n tokens, more with ties) and
computes it from the entropies of the gradient pass; here the k = ⌈ρn⌉ highest behaviour entropies
of the whole generation batch are kept, exactly k (ties by index).

Not supported (ValueError at config time): TRL's ``beta`` (use ``kl_coef``), ``top_entropy_quantile``
(use ``selection``/``rho``), ``entropy_coef``/adaptive entropy (use the band), ``delta``,
asymmetric ``epsilon_high``, ``importance_sampling_level="sequence"``, ``off_policy_mask_threshold``,
``use_bias_correction_kl``, and ``num_votes`` different from ``num_generations`` (votes ≠
samples: use the built-in engine). Text-only models (vision inputs are passed through untested).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

try:
    import trl  # noqa: F401
except ImportError as e:  # tested by simulating a missing trl
    raise ImportError("spine_ttrl.integrations.trl needs TRL: pip install 'spine-ttrl[trl]'") from e

import torch
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from ..answers import TASKS, extract_answer, majority_vote
from ..losses import BANDS, band_penalty, kl_penalty, policy_loss
from ..rewards import REWARDS
from ..selection import SELECTIONS, select_tokens

# The public API. The pure helpers below (vote_groups, gathered_group_rewards, SUPPORTED_LOSS_TYPES)
# are importable for tests and other adapters but not part of it.
__all__ = ["SpineGRPOConfig", "SpineGRPOTrainer"]

SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "dr_grpo", "grpo")
"""TRL ``loss_type`` values whose normaliser :class:`SpineGRPOTrainer` reproduces."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SpineGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus spine-ttrl's settings (same names and meaning as ``SpineConfig``).

    ``loss_type`` must be one of :data:`SUPPORTED_LOSS_TYPES` (TRL's default ``dapo`` is the
    built-in engine's normaliser). See the module docstring for what is refused and why.
    """

    # TRL's default True multiplies its KL by the (differentiable) importance ratio; our k3 KL is the
    # built-in engine's plain one, so the default is False here and True is refused with kl_coef > 0.
    use_bias_correction_kl: bool = _f(False, "TRL's importance-ratio correction of the KL term: not supported by SpineGRPOTrainer (must stay False when kl_coef > 0).")

    selection: str = _f("top", "Which completion tokens get the policy gradient: all (TTRL), top (top-rho behaviour entropy, SPINE v1) or otsu (per-response Otsu split, SPINE v2).")
    rho: float = _f(0.2, "Share of the pool's tokens selected by selection=top: k = ceil(rho * n).")
    scope: str = _f("batch", "Pool of selection=top: batch (the whole generation batch of all processes), group (each prompt's num_generations completions) or response.")
    band: str = _f("quantile", "Entropy band on forking tokens: none, quantile ([Q_band_low_q, Q_band_high_q] per response, v1) or mad (median/MAD, v2).")
    band_low_q: float = _f(0.1, "Lower band quantile (band=quantile).")
    band_high_q: float = _f(0.5, "Upper band quantile (band=quantile).")
    beta_low: float = _f(1.0, "Band weight for forking tokens below the band (pushes their entropy up).")
    beta_up: float = _f(1.0, "Band weight for forking tokens above the band (pushes their entropy down).")
    kl_coef: float = _f(0.0, "Coefficient of the masked k3 KL to the frozen initial model (0 = off). Use this, not TRL's beta (which must stay 0); > 0 keeps a reference: a frozen copy of a model instance, TRL's reload of a model id, or the disabled adapters of a PEFT model.")
    kl_tokens: str = _f("selected", "Tokens the KL is computed on: selected (forking) tokens or all completion tokens.")
    reward: str = _f("majority", "Label-free reward: majority (1 if the answer is in the group's majority cluster, TTRL) or frequency (share of the group's votes for the answer).")
    task: str = _f("math", "Answer format for extraction and voting: math (boxed / 'answer is' / last number) or choice (option letter A-J).")
    num_votes: int | None = _f(None, "Completions per prompt that vote; None = num_generations. Only num_generations is supported here (votes != samples needs the built-in engine).")

    def __post_init__(self):
        super().__post_init__()
        choices = {"selection": tuple(SELECTIONS), "scope": ("batch", "group", "response"), "band": tuple(BANDS),
                   "kl_tokens": ("selected", "all"), "reward": tuple(REWARDS), "task": TASKS,
                   "loss_type": SUPPORTED_LOSS_TYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        checks = [
            (0.0 <= self.rho <= 1.0, f"rho must be in [0, 1], got {self.rho}"),
            (0.0 <= self.band_low_q <= self.band_high_q <= 1.0, "need 0 <= band_low_q <= band_high_q <= 1"),
            (self.kl_coef >= 0.0, f"kl_coef must be >= 0, got {self.kl_coef}"),
            (self.num_votes in (None, self.num_generations),
             f"num_votes ({self.num_votes}) must be None or num_generations ({self.num_generations}); votes != "
             "samples is only in the built-in engine"),
            (self.beta == 0.0, "set kl_coef, not beta: SpineGRPOTrainer computes its own (masked) KL"),
            (self.top_entropy_quantile == 1.0, "top_entropy_quantile is TRL's own forking mask: use selection='top' and rho"),
            (self.entropy_coef == 0.0 and not self.use_adaptive_entropy, "entropy_coef / use_adaptive_entropy: use the entropy band (band=...) instead"),
            (self.delta is None, "delta (two-sided clipping) is not supported by SpineGRPOTrainer"),
            (self.epsilon_high is None or self.epsilon_high == self.epsilon, "asymmetric epsilon_high is not supported: the clip is symmetric (epsilon)"),
            (self.importance_sampling_level == "token", "importance_sampling_level must be 'token'"),
            (self.off_policy_mask_threshold is None, "off_policy_mask_threshold is not supported by SpineGRPOTrainer"),
            (not (self.use_bias_correction_kl and self.kl_coef > 0), "use_bias_correction_kl is not supported with kl_coef > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# The vote over whole groups (pure: answers in, rewards out)
# ---------------------------------------------------------------------------------------------


def vote_groups(answers: Sequence[str | None], group_size: int, reward: str = "majority",
                task: str = "math") -> tuple[list[float], list[float]]:
    """Rewards and majority ratios of consecutive groups of ``group_size`` extracted answers.

    Rows ``g·G .. g·G + G − 1`` are prompt g's completions (TRL's order). Returns
    ``(rewards, ratios)``: one reward per answer (``REWARDS[reward](group, task)``) and one
    majority ratio per group (:func:`spine_ttrl.answers.majority_vote`).
    """
    if group_size < 1 or len(answers) % group_size:
        raise ValueError(f"{len(answers)} answers are not whole groups of {group_size}")
    fn = REWARDS[reward]
    rewards: list[float] = []
    ratios: list[float] = []
    for start in range(0, len(answers), group_size):
        group = list(answers[start:start + group_size])
        rewards.extend(float(r) for r in fn(group, task=task))
        ratios.append(majority_vote(group, task=task).ratio)
    return rewards, ratios


def gathered_group_rewards(local_answers: Sequence[str | None], group_size: int, *, reward: str = "majority",
                           task: str = "math", gather: Callable[[list], list] | None = None,
                           broadcast: Callable[[list], list] | None = None,
                           is_main: bool = True) -> tuple[list[float], list[float]]:
    """The vote of :func:`vote_groups` over the answers of *all* processes, computed once.

    ``gather(list) -> list`` concatenates every process's list in process order (accelerate's
    ``gather_object``); ``broadcast([obj]) -> [obj]`` sends the main process's object to all
    (``broadcast_object_list``). Both None = one process. Returns the gathered
    ``(rewards, ratios)`` on every process; rewards are in gathered row order.
    """
    answers = gather(list(local_answers)) if gather is not None else list(local_answers)
    payload = [vote_groups(answers, group_size, reward, task) if is_main else None]
    if broadcast is not None:
        payload = broadcast(payload)
    return payload[0]


def _completion_text(completion) -> str:
    """A TRL completion as text: a string, or the text of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, list):  # content blocks
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        parts.append(content or "")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class SpineGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the label-free majority reward, SPINE's forking-token selection,
    entropy band and masked KL (see the module docstring for the exact pools and normalisers).

    Example (``pip install 'spine-ttrl[trl]'``; ``accelerate launch train.py`` for many GPUs)::

        from datasets import Dataset
        from spine_ttrl.integrations.trl import SpineGRPOConfig, SpineGRPOTrainer

        questions = ["What is 12 * 7? Put the answer in \\\\boxed{}.", "What is 3 + 4 * 5?"]
        ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
        args = SpineGRPOConfig(output_dir="out", num_generations=8, per_device_train_batch_size=8,
                               max_completion_length=256, learning_rate=1e-6,
                               selection="top", rho=0.2, band="quantile")  # SPINE v1
        trainer = SpineGRPOTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=args, train_dataset=ds)
        trainer.train()

    No ``reward_funcs``: the reward is the vote of each prompt's ``num_generations`` completions
    (reference answers in the dataset, if any, are not used). Logged (TRL's ``self._metrics``,
    same names as the built-in engine): ``reward/mean``, ``vote/majority_ratio``,
    ``tokens/selected_fraction``, ``entropy/forking_mean`` (and the other ``entropy/``, ``band/``
    metrics of the built-in engine), ``loss/policy``, ``loss/band``, ``loss/kl``.
    """

    def __init__(self, model, reward_funcs=None, args: SpineGRPOConfig | None = None, **kwargs):
        if args is None:
            args = SpineGRPOConfig(output_dir="spine-grpo")
        if not isinstance(args, SpineGRPOConfig):
            raise TypeError("SpineGRPOTrainer needs args=SpineGRPOConfig(...), got " + type(args).__name__)
        if reward_funcs is not None:
            raise ValueError("SpineGRPOTrainer computes its own label-free reward (args.reward); pass no reward_funcs")
        # The reference model for kl_coef > 0. TRL builds it (or a PEFT "ref" adapter / disabled
        # adapters) only when beta != 0, and for a model *instance* reloads it from the config's hub
        # id, which a model built in memory does not have. So: a model instance without PEFT gets a
        # frozen deep copy taken now, before TRL patches its forward; a hub id or a PEFT model goes
        # through TRL's own path with beta raised for the constructor. Afterwards self.beta stays
        # non-zero so that TRL computes ref log-probs at generation time; args.beta is back to 0 and
        # TRL's beta term is never used (our _compute_loss replaces TRL's).
        kl_on = args.kl_coef > 0
        own_ref = None
        if kl_on and not isinstance(model, str) and not is_peft_model(model) and kwargs.get("peft_config") is None:
            own_ref = copy.deepcopy(model)
        args.beta = args.kl_coef if kl_on and own_ref is None else 0.0
        try:
            super().__init__(model, [_label_free_reward(args.reward)], args, **kwargs)
        finally:
            args.beta = 0.0
        if own_ref is not None:
            self.ref_model = self._prepare_reference(own_ref)
        self.beta = args.kl_coef if kl_on else 0.0

    def _prepare_reference(self, ref):
        """Freeze a copy of the initial model and prepare it as TRL prepares its reference model."""
        ref.eval().requires_grad_(False)
        if self.args.disable_dropout:
            disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref, self.accelerator)
        return self.accelerator.prepare_model(ref, evaluation_mode=True)

    # --- reward --------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """The vote over whole groups; returns TRL's gathered ``(num_processes × rows, 1)`` rewards."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        local = [extract_answer(_completion_text(c), args.task) for c in completions]
        multi = self.accelerator.num_processes > 1
        rewards, ratios = gathered_group_rewards(
            local, group, reward=args.reward, task=args.task,
            gather=gather_object if multi else None,
            broadcast=(lambda obj: broadcast_object_list(obj, from_process=0)) if multi else None,
            is_main=self.accelerator.is_main_process)
        self._metrics[mode]["vote/majority_ratio"].append(sum(ratios) / max(len(ratios), 1))
        self._metrics[mode]["reward/mean"].append(sum(rewards) / max(len(rewards), 1))
        return torch.tensor(rewards, dtype=torch.float32, device=self.accelerator.device).unsqueeze(1)

    # --- selection and band over the generation batch -------------------------------------------

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self._attach_selection(out, "train" if self.model.training else "eval")
        return out

    def _loss_mask(self, batch) -> torch.Tensor:
        mask = batch["completion_mask"]
        if batch.get("tool_mask") is not None:
            mask = mask * batch["tool_mask"]
        return mask.bool()

    @torch.no_grad()
    def _attach_selection(self, out: dict, mode: str) -> None:
        """Add ``spine_fork_mask`` (B, T), ``spine_band_low``/``_high`` (B,) and ``spine_kl_fraction``
        (0-d) to the local generation batch ``out``, selected over all processes' rows."""
        args = self.args
        mask = self._loss_mask(out)
        B, T = mask.shape
        if args.selection == "all" and args.band == "none":
            out["spine_fork_mask"] = mask.clone()
            out["spine_kl_fraction"] = torch.ones((), device=mask.device)
            self._metrics[mode]["tokens/selected_fraction"].append(1.0)
            return
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        bs = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        mm = {k: out.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                      "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                      "mm_token_type_ids", "image_position_ids")}
        with disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
            _, ent, _ = self._get_per_token_logps_and_entropies(self.model, ids, attn, T, batch_size=bs,
                                                                compute_entropy=True, **mm)
        ent = ent.float().masked_fill(~mask, 0.0)
        # The pool: every process's rows, padded to a common length, in process order (TRL's
        # RepeatSampler gives process p the rows p·B .. p·B + B − 1, so groups stay consecutive).
        if self.accelerator.num_processes > 1:
            pool_ent = self.accelerator.gather(self.accelerator.pad_across_processes(ent, dim=1, pad_index=0.0))
            pool_mask = self.accelerator.gather(
                self.accelerator.pad_across_processes(mask.to(torch.uint8), dim=1, pad_index=0)).bool()
        else:
            pool_ent, pool_mask = ent, mask
        group = self.num_generations if mode == "train" else self.num_generations_eval
        fork = select_tokens(args.selection, pool_ent, pool_mask, rho=args.rho, scope=args.scope, group_size=group)
        edges = BANDS[args.band](pool_ent, fork, args.band_low_q, args.band_high_q)
        from ..update import Selection  # the built-in engine's metric names and definitions

        for k, v in Selection(fork, *(edges or (None, None)), pool_ent).metrics(pool_mask).items():
            self._metrics[mode][k].append(v)
        n_fork, n_tok = int(fork.sum()), int(pool_mask.sum())
        rows = slice(self.accelerator.process_index * B, (self.accelerator.process_index + 1) * B)
        out["spine_fork_mask"] = fork[rows, :T] & mask
        out["spine_kl_fraction"] = torch.tensor(n_fork / max(n_tok, 1), device=mask.device)
        if edges is not None:
            out["spine_band_low"], out["spine_band_high"] = edges[0][rows], edges[1][rows]

    # --- loss ----------------------------------------------------------------------------------

    def _normalizer(self, inputs, mask: torch.Tensor, mode: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """TRL's normaliser of ``loss_type`` as (per-row weights w or None, scalar Z)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        lt = self.loss_type
        if lt == "dapo":
            z = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                z = z * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return None, z
        if lt == "bnpo":
            return None, mask.sum().clamp(min=1.0) * accum
        if lt == "dr_grpo":
            return None, torch.tensor(float(mask.size(0) * self.max_completion_length * accum), device=mask.device)
        if lt == "grpo":
            return 1.0 / mask.sum(-1).clamp(min=1.0), torch.tensor(float(mask.size(0) * accum), device=mask.device)
        raise ValueError(f"loss_type {lt!r} is not supported by SpineGRPOTrainer; use one of {SUPPORTED_LOSS_TYPES}")

    def _compute_loss(self, model, inputs):
        """Policy + band + KL on one micro-batch, with TRL's normaliser (module docstring)."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        mask = self._loss_mask(inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logp, ent, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")})
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        fork = inputs["spine_fork_mask"].bool() & mask
        w, z = self._normalizer(inputs, mask, mode)
        wcol = torch.ones_like(logp) if w is None else w.unsqueeze(1).expand_as(logp)

        # Positive per-token weights (row weights, vLLM importance ratio) scale the advantages:
        # min(ρ·cA, clip(ρ)·cA) = c·min(ρA, clip(ρ)A) for c ≥ 0.
        adv = inputs["advantages"]
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv) * wcol
        if self.use_vllm and self.vllm_importance_sampling_correction:
            adv = adv * inputs["importance_sampling_ratio"]
        loss_pl, stats = policy_loss(logp, old_logp, adv, fork, self.epsilon_low, z)
        loss = loss_pl
        loss_band = torch.zeros((), device=logp.device)
        if args.band != "none":
            # relu(c·low − c·H) = c·relu(low − H): the row weight scales entropies and edges alike.
            wr = wcol[:, 0]
            loss_band = band_penalty(ent * wcol, fork, inputs["spine_band_low"] * wr, inputs["spine_band_high"] * wr,
                                     args.beta_low, args.beta_up, z)
            loss = loss + loss_band
        loss_kl = torch.zeros((), device=logp.device)
        if args.kl_coef > 0:
            kl_mask = fork if args.kl_tokens == "selected" else mask
            z_kl = z * inputs["spine_kl_fraction"].clamp(min=1e-12) if args.kl_tokens == "selected" else z
            ref = inputs["ref_per_token_logps"]
            if w is None:
                loss_kl = kl_penalty(logp, ref, kl_mask, z_kl)
            else:  # the k3 term is not homogeneous: weight row by row
                loss_kl = sum(kl_penalty(logp[i:i + 1], ref[i:i + 1], kl_mask[i:i + 1], z_kl / w[i])
                              for i in range(logp.size(0)))
            loss = loss + args.kl_coef * loss_kl
        if self.aux_loss_enabled:
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accum

        # Logged per micro-batch × accum, so the mean over a window is the window's total term.
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        logged = torch.stack([loss_pl.detach(), loss_band.detach(), torch.as_tensor(loss_kl).detach().reshape(()),
                              stats["clip_fraction"], stats["approx_kl"]]).float() * torch.tensor(
            [accum, accum, accum, 1.0, 1.0], device=logp.device)
        logged = self.accelerator.gather(logged.unsqueeze(0)).mean(0).tolist()
        for name, value in zip(("loss/policy", "loss/band", "loss/kl", "policy/clip_fraction", "policy/approx_kl"),
                               logged):
            self._metrics[mode][name].append(value)
        with torch.no_grad():
            totals = self.accelerator.reduce(torch.stack([(ent.detach() * mask).sum(), mask.sum().float()]),
                                             reduction="sum")
            self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss


def _label_free_reward(name: str):
    """A placeholder reward function for TRL's constructor (which requires one); never called:
    :meth:`SpineGRPOTrainer._calculate_rewards` votes over gathered groups instead."""

    def reward(prompts, completions, **kwargs):
        raise RuntimeError("label-free rewards are computed by SpineGRPOTrainer._calculate_rewards")

    reward.__name__ = f"label_free_{name}"
    return reward

