"""The adaptation loop: label-free test-time RL (TTRL / SPINE) of a causal LM on its questions.

One step, in this order (:func:`adapt` and :func:`train_step`, top to bottom):

1. **Sample** ``num_votes`` completions per question with the engine's sampler, which also
   returns the entropy of the distribution each token was drawn from (softmax(logits / T));
   with ``--rollout tree`` as ETTRL's entropy-fork tree (:class:`spine_ttrl.engine.tree.TreeSampler`).
2. **Vote and reward** (:func:`spine_ttrl.votes.vote_and_reward`): extract answers, cluster them
   by equivalence, take the majority as pseudo-label, reward with the configured function
   (``--reward`` → :data:`spine_ttrl.rewards.REWARDS`, or :data:`~spine_ttrl.rewards.EMBEDDING_REWARDS`
   with the completions' sentence embeddings). Questions where nothing parsed are skipped. Keep
   ``num_train_samples`` completions per question — a random subset chosen before any forward
   pass. Advantages per question group, or over the batch (``--advantage-norm`` →
   :data:`spine_ttrl.losses.ADVANTAGE_NORMS`).
3. **Update** (:func:`spine_ttrl.update.update_on_batch`): forking tokens and band edges from
   the behaviour entropies of the whole batch, then SPINE's loss (policy term on the selected
   tokens + entropy band + optional KL to the initial model; the neighbours' advantage shaping,
   token weights and entropy regulariser when switched on) micro-batch by micro-batch, and one
   AdamW step (bf16 autocast with fp32 master weights where bf16 is native).
4. **Log** the step to ``metrics.jsonl``, **evaluate** every ``eval_every`` steps, **checkpoint**
   every ``save_every`` steps. After the last step: evaluate, save ``final/``, write the report.

With ``spine.selection=all`` and ``spine.band=none`` the same loop is TTRL.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .assessment import EvalResult, evaluate_prompts
from .config import Config
from .data import load_examples, resolve_task
from .engine import SamplingParams
from .engine.builtin import check_sampler, load_builtin_engine
from .engine.memory import fix_mmap_threshold, peak_memory_metrics, reset_peak_memory
from .engine.precision import autocast_dtype_for, bf16_supported, compute_name, machine_name, resolve_device  # noqa: F401 (autocast_dtype_for, bf16_supported: re-exported)
from .engine.scoring import batch_to_device, build_training_batch, micro_batches, score_batch, score_completions  # noqa: F401
from .embeddings import check_embedder, load_embedder
from .engine.tree import TreeSampler
from .losses import ADVANTAGE_NORMS
from .prompting import encode_examples
from .report import collapse_warnings, read_jsonl, write_report
from .rewards import EMBEDDING_REWARDS, REWARDS
from .rundir import (Logger, TrainState, append_jsonl, finish_step, format_eval, last_eval, next_questions,
                     prepare_run_dir, reuse_eval_before, save_final_model, summary_line)
from .update import lr_lambda, make_optimizer, update_on_batch
from .votes import vote_and_reward


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


@dataclass
class Questions:
    """The run's questions, their encoded prompts and their answer type."""

    examples: list
    prompt_ids: list[list[int]]
    task: str


