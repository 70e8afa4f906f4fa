"""``spine-ttrl adapt --engine trl``: the same run, trained by :class:`SpineGRPOTrainer` (TRL).

The configuration is the built-in engine's (:class:`spine_ttrl.config.Config`), mapped onto a
:class:`~spine_ttrl.integrations.trl.SpineGRPOConfig` by :func:`trl_args`; the run directory is the
built-in engine's too: ``config.toml``, ``metrics.jsonl`` (same metric names, one line per
adaptation step), ``eval.jsonl`` / ``eval_records.jsonl`` (the built-in evaluation, run on the
main process), ``report.md`` with plots and ``final/``. TRL's own checkpoints go to
``<run>/trl/checkpoint-<update>`` and ``--resume <run>`` continues from the newest.

Many processes: ``torchrun --nproc_per_node N -m spine_ttrl adapt --engine trl ...`` or
``accelerate launch -m spine_ttrl adapt --engine trl ...`` (gloo on CPU, NCCL on GPUs; DeepSpeed
through ``accelerate launch --config_file configs/accelerate/zero3.yaml``). Every process runs this
function; only the main process writes the run directory.

How one adaptation step maps onto TRL (``P`` processes, ``Q`` = ``questions_per_step``,
``G`` = ``num_train_samples``, ``V`` = ``num_votes``, ``M`` = ``micro_batch_size``):

- one generation batch = ``Q`` questions × ``G`` trained completions (``V`` votes each) over all
  processes; ``per_device_train_batch_size = M``, ``gradient_accumulation_steps =
  steps_per_generation = Q·G / (M·P)`` (must be a whole number);
- ``updates_per_batch`` = TRL's ``num_iterations``, so TRL's ``max_steps = steps × updates_per_batch``
  and one ``metrics.jsonl`` line per generation batch (its last update's numbers);
- the questions of a step come from TRL's sampler (seeded shuffles of the data set), not from the
  built-in engine's permutation: the same questions are visited, in another order.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainerCallback

from ..config import Config

# TRL's own log keys that have a built-in engine name; ours (reward/mean, vote/..., loss/..., entropy/...,
# tokens/selected_fraction, band/...) are logged under that name by SpineGRPOTrainer already.
METRIC_NAMES = {
    "completions/mean_length": "completion/length_mean",
    "completions/clipped_ratio": "completion/truncated_fraction",
    "grad_norm": "optim/grad_norm",
    "learning_rate": "optim/lr",
    "entropy": "entropy/all_mean",  # kept only where selection logs no entropy/all_mean of its own
    "epoch": "data/epoch",  # passes over the questions so far
}
# TRL log keys dropped from metrics.jsonl (duplicates of ours, or bookkeeping).
_DROPPED = {"loss", "reward", "reward_std", "step_time", "num_tokens", "total_flos", "train_runtime",
            "train_samples_per_second", "train_steps_per_second", "train_loss",
            "rewards/label_free_majority/mean", "rewards/label_free_majority/std"}


def check_trl_config(cfg: Config, num_processes: int = 1) -> None:
    """Refuse, in one line, what the TRL engine cannot do with this configuration."""
    s, o = cfg.sampling, cfg.optim
    from ..vision import is_image_text_model  # reads the model's config only

    if is_image_text_model(cfg.model.model) and s.num_votes != s.num_train_samples:
        raise ValueError("--engine trl with a vision-language model needs num_votes = num_train_samples "
                         "(more votes than trained samples is text-only there; the built-in engine does both)")
    rows = o.questions_per_step * s.num_train_samples
    if rows % (o.micro_batch_size * num_processes):
        raise ValueError(
            f"--engine trl needs questions_per_step x num_train_samples ({rows}) to be a multiple of micro_batch_size "
            f"x processes ({o.micro_batch_size} x {num_processes}): TRL splits each generation batch evenly")
    if cfg.data.long_prompts == "truncate":
        raise ValueError("--engine trl passes chat messages to TRL: long_prompts=truncate is not supported (use skip or error)")
    if cfg.model.device.startswith("cuda:"):
        raise ValueError("--engine trl places process i on GPU i: choose GPUs with CUDA_VISIBLE_DEVICES, not --device cuda:N")
    if o.skip_empty_steps:
        raise ValueError("--engine trl steps the optimiser on every batch: skip_empty_steps is a built-in engine setting")
    if cfg.preset == "none" or o.steps == 0:
        raise ValueError("--engine trl trains; for evaluation only use `spine-ttrl eval` (the built-in engine)")
    sp = cfg.spine
    new = {"reward": (sp.reward, "majority|frequency|ttrv|leave-one-out"), "advantage_norm": (sp.advantage_norm, "group"),
           "advantage_shaping": (sp.advantage_shaping, "none"), "token_weights": (sp.token_weights, "none"),
           "entropy_reg": (sp.entropy_reg, "none"), "selection_signal": (sp.selection_signal, "token"),
           "rollout": (s.rollout, "flat"), "band_rows": (sp.band_rows, "all")}
    bad = [f"{k}={v}" for k, (v, ok) in new.items() if v not in ok.split("|")]
    if bad:
        raise ValueError(f"--engine trl supports {', '.join(f'{k}={ok}' for k, (_, ok) in new.items())} only "
                         f"(got {', '.join(bad)}): the neighbours' switches run on the built-in engine")


def trl_dataset_columns(tokenizer, examples, task: str, system_prompt: str = "") -> dict[str, list]:
    """The columns of TRL's training set: ``prompt`` (chat messages, or the plain text for a
    tokenizer without a chat template), ``answer`` when questions have reference answers (for the
    label diagnostics only) and, for questions with images, ``images`` (PIL images; TRL puts them
    into the first user turn and runs the processor)."""
    from ..data import build_messages

    messages = [build_messages(ex, task, system_prompt or None) for ex in examples]
    chat = bool(getattr(tokenizer, "chat_template", None))
    columns = {"prompt": messages if chat else ["\n\n".join(m["content"] for m in msgs) + "\n" for msgs in messages]}
    if any(ex.answer is not None for ex in examples):  # the label diagnostics only, never the reward
        columns["answer"] = [ex.answer for ex in examples]
    if chat and any(ex.images for ex in examples):  # images come with a processor, which has a template
        from ..images import load_image

        columns["images"] = [[load_image(src) for src in ex.images] for ex in examples]
    return columns


def trl_args(cfg: Config, output_dir: str | Path, *, bf16: bool, use_cpu: bool, task: str = "math",
             num_processes: int = 1):
    """The :class:`SpineGRPOConfig` that trains as ``cfg`` does over ``num_processes`` processes
    (see the module docstring)."""
    from .trl import SpineGRPOConfig

    s, sp, o, run = cfg.sampling, cfg.spine, cfg.optim, cfg.run
    procs = num_processes
    accum = o.questions_per_step * s.num_train_samples // (o.micro_batch_size * procs)
    spine = {name: getattr(sp, name) for name in ("selection", "rho", "scope", "band", "band_low_q", "band_high_q",
                                                   "beta_low", "beta_up", "kl_coef", "kl_tokens", "reward")}
    extra = {}
    if s.num_votes != s.num_train_samples:
        extra["num_votes"] = s.num_votes
    if sp.band_anchor != "none":
        extra["band_anchor"] = sp.band_anchor
    if s.sampler == "vllm":
        extra.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=s.vllm_gpu_memory_utilization)
    return SpineGRPOConfig(
        output_dir=str(output_dir), **spine, **extra, task=task,
        num_generations=s.num_train_samples, max_completion_length=s.max_new_tokens, temperature=s.temperature,
        top_p=s.top_p, per_device_train_batch_size=o.micro_batch_size, gradient_accumulation_steps=accum,
        steps_per_generation=accum, num_iterations=o.updates_per_batch, max_steps=o.steps * o.updates_per_batch,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        warmup_steps=o.warmup_steps * o.updates_per_batch, lr_scheduler_type=o.schedule,
        epsilon=o.clip_eps, max_grad_norm=o.max_grad_norm or 1e9, optim="adamw_torch", loss_type="dapo",
        seed=run.seed, data_seed=run.seed, bf16=bf16, use_cpu=use_cpu, logging_steps=o.updates_per_batch,
        save_strategy="steps" if run.save_every else "no", save_steps=max(run.save_every, 1) * o.updates_per_batch,
        save_total_limit=run.keep_checkpoints, report_to="none", disable_tqdm=not run.progress,
        remove_unused_columns=False, scale_rewards="group", **_no_checkpointing(),
    )


def _no_checkpointing() -> dict:
    """Activation checkpointing off, under the name the installed transformers reads (it renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old name)."""
    import dataclasses

    from .trl import SpineGRPOConfig

    names = {f.name for f in dataclasses.fields(SpineGRPOConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def _trl_checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in (out_dir / "trl").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _truncate_logs(out_dir: Path, step: int) -> None:
    """Cut the run's JSONL logs back to what a checkpoint at adaptation step ``step`` had seen."""
    from ..report import read_jsonl
    from ..rundir import write_atomic

    for name in ("metrics.jsonl", "eval.jsonl", "eval_records.jsonl"):
        path = out_dir / name
        if path.exists():
            keep = [r for r in read_jsonl(path)
                    if r.get("step", 0) < step or (r.get("step", 0) == step and r.get("tag") != "after")]
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def prepare_trl_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory (created, ``config.toml`` written) and the TRL checkpoint to resume from."""
    from ..rundir import prepare_run_dir

    out_dir, checkpoints = prepare_run_dir(cfg, find_checkpoints=_trl_checkpoints)  # [] unless resuming
    if not checkpoints:
        shutil.rmtree(out_dir / "trl", ignore_errors=True)
        return out_dir, None
    updates = int(checkpoints[-1].name.split("-")[-1])
    _truncate_logs(out_dir, updates // cfg.optim.updates_per_batch)
    return out_dir, checkpoints[-1]


class RunDirCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that keeps the built-in engine's run directory.

    On the main process: one ``metrics.jsonl`` line per adaptation step (TRL's log of that step,
    renamed by :data:`METRIC_NAMES`, plus ``step`` and ``time/step_s``). On every process: the
    evaluations before, every ``eval_every`` steps and after, run with the built-in sampler on the
    unwrapped model (ZeRO-3 parameters gathered on every process, evaluated on the main one).
    """

    def __init__(self, cfg: Config, qs, out_dir: Path, log, *, eval_before: bool):
        self.cfg, self.qs, self.out_dir, self.log = cfg, qs, out_dir, log
        self.eval_before = eval_before
        self.trainer = None
        self.metrics: list[dict] = []
        self.evals: dict[str, object] = {}
        self._t = time.perf_counter()

    def step_of(self, global_step: int) -> int:
        return -(-global_step // self.cfg.optim.updates_per_batch)

    def evaluate(self, tag: str, step: int) -> None:
        from trl.models import unwrap_model_for_generation

        from ..engine.builtin import sampler_for
        from ..engine.models import quiet_checkpointing_alias_probe
        from ..loop import evaluate_run

        tr = self.trainer
        amp = torch.bfloat16 if tr.args.bf16 else None
        with quiet_checkpointing_alias_probe(), unwrap_model_for_generation(tr.model_wrapped, tr.accelerator) as model:
            if tr.accelerator.is_main_process:
                was_training = model.training
                vision = getattr(tr.processing_class, "image_processor", None) is not None
                eng = SimpleNamespace(model=model, sampler=sampler_for(model, tr.processing_class, amp, vision),
                                      device=tr.accelerator.device, autocast_dtype=amp)
                self.evals[tag] = evaluate_run(eng, self.qs, self.cfg, tag, step, self.out_dir, self.log)
                model.train(was_training)
            tr.accelerator.wait_for_everyone()
        self._t = time.perf_counter()

    # --- TrainerCallback hooks ---------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kw):
        from ..engine.memory import reset_peak_memory

        if self.eval_before:
            self.evaluate("before", 0)
        reset_peak_memory(self.trainer.accelerator.device)
        self._t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "train_runtime" in logs or not self.trainer.accelerator.is_main_process:
            return
        from ..engine.memory import peak_memory_metrics, reset_peak_memory
        from ..rundir import finish_step

        m = {"step": self.step_of(state.global_step)}
        for key, value in logs.items():
            if key in _DROPPED or key.startswith("rewards/") or value is None:
                continue
            if key in METRIC_NAMES and METRIC_NAMES[key] in logs:  # our own metric of that name wins
                continue
            m[METRIC_NAMES.get(key, key)] = float(value)
        s, o = self.cfg.sampling, self.cfg.optim
        if s.num_votes == s.num_train_samples and "completion/length_mean" in m:  # every sample is in TRL's mean
            m["completion/sampled_tokens"] = m["completion/length_mean"] * o.questions_per_step * s.num_votes
        device = self.trainer.accelerator.device
        m.update(peak_memory_metrics(device))
        reset_peak_memory(device)
        finish_step(m, self._t, self.out_dir / "metrics.jsonl", self.log)
        self.metrics.append(m)
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        ev, o = self.cfg.eval, self.cfg.optim
        if state.global_step % o.updates_per_batch:
            return
        step = self.step_of(state.global_step)
        if ev.eval_every and step % ev.eval_every == 0 and step != o.steps:
            self.evaluate(f"step{step}", step)


def adapt_trl(config: Config):
    """Run the adaptation of ``config`` with TRL (:class:`SpineGRPOTrainer`); returns a ``RunResult``.

    Called by ``spine-ttrl adapt --engine trl`` on every process of a launch.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset

    from ..assessment import EvalResult
    from ..data import load_examples, resolve_task
    from ..engine.builtin import check_sampler, lora_settings
    from ..engine.models import load_model_and_tokenizer
    from ..vision import check_text_model_data, is_image_text_model, load_vision_model
    from ..engine.precision import autocast_dtype_for, resolve_device
    from ..loop import Questions, RunResult
    from ..prompting import encode_examples
    from ..report import write_report
    from ..rundir import Logger, last_eval, reuse_eval_before, summary_line
    from .trl import SpineGRPOTrainer

    cfg = config.validate()
    check_trl_config(cfg)  # one-line refusals before the device is even looked at
    device = resolve_device(cfg.model.device)
    # cpu=True: without it accelerate ignores torchrun's WORLD_SIZE on a machine without a GPU.
    dist = PartialState(cpu=device.type == "cpu")
    check_trl_config(cfg, dist.num_processes)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.mmap_threshold_mb and device.type == "cpu":
        from ..engine.memory import fix_mmap_threshold

        fix_mmap_threshold(cfg.run.mmap_threshold_mb << 20)
    log = Logger(cfg.run.progress and dist.is_main_process)
    examples = load_examples(cfg.data.data)[:cfg.data.limit or None]
    task = resolve_task(examples, cfg.data.task)
    if any(ex.labels for ex in examples):
        raise ValueError("--engine trl votes over the default labels (yes/no/maybe): a labels column needs the built-in engine")
    if len(examples) < cfg.optim.questions_per_step:
        raise ValueError(f"--engine trl needs at least questions_per_step ({cfg.optim.questions_per_step}) questions, "
                         f"got {len(examples)}")
    check_sampler(cfg.sampling.sampler, device)  # vLLM needs the extra and a GPU: refused before anything is written
    payload = [prepare_trl_run_dir(cfg) if dist.is_main_process else None]
    out_dir, resume_from = broadcast_object_list(payload, from_process=0)[0] if dist.num_processes > 1 else payload[0]
    if is_image_text_model(cfg.model.model):  # the "tokenizer" is then the processor, as in the built-in engine
        model, tokenizer = load_vision_model(cfg.model.model, lora=lora_settings(cfg.model),
                                             freeze_vision=cfg.model.freeze_vision)
    else:
        check_text_model_data(examples)  # images for a text-only model: refused before it loads
        model, tokenizer = load_model_and_tokenizer(cfg.model.model, lora=lora_settings(cfg.model))
    examples, prompt_ids, report = encode_examples(tokenizer, examples, task, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                                   long_prompts=cfg.data.long_prompts, system_prompt=cfg.data.system_prompt)
    log.info(report)
    qs = Questions(examples, prompt_ids, task)
    bf16 = autocast_dtype_for(cfg.model.precision, device) is not None
    args = trl_args(cfg, out_dir / "trl", bf16=bf16, use_cpu=device.type == "cpu", task=task,
                    num_processes=dist.num_processes)
    dataset = Dataset.from_dict(trl_dataset_columns(tokenizer, examples, task, cfg.data.system_prompt))
    before = last_eval(out_dir, "before")
    if before is None and cfg.eval.before_from:  # the main process copies it; the others only skip the evaluation
        before = reuse_eval_before(cfg, out_dir) if dist.is_main_process else {}
    cb = RunDirCallback(cfg, qs, out_dir, log, eval_before=before is None and not cfg.eval.skip_eval_before)
    trainer = SpineGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[cb])
    cb.trainer = trainer
    if resume_from is not None and dist.is_main_process:
        from ..report import read_jsonl

        cb.metrics = read_jsonl(out_dir / "metrics.jsonl")
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our one line per step replaces TRL's printed dicts
    log.info(f"{len(examples)} questions, task={task}, preset={cfg.preset}, engine=trl, "
             f"processes={dist.num_processes}, device={trainer.accelerator.device}, precision={'bf16' if bf16 else 'fp32'}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    cb.evaluate("after", cfg.optim.steps)
    result = RunResult(out_dir=out_dir, config=cfg, metrics=cb.metrics, model=trainer.model, tokenizer=tokenizer)
    result.eval_after = cb.evals.get("after")
    if before is not None or "before" in cb.evals:
        result.eval_before = cb.evals.get("before") or EvalResult(before)
    _save_final(trainer, tokenizer, out_dir / "final")
    if dist.is_main_process:
        write_report(out_dir)
        log.info(summary_line(result))
    return result


def _save_final(trainer, tokenizer, path: Path) -> None:
    """``final/`` as the built-in engine writes it (LoRA merged); under DeepSpeed, TRL's own save."""
    from ..rundir import save_final_model

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        trainer.save_model(str(path))
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(str(path))
        return
    if trainer.accelerator.is_main_process:
        save_final_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, path)
    trainer.accelerator.wait_for_everyone()


def end_distributed() -> None:
    """Tear the process group down once every process is done (no-op in a single process).

    Without this, a torchrun worker can abort at interpreter exit ("terminate called without an
    active exception") while gloo's threads are destroyed, and torchrun then reports the whole run
    as failed even though rank 0 wrote its run directory.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
