"""SPINE / TTRL as a Hugging Face TRL trainer: ``SpineGRPOConfig`` and ``SpineGRPOTrainer``.

A thin adapter: TRL generates, gathers, splits and steps; the method's math is spine-ttrl's own
pure functions, called from two TRL hooks.

- **Reward** (``_calculate_rewards``): the label-free vote. Each process extracts the answers of
  its local completions (:func:`spine_ttrl.answers.extract_answer`); the answers are gathered
  (``accelerate.utils.gather_object``) so that a group of ``num_generations`` completions split
  over processes is voted on whole, once, on the main process
  (:data:`spine_ttrl.rewards.REWARDS`), and the rewards are broadcast back in TRL's gathered
  shape ``(num_processes × local rows, 1)``. No ``reward_funcs`` are needed.
- **Votes ≠ trained samples** (``num_votes`` > ``num_generations``, e.g. 64 votes, 32 trained;
  ``_generate_single_turn``, training only). ``num_generations`` stays the number of *trained*
  completions per prompt, so TRL's grouping, batch sizes, advantages and normalisers are unchanged.
  The generation step asks TRL's generator (transformers or vLLM) for ``num_votes`` completions of
  every group: trained row r = slot s of its group generates a block of ⌊V/G⌋ or ⌈V/G⌉ of the
  group's vote positions 0 .. V − 1 (:class:`VotePlan`), so the votes are spread over processes
  like the rows. A generator seeded from ``args.seed``, the optimiser step and the micro-step
  (identical on every process) draws each group's kept positions: shuffle range(V), keep the first
  G, sort -- a uniformly random G-subset, independent of the answers and of which process
  generated what. Every vote's answer is extracted from its decoded text and stashed; the kept
  completion of each row is returned to TRL (sent to its row's process with one ``gather_object``
  when a group straddles processes), so old/reference log-probs and the behaviour-entropy pass
  see only the kept rows. ``_calculate_rewards`` then gathers all answers, votes once over each
  group's *V* answers (in position order) and gives each trained row the reward of its kept answer
  in that vote; ``vote/majority_ratio`` is over all V votes, ``reward/mean`` over the trained rows
  (TRL's ``completions/*`` metrics too). Cost: generation of V/G times as many completions
  (one generator call with V/G times the rows: the memory of TRL's generation batch grows alike,
  lower ``per_device_train_batch_size × steps_per_generation`` or use vLLM), decoding and answer
  extraction of all votes, and moving at most the kept completions between processes; no forward
  pass is spent on a dropped vote. Text-only prompts, TRL's single-turn generation (no
  ``rollout_func``, tools or environments); with vLLM every process must generate as many votes
  (``num_votes % num_generations == 0`` or whole groups per process). Evaluation votes over its
  own ``num_generations_eval`` completions.
- **Selection and band** (after ``_generate_and_score_completions``): one no-grad pass of the
  current (= behaviour) policy over the process's whole generation batch gives the behaviour
  entropies; they are gathered across processes (padded to a common length), and the forking mask
  (:func:`spine_ttrl.selection.select_tokens`) and the band edges
  (:data:`spine_ttrl.losses.BANDS`) are computed on that pool -- the *whole generation batch of
  all processes* (``generation_batch_size`` completions), before TRL shuffles and splits it into
  ``steps_per_generation`` micro-batches. Each process keeps its rows. This pass is skipped for
  ``selection="all"`` with ``band="none"`` (nothing to select). The selection is the built-in
  engine's (:func:`spine_ttrl.update.select_forks`), so ``band_anchor="first"`` means the same:
  one band [low, high] pooled over all forking tokens of the first generation batch of all
  processes (:func:`spine_ttrl.losses.pooled_band_edges`), then the same edges for every response
  for the rest of the run. The anchor is written to ``spine_state.json`` in each checkpoint folder
  and read back on ``resume_from_checkpoint`` (a checkpoint without the file: recomputed at the
  first generation after the resume).
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
``use_bias_correction_kl``, and ``num_votes`` < ``num_generations``. Text-only models (vision
inputs are passed through untested; refused with ``num_votes`` > ``num_generations``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

try:
    import trl  # noqa: F401
except ImportError as e:  # tested by simulating a missing trl
    raise ImportError("spine_ttrl.integrations.trl needs TRL: pip install 'spine-ttrl[trl]'") from e

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..answers import TASKS, extract_answer, majority_vote
from ..losses import BANDS, band_penalty, kl_penalty, policy_loss
from ..rewards import REWARDS
from ..selection import SELECTIONS
from ..votes import hit_metrics, label_hits

# The public API. The pure helpers below (vote_groups, gathered_group_rewards, SUPPORTED_LOSS_TYPES)
# are importable for tests and other adapters but not part of it.
__all__ = ["SpineGRPOConfig", "SpineGRPOTrainer"]

SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "dr_grpo", "grpo")
"""TRL ``loss_type`` values whose normaliser :class:`SpineGRPOTrainer` reproduces."""

SPINE_STATE_FILE = "spine_state.json"
"""The file in a TRL checkpoint folder that holds the anchored band (``band_anchor=first``)."""


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
    beta_low: float = _f(0.1, "Band weight for forking tokens below the band (pushes their entropy up); the built-in engine's default (docs/benchmarks/long.md).")
    beta_up: float = _f(0.1, "Band weight for forking tokens above the band (pushes their entropy down); the built-in engine's default.")
    kl_coef: float = _f(0.0, "Coefficient of the masked k3 KL to the frozen initial model (0 = off). Use this, not TRL's beta (which must stay 0); > 0 keeps a reference: a frozen copy of a model instance, TRL's reload of a model id, or the disabled adapters of a PEFT model.")
    kl_tokens: str = _f("selected", "Tokens the KL is computed on: selected (forking) tokens or all completion tokens.")
    reward: str = _f("majority", "Label-free reward: majority (1 if the answer is in the group's majority cluster, TTRL) or frequency (share of the group's votes for the answer).")
    task: str = _f("math", "Answer format for extraction and voting: math (boxed / 'answer is' / last number) or choice (option letter A-J).")
    num_votes: int | None = _f(None, "Completions generated per prompt that vote (>= num_generations; None = num_generations). With num_votes > num_generations all of them vote and a uniformly random num_generations of them are trained, chosen before any scoring pass.")
    band_anchor: str = _f("none", "Where the band edges come from: none = each response's own forking tokens at every generation; first = pooled over all forking tokens of the first generation batch (all processes), then fixed for the run (saved in checkpoints).")

    def __post_init__(self):
        super().__post_init__()
        choices = {"selection": tuple(SELECTIONS), "scope": ("batch", "group", "response"), "band": tuple(BANDS),
                   "kl_tokens": ("selected", "all"), "reward": tuple(REWARDS), "task": TASKS,
                   "loss_type": SUPPORTED_LOSS_TYPES, "band_anchor": ("none", "first")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        checks = [
            (0.0 <= self.rho <= 1.0, f"rho must be in [0, 1], got {self.rho}"),
            (0.0 <= self.band_low_q <= self.band_high_q <= 1.0, "need 0 <= band_low_q <= band_high_q <= 1"),
            (self.kl_coef >= 0.0, f"kl_coef must be >= 0, got {self.kl_coef}"),
            (self.num_votes is None or self.num_votes >= self.num_generations,
             f"num_votes ({self.num_votes}) must be None or >= num_generations ({self.num_generations}): "
             "num_generations completions per prompt are trained, num_votes vote"),
            (not self.use_vllm or self.num_votes is None or self.num_votes % self.num_generations == 0
             or self.per_device_train_batch_size * self.steps_per_generation % self.num_generations == 0,
             "with vLLM, num_votes > num_generations needs num_votes % num_generations == 0 or whole groups per "
             "process (per_device_train_batch_size * steps_per_generation % num_generations == 0): vLLM needs "
             "the same number of votes on every process"),
            (self.band_anchor == "none" or self.band != "none", "band_anchor=first needs a band (band=quantile or mad)"),
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


@dataclass(frozen=True)
class VotePlan:
    """Which votes each trained row generates, and which vote it keeps (``num_votes`` > ``num_generations``).

    Global trained row r (TRL's order over all processes) is slot s = r mod G of group g = r div G.
    Group g's V votes have positions 0 .. V − 1 (the order the vote sees them in); slot s generates the
    consecutive block :meth:`block` (⌊V/G⌋ or ⌈V/G⌉ votes, so generation is spread like the rows).
    ``kept[g]`` holds the G kept positions of group g in increasing order, a uniformly random G-subset
    of range(V) (shuffle, keep the first G, sort); slot s trains on the vote at ``kept[g][s]``, which
    may have been generated by another slot of the group, on another process.
    """

    group_size: int
    num_votes: int
    kept: tuple[tuple[int, ...], ...]

    def block(self, slot: int) -> range:
        """The vote positions slot ``slot`` of a group generates."""
        q, rem = divmod(self.num_votes, self.group_size)
        start = slot * q + min(slot, rem)
        return range(start, start + q + (slot < rem))

    def slot_of(self, position: int) -> int:
        """The slot whose :meth:`block` holds vote ``position``."""
        q, rem = divmod(self.num_votes, self.group_size)
        return position // (q + 1) if position < rem * (q + 1) else rem + (position - rem * (q + 1)) // q

    def target_row(self, group: int, position: int) -> int | None:
        """The global row that trains on vote ``position`` of ``group``, or None if it is dropped."""
        kept = self.kept[group]
        return group * self.group_size + kept.index(position) if position in kept else None


def vote_plan(num_rows: int, group_size: int, num_votes: int, generator: torch.Generator) -> VotePlan:
    """A :class:`VotePlan` for ``num_rows`` trained rows (whole groups), drawn from ``generator``."""
    if group_size < 1 or num_rows % group_size or num_votes < group_size:
        raise ValueError(f"need whole groups of {group_size} rows (got {num_rows}) and num_votes >= group size")
    kept = tuple(tuple(sorted(torch.randperm(num_votes, generator=generator)[:group_size].tolist()))
                 for _ in range(num_rows // group_size))
    return VotePlan(group_size, num_votes, kept)


def kept_vote_rewards(votes: Sequence[tuple[int, int, str | None]], plan: VotePlan, reward: str = "majority",
                      task: str = "math") -> tuple[list[float], list[float]]:
    """The vote of :func:`vote_groups` over all ``num_votes`` answers of each group, read at the kept rows.

    ``votes``: ``(group, position, answer)`` for every vote of every group (any order). Returns
    ``(rewards, ratios)``: the reward of each trained row (global row order) -- the reward its kept
    answer earns in the full group's vote -- and each group's majority ratio over all its votes.
    """
    V, n_groups = plan.num_votes, len(plan.kept)
    missing = object()
    answers: list = [missing] * (n_groups * V)
    for g, pos, answer in votes:
        answers[g * V + pos] = answer
    if len(votes) != len(answers) or any(a is missing for a in answers):
        raise ValueError(f"expected each of the {n_groups} groups' {V} votes exactly once, got {len(votes)} votes")
    rewards, ratios = vote_groups(answers, V, reward, task)
    return [rewards[g * V + pos] for g, kept in enumerate(plan.kept) for pos in kept], ratios


def label_metrics(groups: Sequence[Sequence[str | None]], labels: Sequence[str | None], reward: str = "majority",
                  task: str = "math") -> dict[str, float]:
    """The built-in engine's label diagnostics (:func:`spine_ttrl.votes.label_hits`, averaged by
    :func:`spine_ttrl.votes.hit_metrics`), from each group's votes (all of them, extracted answers)
    and its reference answer (None = none).

    ``vote/sample_accuracy`` = share of the votes equivalent to their group's label;
    ``vote/label_accuracy`` = share of the voted groups (a majority exists) whose majority is;
    ``reward/accuracy`` = share of those groups' votes whose reward equals that truth (binary
    rewards only). Keys without data are left out. Labels never enter the reward.
    """
    hits: tuple[list, list, list] = ([], [], [])  # label, reward, sample
    for answers, label in zip(groups, labels):
        if label is None:
            continue
        vote = majority_vote(list(answers), task=task)
        rewards = None if vote.label is None else [float(r) for r in REWARDS[reward](list(answers), task=task)]
        truth, hit, reward_hits = label_hits(answers, label, vote.label, rewards, task)
        hits[0].extend([] if hit is None else [hit])
        hits[1].extend(reward_hits)
        hits[2].extend(truth)
    return hit_metrics(*hits)


def vote_lists(answers: Sequence, group_size: int, plan: VotePlan | None = None) -> list[list]:
    """Each group's votes: consecutive ``group_size`` answers (no plan), or, with a ``plan``, the
    ``(group, position, answer)`` triples of :func:`kept_vote_rewards` put in position order."""
    if plan is None:
        return [list(answers[i:i + group_size]) for i in range(0, len(answers), group_size)]
    groups: list[list] = [[None] * plan.num_votes for _ in plan.kept]
    for g, pos, answer in answers:
        groups[g][pos] = answer
    return groups


def gathered_group_rewards(local_answers: Sequence, group_size: int, *, reward: str = "majority",
                           task: str = "math", gather: Callable[[list], list] | None = None,
                           broadcast: Callable[[list], list] | None = None,
                           is_main: bool = True, plan: VotePlan | None = None) -> tuple[list[float], list[float]]:
    """The vote of :func:`vote_groups` over the answers of *all* processes, computed once.

    ``gather(list) -> list`` concatenates every process's list in process order (accelerate's
    ``gather_object``); ``broadcast([obj]) -> [obj]`` sends the main process's object to all
    (``broadcast_object_list``). Both None = one process. Returns the gathered
    ``(rewards, ratios)`` on every process; rewards are in gathered row order. With a ``plan``
    (votes ≠ trained samples) ``local_answers`` are ``(group, position, answer)`` triples of the
    votes this process generated and the vote is :func:`kept_vote_rewards`.
    """
    answers = gather(list(local_answers)) if gather is not None else list(local_answers)
    if not is_main:
        payload = [None]
    elif plan is None:
        payload = [vote_groups(answers, group_size, reward, task)]
    else:
        payload = [kept_vote_rewards(answers, plan, reward, task)]
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

    No ``reward_funcs``: the reward is the vote of each prompt's ``num_votes`` completions (default
    ``num_generations``; with more votes, ``num_generations`` of them are trained) -- reference
    answers in the dataset (an ``answer`` column), if any, are used only for the label diagnostics
    ``vote/label_accuracy``, ``vote/sample_accuracy`` and ``reward/accuracy`` (:func:`label_metrics`).
    Logged (TRL's ``self._metrics``, same names as the built-in engine): ``reward/mean``, ``vote/majority_ratio``,
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
        self._num_votes = args.num_votes or self.num_generations
        self._spine_votes: tuple[VotePlan, list] | None = None  # the votes of the current generation batch
        self._spine_band_anchor: tuple[float, float] | None = None  # band_anchor=first: the fixed edges
        if self._num_votes > self.num_generations and (self.rollout_func is not None or self.tools
                                                       or self.environment_factories is not None):
            raise ValueError("num_votes > num_generations needs TRL's own single-turn generation: "
                             "no rollout_func, tools or environment_factory")

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

    # --- votes ≠ trained samples: generate num_votes, keep num_generations ----------------------

    def _vote_generator(self) -> torch.Generator:
        """The generator of this generation batch's kept subsets: seeded from ``args.seed``, the
        optimiser step and the micro-step within it, so identical on all processes (and on resume)."""
        micro = self._step % max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        seed = np.random.SeedSequence([self.args.seed, self.state.global_step, micro]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed) & (2**63 - 1))

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """With ``num_votes`` > ``num_generations`` (training): generate every group's ``num_votes``
        votes, stash their extracted answers for :meth:`_calculate_rewards`, and return only the kept
        completions, one per trained row (see :class:`VotePlan`). Otherwise TRL's own generation."""
        G, V = self.num_generations, self._num_votes
        if not self.model.training or V == G:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if images is not None or multimodal_fields or has_tool_images:
            raise NotImplementedError("num_votes > num_generations supports text-only prompts")
        B, p = len(prompt_ids), self.accelerator.process_index
        plan = vote_plan(B * self.accelerator.num_processes, G, V, self._vote_generator())
        rows = range(p * B, (p + 1) * B)
        where = [(r, pos) for r in rows for pos in plan.block(r % G)]  # this process's votes, generation order
        requests = [prompt_ids[r - p * B] for r, _ in where]
        # num_generations=V: vLLM server mode generates V per unique prompt (each group's votes are consecutive)
        ids, logprobs = super()._generate_single_turn(requests, None, multimodal_fields, V, has_tool_images)
        texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
        self._spine_votes = (plan, [(r // G, pos, extract_answer(t, self.args.task))
                                    for (r, pos), t in zip(where, texts)])
        return self._route_kept(plan, where, ids, logprobs, rows)

    def _route_kept(self, plan: VotePlan, where, ids, logprobs, rows):
        """Each kept vote to the process of the row that trains on it (a group's rows can straddle
        processes, and a kept vote may have been generated on another one)."""
        kept_ids: list = [None] * len(rows)
        kept_lp: list | None = None if logprobs is None else [None] * len(rows)
        kept = []  # (target row, completion ids, sampling log-probs) of the kept votes generated here
        for k, (r, pos) in enumerate(where):
            target = plan.target_row(r // plan.group_size, pos)
            if target is not None:
                kept.append((target, ids[k], None if logprobs is None else logprobs[k]))
        mine = [item for item in kept if item[0] in rows]
        if self.accelerator.num_processes > 1:  # a collective: every process calls it, maybe with nothing to send
            mine += [item for item in gather_object([i for i in kept if i[0] not in rows]) if item[0] in rows]
        for target, completion, lp in mine:
            kept_ids[target - rows.start] = completion
            if kept_lp is not None:
                kept_lp[target - rows.start] = lp
        if any(c is None for c in kept_ids):
            raise RuntimeError("a trained row received no kept vote")
        return kept_ids, kept_lp

    # --- reward --------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """The vote over whole groups; returns TRL's gathered ``(num_processes × rows, 1)`` rewards.
        With votes ≠ trained samples the vote is over all ``num_votes`` answers of each group (stashed
        by :meth:`_generate_single_turn`) and each trained row gets the reward of its kept answer."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        stash, self._spine_votes = self._spine_votes, None
        if mode == "train" and self._num_votes > self.num_generations and stash is None:
            raise RuntimeError("num_votes > num_generations: no votes were stashed by _generate_single_turn")
        plan, local = stash if mode == "train" and stash is not None else (
            None, [extract_answer(_completion_text(c), args.task) for c in completions])
        multi = self.accelerator.num_processes > 1
        every = gather_object(list(local)) if multi else list(local)  # gathered once: the vote and the diagnostics
        rewards, ratios = gathered_group_rewards(
            every, group, reward=args.reward, task=args.task,
            broadcast=(lambda obj: broadcast_object_list(obj, from_process=0)) if multi else None,
            is_main=self.accelerator.is_main_process, plan=plan)
        self._metrics[mode]["vote/majority_ratio"].append(sum(ratios) / max(len(ratios), 1))
        self._metrics[mode]["reward/mean"].append(sum(rewards) / max(len(rewards), 1))
        if "answer" in inputs[0]:  # reference answers: diagnostics only, as in the built-in engine
            row_labels = [None if x.get("answer") is None else str(x["answer"]) for x in inputs]
            row_labels = gather_object(row_labels) if multi else row_labels
            groups = vote_lists(every, group, plan)
            for key, value in label_metrics(groups, row_labels[::group], args.reward, args.task).items():
                self._metrics[mode][key].append(value)
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
        from ..update import select_forks  # the built-in engine's selection, band, anchor and metrics

        # args has SpineConfig's names (selection, rho, scope, band, band_anchor, band_low_q, band_high_q)
        sel = select_forks(pool_ent, pool_mask, args, group, self._spine_band_anchor)
        if mode == "train" and self._spine_band_anchor is None and sel.anchor is not None and math.isfinite(
                sel.anchor[0]):  # band_anchor=first: pooled over the first generation batch, then kept
            self._spine_band_anchor = sel.anchor
        for k, v in sel.metrics(pool_mask).items():
            self._metrics[mode][k].append(v)
        fork = sel.fork_mask
        n_fork, n_tok = int(fork.sum()), int(pool_mask.sum())
        rows = slice(self.accelerator.process_index * B, (self.accelerator.process_index + 1) * B)
        out["spine_fork_mask"] = fork[rows, :T] & mask
        out["spine_kl_fraction"] = torch.tensor(n_fork / max(n_tok, 1), device=mask.device)
        if sel.low is not None:
            out["spine_band_low"], out["spine_band_high"] = sel.low[rows], sel.high[rows]

    # --- band_anchor=first survives a checkpoint ------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.band_anchor != "none" and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            anchor = list(self._spine_band_anchor) if self._spine_band_anchor is not None else None
            with open(os.path.join(folder, SPINE_STATE_FILE), "w") as f:
                json.dump({"band_anchor": anchor}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, SPINE_STATE_FILE) if checkpoint is not None else None
        if path is not None and os.path.exists(path):
            with open(path) as f:
                anchor = json.load(f).get("band_anchor")
            self._spine_band_anchor = tuple(float(x) for x in anchor) if anchor is not None else None

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