def adapt(config: Config) -> RunResult:
    """Run test-time adaptation as configured; returns a :class:`RunResult`.

    Example::

        from spine_ttrl import adapt, make_config
        cfg = make_config("spine", overrides={"data": {"data": "arith:2:24"}, "optim": {"steps": 2}})
        result = adapt(cfg)
        print(result.eval_before.metrics, result.eval_after.metrics)
    """
    cfg = config.validate()
    o, ev, run = cfg.optim, cfg.eval, cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.mmap_threshold_mb and resolve_device(cfg.model.device).type == "cpu":
        fix_mmap_threshold(run.mmap_threshold_mb << 20)
    log = Logger(run.progress)
    # Data first: bad input fails before the (slow) model load.
    examples = load_examples(cfg.data.data)
    if cfg.data.limit:
        examples = examples[:cfg.data.limit]
    task = resolve_task(examples, cfg.data.task)
    # A missing GPU or vLLM fails here, before anything is written.
    check_sampler(cfg.sampling.sampler, resolve_device(cfg.model.device))
    if cfg.spine.reward in EMBEDDING_REWARDS:  # and so does a missing sentence-embedding model
        check_embedder()
    out_dir, checkpoints = prepare_run_dir(cfg)
    eng = load_builtin_engine(cfg.model, need_reference=cfg.spine.kl_coef > 0 and o.steps > 0,
                              sampling_cfg=cfg.sampling, seed=run.seed)
    examples, prompt_ids, length_report = encode_examples(
        eng.tokenizer, examples, task, max_prompt_tokens=cfg.data.max_prompt_tokens,
        long_prompts=cfg.data.long_prompts, system_prompt=cfg.data.system_prompt)
    qs = Questions(examples, prompt_ids, task)
    log.info(length_report)
    log.info(f"{len(examples)} questions, task={task}, preset={cfg.preset}, device={eng.device}, "
             f"precision={'bf16 autocast, fp32 weights' if eng.autocast_dtype else 'fp32'}")
    result = RunResult(out_dir=out_dir, config=cfg, model=eng.model, tokenizer=eng.tokenizer)
    params = [p for p in eng.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, o) if params else None
    # Separate generators, so that evaluation or a change of selection never shifts sampling.
    state = TrainState(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o)) if optimizer else None,
                       eng.generator(run.seed), torch.Generator().manual_seed(run.seed + 1),
                       compute=compute_name(eng.device, eng.autocast_dtype), machine=machine_name(eng.device))
    if checkpoints:
        changed = state.restore(eng.model, checkpoints[-1], out_dir)
        result.metrics = read_jsonl(out_dir / "metrics.jsonl")
        log.info(f"resumed {out_dir} from {checkpoints[-1].name}: continuing at step {state.step + 1}" + changed)
    elif run.resume:
        log.info(f"{out_dir}: no checkpoint yet, starting the run again from step 1")
    before = last_eval(out_dir, "before")
    if before is None and ev.before_from:
        before = reuse_eval_before(cfg, out_dir)
        log.info(f"eval before: reused from {ev.before_from}: " + format_eval(before))
    if before is not None:
        result.eval_before = EvalResult(before)
    elif not ev.skip_eval_before:
        result.eval_before = evaluate_run(eng, qs, cfg, "before", 0, out_dir, log)

    start_step = state.step + 1
    for step in range(start_step, o.steps + 1):
        m = train_step(step, eng, qs, cfg, state, out_dir, log)
        result.metrics.append(m)
        for w in collapse_warnings(result.metrics):
            kind = w.split(":", 1)[0]
            if kind not in state.warned:
                state.warned.add(kind)
                log.info(f"warning: {w}")
        state.step = step
        if ev.eval_every and step % ev.eval_every == 0 and step != o.steps:
            evaluate_run(eng, qs, cfg, f"step{step}", step, out_dir, log)
        if run.save_every and step % run.save_every == 0 and step != o.steps:
            state.save(eng.model, out_dir, run.keep_checkpoints)

    if o.steps > 0 or ev.skip_eval_before or result.eval_before is None:
        after = last_eval(out_dir, "after")
        if after is not None and start_step > o.steps:  # resumed a run that had already finished
            result.eval_after = EvalResult(after)
        else:
            result.eval_after = evaluate_run(eng, qs, cfg, "after", o.steps, out_dir, log)
    else:
        result.eval_after = result.eval_before
    if o.steps > 0:
        save_final_model(eng.model, eng.tokenizer, out_dir / "final")
        if run.save_every:
            state.step = o.steps
            state.save(eng.model, out_dir, run.keep_checkpoints)
    write_report(out_dir)
    log.info(summary_line(result))
    return result


