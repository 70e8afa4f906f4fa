"""The run directory: its files, the resumable training state, and the run's log lines.

Layout of ``RUN/`` (see the README's "Outputs"): ``config.toml`` (the resolved settings),
``metrics.jsonl`` (one line per step), ``eval.jsonl`` (one line per evaluation),
``eval_records.jsonl`` (per evaluation, one record per question: answers, correctness, lengths),
``samples.jsonl`` (every step's answers, texts and the SHA-256 of its sampled token ids),
``checkpoints/step-NNNNNN/``, ``final/`` (the adapted model) and ``report.md`` with plots.
Every JSONL line is flushed and fsynced as it is written; config, checkpoints and ``final/``
are written atomically. A resumed run truncates the JSONL files to the lines its checkpoint
knew, so a kill -9 at any moment loses at most the step in progress.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config as config_mod
from .checkpoint import (count_lines, list_checkpoints, load_checkpoint, load_trainable_state, save_checkpoint,
                         trainable_state, truncate_lines)
from .report import read_jsonl

LOG_FILES = ("metrics.jsonl", "eval.jsonl", "eval_records.jsonl", "samples.jsonl")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_run_dir(cfg, find_checkpoints=None) -> tuple[Path, list[Path]]:
    """Create (or reopen, with ``run.resume``) the run directory; write ``config.toml``.

    Returns the directory and its checkpoints (oldest first; empty for a fresh run), found by
    ``find_checkpoints(out_dir)`` (default: the built-in engine's ``checkpoints/``). A fresh
    run in an old directory removes the old run's logs and checkpoints, so nothing of it can
    be resumed or mixed in.
    """
    run = cfg.run
    if cfg.eval.before_from and not run.resume:  # fails before anything is written
        check_before_from(cfg)
    out_dir = Path(run.resume or run.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}")
    if run.resume and not (out_dir / "config.toml").exists():
        raise ValueError(f"{out_dir}: not a run directory (no config.toml) - nothing to resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The saved config describes the run itself: reusable with --config for a new run.
    saved = copy.deepcopy(cfg)
    saved.run.resume, saved.run.out = "", str(out_dir)
    write_atomic(out_dir / "config.toml", config_mod.to_toml(saved))
    checkpoints = (find_checkpoints or list_checkpoints)(out_dir) if run.resume else []
    if checkpoints:
        return out_dir, checkpoints
    for name in LOG_FILES:  # a resume with no checkpoint yet starts the run again from step 1
        (out_dir / name).unlink(missing_ok=True)
    if not run.resume:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return out_dir, []


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model: optimiser, schedule, random streams,
    the questions still to visit in this epoch, the warnings already logged, the band anchor and
    the entropy regulariser's state."""

    optimizer: torch.optim.Optimizer | None
    scheduler: object
    sampling_gen: torch.Generator
    selection_gen: torch.Generator
    order: list[int] = field(default_factory=list)
    step: int = 0
    warned: set[str] = field(default_factory=set)
    band_anchor: tuple[float, float] | None = None
    entropy_reg: dict = field(default_factory=dict)  # the entropy regulariser's anchor or coefficient
    compute: str = ""  # engine.precision.compute_name of this machine, saved with every checkpoint
    machine: str = ""  # engine.precision.machine_name of this machine, saved with every checkpoint

    def save(self, model, out_dir: Path, keep: int) -> None:
        """Checkpoint the state at ``self.step`` with the JSONL line counts it belongs to."""
        save_checkpoint(out_dir, self.step, {
            "model": trainable_state(model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "sampling_rng": self.sampling_gen.get_state(),
            "selection_rng": self.selection_gen.get_state(), "order": list(self.order), "step": self.step,
            "lines": {n: count_lines(out_dir / n) for n in LOG_FILES}, "warned": sorted(self.warned),
            "band_anchor": list(self.band_anchor) if self.band_anchor else None,
            "entropy_reg": dict(self.entropy_reg), "compute": self.compute,
            "machine": self.machine}, keep=keep)

    def restore(self, model, checkpoint: Path, out_dir: Path) -> str:
        """Load a checkpoint into the model and this state; cut the JSONL files back to it. Returns
        a warning (to append to the log line) when the checkpoint was made on a machine that computes
        otherwise than this one (``compute``), a note when it computed the same way on other
        hardware (``machine``: other kernels, so possibly other sampled tokens), else ''."""
        state = load_checkpoint(checkpoint)
        load_trainable_state(model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampling_gen.set_state(state["sampling_rng"])
        self.selection_gen.set_state(state["selection_rng"])
        self.order, self.step = list(state["order"]), state["step"]
        for name, n in state["lines"].items():
            truncate_lines(out_dir / name, n)
        self.warned = set(state.get("warned", []))
        self.band_anchor = tuple(state["band_anchor"]) if state.get("band_anchor") else None
        self.entropy_reg = dict(state.get("entropy_reg", {}))
        if state.get("compute", self.compute) == self.compute:
            there = state.get("machine") or ""
            if not there or not self.machine or there == self.machine:
                return ""
            return (f"\nnote: the run so far ran on {there}, this machine is {self.machine}: their kernels "
                    "differ, so from here on it may sample other tokens than it would have there")
        return (f"\nwarning: the run so far computed in {state['compute']}, this machine computes in {self.compute}: "
                "from here on it samples other tokens than it would have; set --precision to keep one")


def next_questions(state: TrainState, n: int, num_examples: int) -> list[int]:
    """The next ``min(n, num_examples)`` question indices: epochs over seeded permutations
    (drawn with the sampling generator), continued across steps and resumes."""
    picked = []
    while len(picked) < min(n, num_examples):
        if not state.order:
            state.order = torch.randperm(num_examples, generator=state.sampling_gen,
                                         device=state.sampling_gen.device).tolist()
        picked.append(state.order.pop(0))
    return picked


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
    if getattr(tokenizer, "image_processor", None) is not None:  # a vision-language model's processor
        from .vision import save_processor

        save_processor(tokenizer, tmp)
    else:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def format_eval(metrics: dict[str, float]) -> str:
    """One line of the main evaluation numbers, each accuracy with its standard error."""
    parts = []
    for k, v in metrics.items():
        if k.endswith("_se") or k in ("questions", "time_s"):
            continue
        se = metrics.get(k + "_se")
        parts.append(f"{k}={v:.3f}" + (f"±{se:.3f}" if se is not None and not math.isnan(se) else ""))
    return "  ".join(parts)


STEP_LOG_KEYS = ("reward/mean", "vote/majority_ratio", "completion/length_mean", "loss/policy", "optim/grad_norm",
                 "time/step_s")


def finish_step(m: dict, t_step: float, metrics_file: Path, log) -> None:
    """Add the step's wall time and throughput, append it to ``metrics.jsonl``, log one line."""
    m["time/step_s"] = time.perf_counter() - t_step
    m["tokens/per_second"] = m.get("completion/sampled_tokens", 0.0) / max(m["time/step_s"], 1e-9)
    append_jsonl(metrics_file, m)
    log.info(f"step {int(m['step'])}: " + "  ".join(f"{k}={m[k]:.4g}" for k in STEP_LOG_KEYS if k in m))


def last_eval(out_dir: Path, tag: str) -> dict[str, float] | None:
    """The metrics of the last evaluation tagged ``tag`` in ``eval.jsonl`` (without the prefix)."""
    found = [r for r in read_jsonl(out_dir / "eval.jsonl") if r.get("tag") == tag]
    return {k[5:]: v for k, v in found[-1].items() if k.startswith("eval/")} if found else None


# The settings that decide a run's evaluation before adaptation: another run's evaluation is reused
# (eval.before_from) only when all of these are equal. None = the whole section.
_BEFORE_EVAL_SETTINGS = {"model": None, "data": None,
                         "eval": ("eval_limit", "eval_samples", "eval_temperature", "eval_top_p", "eval_max_new_tokens"),
                         "sampling": ("max_new_tokens", "sample_batch_size", "sampler"), "run": ("seed", "threads", "engine")}


def before_eval_mismatch(other: dict, this: dict) -> str | None:
    """The first setting (as ``section.field: value there, value here``) in which two resolved
    configs (``config.to_dict`` / ``load_toml`` dicts) would evaluate the base model differently;
    None when the evaluation before adaptation is the same."""
    for section, keys in _BEFORE_EVAL_SETTINGS.items():
        a, b = other.get(section, {}), this.get(section, {})
        for k in keys or sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"{section}.{k}: {a.get(k)!r} there, {b.get(k)!r} here"
    return None


def check_before_from(cfg) -> dict[str, dict]:
    """The ``before`` lines of the ``eval.jsonl`` and ``eval_records.jsonl`` of the run directory
    named by ``eval.before_from`` ({file name: line}), after checking that they were made with this
    run's settings and computed the same way (device type and precision as resolved on this
    machine, ``engine.precision.compute_name``: ``precision = auto`` is bf16 on one CPU and fp32 on
    another); ValueError naming what differs or is missing otherwise."""
    from .engine.precision import autocast_dtype_for, compute_name, resolve_device

    src = Path(cfg.eval.before_from)
    if not (src / "config.toml").exists():
        raise ValueError(f"eval.before_from {src}: not a run directory (no config.toml)")
    why = before_eval_mismatch(config_mod.load_toml(src / "config.toml"), config_mod.to_dict(cfg))
    if why:
        raise ValueError(f"eval.before_from {src}: its evaluation before adaptation used other settings ({why})")
    lines = {}
    for name in ("eval.jsonl", "eval_records.jsonl"):
        found = [r for r in read_jsonl(src / name) if r.get("tag") == "before"]
        if not found:
            raise ValueError(f"eval.before_from {src}: no evaluation before adaptation in {name}")
        lines[name] = found[-1]
    device = resolve_device(cfg.model.device)
    here, there = compute_name(device, autocast_dtype_for(cfg.model.precision, device)), lines["eval.jsonl"].get("compute")
    if there != here:
        raise ValueError(f"eval.before_from {src}: its evaluation before adaptation computed in "
                         f"{there or 'an unrecorded precision'}, this run computes in {here}; "
                         "set --precision to match, or let the run evaluate itself")
    return lines


def reuse_eval_before(cfg, out_dir: Path) -> dict[str, float]:
    """Copy the ``before`` lines of ``eval.before_from``'s ``eval.jsonl`` and ``eval_records.jsonl``
    (checked by :func:`check_before_from`) into ``out_dir``; returns the metrics as :func:`last_eval`."""
    for name, line in check_before_from(cfg).items():
        append_jsonl(out_dir / name, line)
    return last_eval(out_dir, "before")


class Logger:
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


def summary_line(result) -> str:
    """The one-line end-of-run summary of a RunResult: greedy pass@1 before -> after, with standard
    errors (the majority ratio where the questions have no labels)."""
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