def train_step(step: int, eng, qs: Questions, cfg: Config, state: TrainState, out_dir: Path, log) -> dict:
    """One adaptation step (sample → vote → update); returns its metrics, already logged."""
    s, sp, o = cfg.sampling, cfg.spine, cfg.optim
    t_step = time.perf_counter()
    m: dict[str, float] = {"step": step}
    reset_peak_memory(eng.device)
    q_idx = next_questions(state, o.questions_per_step, len(qs.examples))
    eng.model.eval()
    t0 = time.perf_counter()
    params = SamplingParams(num_samples=s.num_votes, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_p=s.top_p, batch_size=s.sample_batch_size, return_entropy=True)
    sampler = TreeSampler(eng.sampler, *s.tree_shape()) if s.rollout == "tree" else eng.sampler
    with log.bar(f"step {step}: sampling", unit="tok") as bar:
        roll = sampler.generate([qs.prompt_ids[q] for q in q_idx], params, generator=state.sampling_gen, progress=bar)
    m["time/sampling_s"] = time.perf_counter() - t0
    m.update(completion_metrics(roll))

    t0 = time.perf_counter()
    G = s.num_train_samples
    votes = vote_and_reward(roll.texts, [qs.examples[q].answer for q in q_idx], num_votes=s.num_votes, num_train=G,
                            task=qs.task, reward_fn=REWARDS.get(sp.reward) or EMBEDDING_REWARDS[sp.reward],
                            generator=state.selection_gen, label_sets=[qs.examples[q].labels for q in q_idx],
                            embed=load_embedder(str(eng.device)) if sp.reward in EMBEDDING_REWARDS else None)
    append_jsonl(out_dir / "samples.jsonl", {
        "step": step, "completion_ids_sha256": hashlib.sha256(roll.completion_ids.numpy().tobytes()).hexdigest(),
        "questions": [{"id": qs.examples[q].id, "answers": votes.answers[j * s.num_votes:(j + 1) * s.num_votes],
                       "texts": roll.texts[j * s.num_votes:(j + 1) * s.num_votes]} for j, q in enumerate(q_idx)]})
    m.update(votes.metrics())
    if not votes.keep_rows or state.optimizer is None:
        m["optim/skipped_step"] = 1.0
        finish_step(m, t_step, out_dir / "metrics.jsonl", log)
        return m

    advantages = ADVANTAGE_NORMS[sp.advantage_norm](torch.tensor(votes.rewards), G)
    m["reward/nonzero_advantage_fraction"] = (advantages.abs() > 0).float().mean().item()
    rows = votes.keep_rows
    batch = build_training_batch([qs.prompt_ids[q_idx[r // s.num_votes]] for r in rows],
                                 [roll.completion_ids[r][roll.completion_mask[r]].tolist() for r in rows],
                                 eng.sampler.pad_token_id)
    batch = batch_to_device(batch, eng.device)
    token_mask = batch[4]
    behaviour_entropy = None  # a sampler that returns no entropies (vLLM): the update scores the kept rows
    if roll.entropies is not None:
        behaviour_entropy = roll.entropies[rows, :token_mask.shape[1]].to(eng.device)
    advantages = advantages.to(eng.device)
    m["time/vote_s"] = time.perf_counter() - t0

    ref_logp = None
    if eng.reference is not None:  # frozen initial model for the KL term, no grad
        t0 = time.perf_counter()
        ref_logp = eng.reference_logprobs(batch, o.micro_batch_size, temperature=s.temperature,
                                          chunk_size=o.logit_chunk_size)
        m["time/reference_s"] = time.perf_counter() - t0
    upd = update_on_batch(eng.model, state.optimizer, batch, advantages, sp, o, temperature=s.temperature,
                          group_size=G, amp=eng.autocast_dtype, ref_logp=ref_logp,
                          behaviour_entropy=behaviour_entropy, band_anchor=state.band_anchor,
                          entropy_reg_state=state.entropy_reg, log=log,
                          diagnostics=o.diagnostics and (step - 1) % o.diagnostics_every == 0)
    m.update(upd.metrics)
    state.entropy_reg = upd.entropy_reg_state
    anchor = upd.selection.anchor
    if sp.band_anchor == "first" and state.band_anchor is None and anchor is not None and math.isfinite(anchor[0]):
        state.band_anchor = anchor
        log.info(f"band anchored at [{anchor[0]:.4f}, {anchor[1]:.4f}] (pooled forking-token entropy, step {step})")
    state.scheduler.step()
    if hasattr(eng.sampler, "sync_weights"):  # an external sampler (vLLM) gets the updated weights
        eng.sampler.sync_weights()
    m["tokens/trained"] = float(int(token_mask.sum()))
    m.update(peak_memory_metrics(eng.device))
    finish_step(m, t_step, out_dir / "metrics.jsonl", log)
    return m


def completion_metrics(roll) -> dict[str, float]:
    """``completion/*`` of the step's votes; with a tree rollout also the decoded tokens over those
    of flat sampling of the same leaves (docs/metrics.md)."""
    lengths = roll.completion_mask.sum(dim=1)
    m = {"completion/length_mean": lengths.float().mean().item(),
         "completion/truncated_fraction": roll.truncated.float().mean().item(),
         "completion/sampled_tokens": float(lengths.sum() if roll.sampled_tokens is None else roll.sampled_tokens)}
    if roll.sampled_tokens is not None:
        m["completion/tree_token_ratio"] = roll.sampled_tokens / max(int(lengths.sum()), 1)
    return m


def evaluate_run(eng, qs: Questions, cfg: Config, tag: str, step: int, out_dir: Path, log) -> EvalResult:
    """Evaluate on the first ``eval_limit`` questions (all by default) and log to ``eval.jsonl``."""
    ev, s = cfg.eval, cfg.sampling
    n = ev.eval_limit or len(qs.examples)
    k = ev.eval_samples if tag in ("before", "after") or ev.eval_every_samples < 0 else ev.eval_every_samples
    params = SamplingParams(num_samples=k, max_new_tokens=ev.eval_max_new_tokens or s.max_new_tokens,
                            temperature=ev.eval_temperature, top_p=ev.eval_top_p, batch_size=s.sample_batch_size)
    t0 = time.perf_counter()
    eng.model.eval()
    with log.bar(f"eval {tag}", unit="tok") as bar:
        res = evaluate_prompts(eng.sampler, qs.examples[:n], qs.prompt_ids[:n], qs.task, params,
                               seed=cfg.run.seed + 2, progress=bar)
    res.metrics["time_s"] = time.perf_counter() - t0
    append_jsonl(out_dir / "eval.jsonl", {"tag": tag, "step": step, "compute": compute_name(eng.device, eng.autocast_dtype),
                                          "machine": machine_name(eng.device),
                                          **{f"eval/{k}": v for k, v in res.metrics.items()}})
    append_jsonl(out_dir / "eval_records.jsonl", {"tag": tag, "step": step, "records": res.records})
    log.info(f"eval {tag}: " + format_eval(res.metrics))
    return res
