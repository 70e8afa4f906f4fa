"""Adaptation quality: none / ttrl / spine / spine-v2 on the same unlabeled questions (transductive TTRL).

Every method adapts on the same questions with the same seeds, sampling settings and step budget,
and is evaluated on those questions with their labels (greedy pass@1, avg@k, maj@k at the same
evaluation settings). One base evaluation (the unadapted model) is shared by all methods.

Layout, under ``bench/results/quality/<tag>/`` (``--tag`` names one experiment):

- ``base.json``: the base evaluation (metrics and one record per question);
- the adaptation run directory, ``<runs root>/<tag>/<method>-lr<lr>-s<seed>/`` (``--runs-root``, by
  default ``~/.cache/spine-ttrl/bench/quality``, outside the work tree so that it outlives a checkout;
  a checkpoint every step, so an interrupted run resumes from its last step);
- ``<method>-lr<lr>-s<seed>.json``: the finished run (evaluation metrics and records, per-step
  metrics, wall time). A run whose JSON exists is skipped: re-running the command resumes a sweep;
- ``summary.json``, ``summary.md``, ``curves.png``: written by every invocation from the files present
  (for ``--pool``: the pooled numbers, each block's greedy pass@1 / avg@k and each method's difference
  from that block's base, and each step's metrics averaged over the blocks and seeds).

Examples::

    # learning-rate grid on a separate seed of generated questions (tuning set)
    python bench/quality.py --tag tune-L2 --data arith:2:64:4242 --methods ttrl spine spine-v2 \\
        --lrs 1e-6 3e-6 1e-5 --seeds 0 --steps 8
    # the evaluation questions: chosen learning rate per method, two seeds
    python bench/quality.py --tag main-L2 --data arith:2:256:7 --methods none ttrl spine spine-v2 \\
        --lr ttrl=3e-6 spine=1e-5 spine-v2=1e-5 --seeds 0 1 --steps 32
    # an ablation on the same questions: SPINE's forking selection without the entropy band
    python bench/quality.py --tag main-L2 --data arith:2:256:7 --methods spine --lr spine=1e-5 \
        --seeds 0 1 --steps 32 --set spine.band=none --variant noband
    # the evaluation set in blocks: the same protocol on disjoint 16-question sets, then pooled
    python bench/quality.py --tag block2-L5 --data arith:5:16:8 ...   # one block per tag
    python bench/quality.py --tag pooled-L5 --pool pilot-L5 block2-L5 # means, SEs, CIs over all questions
                                                                    # (refused if blocks share a question)

The summary reports, per method, the metrics before/after (mean over seeds), the ``\\boxed{}``
format rate, pseudo-label accuracy, completion length and entropy at forking/other tokens, wall
time, and paired-bootstrap 95 % confidence intervals (questions resampled, per-question values
averaged over seeds first) of SPINE - TTRL and SPINE - base for greedy pass@1 and avg@k.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent / "results" / "quality"
# "none" (the unadapted model) and every preset of the project (spine_ttrl.config.PRESETS): TTRL, SPINE
# v1/v2 and the neighbours (ttrv, evol-rl, ettrl, siren).
METHODS = ("none", "ttrl", "spine", "spine-v2", "ttrv", "evol-rl", "ettrl", "siren")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def _records(res) -> list[dict]:
    """Per-question records without the long texts (the run directory keeps samples)."""
    return [{k: v for k, v in r.items() if k != "greedy_text"} for r in res.records]


def base_config(args, method: str, seed: int, lr: float, out: Path):
    from spine_ttrl import make_config

    overrides = {
        "model": {"model": args.model, "precision": args.precision, "lora_r": args.lora_r},
        "data": {"data": args.data},
        "sampling": {"num_votes": args.votes, "num_train_samples": args.votes, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature},
        "optim": {"steps": 0 if method == "none" else args.steps, "questions_per_step": args.questions_per_step, "lr": lr,
                  "micro_batch_size": args.micro_batch_size},
        "eval": {"eval_samples": args.k, "eval_temperature": args.eval_temperature, "eval_top_p": 1.0,
                 "eval_max_new_tokens": args.max_new_tokens, "skip_eval_before": method != "none"},
        "run": {"out": str(out), "seed": seed, "threads": args.threads, "save_every": 1, "keep_checkpoints": 1,
                "progress": args.progress},
    }
    if args.model is None:
        del overrides["model"]["model"]
    for section, fields in (parse_sets(args.set).items() if method != "none" else ()):
        overrides.setdefault(section, {}).update(fields)
    return make_config(method, overrides=overrides)


#: The ``spine`` settings that act only through the entropy band: inert in a run without one (TTRL).
BAND_ONLY = frozenset({"beta_low", "beta_up", "band_low_q", "band_high_q", "band_anchor", "band_rows"})


def method_settings_changed(saved: dict, cfg) -> str | None:
    """Why a run saved with the settings ``saved`` (its ``config.toml``, as a dict) must not be resumed
    with ``cfg``, or None. The method's settings (the ``spine`` section) and the learning rate must be
    the run's own: a changed default (β, say) would otherwise continue the run with another method
    under its old name. A field the saved config lacks (added to the project later) is not compared,
    nor a setting that has no effect in either (the band's weights when both run without a band)."""
    from spine_ttrl.config import to_dict

    now, was = to_dict(cfg), saved.get("spine", {})
    inert = set()  # settings with no effect in both: a band weight without a band, a KL's tokens without a KL
    if was.get("band") == now["spine"]["band"] == "none":
        inert |= BAND_ONLY
    if was.get("kl_coef") == now["spine"]["kl_coef"] == 0:
        inert.add("kl_tokens")
    diffs = [f"spine.{k} {was[k]!r} -> {v!r}" for k, v in now["spine"].items()
             if k in was and k not in inert and was[k] != v]
    old_lr = saved.get("optim", {}).get("lr")
    if old_lr is not None and old_lr != now["optim"]["lr"]:
        diffs.append(f"optim.lr {old_lr!r} -> {now['optim']['lr']!r}")
    if not diffs:
        return None
    return ("its method settings differ from this command's: " + ", ".join(diffs)
            + " (pass the run's own values with --set, or give the new settings a --variant)")


def saved_config_to_resume(run_dir: Path, cfg) -> dict:
    """The saved settings (``run_dir/config.toml``, as a dict) of a run that ``cfg`` may resume;
    exits with a one-line message when :func:`method_settings_changed` says it may not."""
    from spine_ttrl.config import load_toml

    saved = load_toml(run_dir / "config.toml")
    if why := method_settings_changed(saved, cfg):
        raise SystemExit(f"{run_dir}: not resumed: {why}")
    return saved


def run_one(args, tag_dir: Path, method: str, seed: int, lr: float) -> Path:
    from spine_ttrl import adapt

    name = "base" if method == "none" else f"{run_key(method, args.variant, lr)}-s{seed}"
    out_json = tag_dir / f"{name}.json"
    if out_json.exists():
        return out_json
    run_dir = tag_dir / name  # older sweeps kept their run directories in the work tree
    if not (run_dir / "config.toml").exists():
        run_dir = Path(args.runs_root).expanduser() / tag_dir.name / name
    cfg = base_config(args, method, seed, lr, run_dir)
    if (run_dir / "config.toml").exists():
        saved_config_to_resume(run_dir, cfg)
        cfg.run.resume, cfg.run.out = str(run_dir), ""
    print(f"== {tag_dir.name}/{name}", flush=True)
    t0 = time.perf_counter()
    res = adapt(cfg)
    wall = time.perf_counter() - t0
    ev = res.eval_before if method == "none" else res.eval_after
    if not ev.records:  # a resumed run that had already finished: evaluate again is not needed, but records are
        raise RuntimeError(f"{run_dir}: finished run without per-question records; delete it and run again")
    record = {"method": method, "variant": args.variant, "set": args.set, "seed": seed, "lr": lr, "data": args.data,
              "model": args.model or "embedded",
              "wall_s": wall, "eval": ev.metrics, "records": _records(ev), "steps": res.metrics}
    _write_json(out_json, record)
    if method == "none":
        shutil.rmtree(run_dir, ignore_errors=True)
    else:  # keep logs and plots, drop the weights
        shutil.rmtree(run_dir / "final", ignore_errors=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return out_json


# ----------------------------------------------------------------------------- analysis

PER_QUESTION = ("greedy", "avg", "maj", "agree", "split_greedy_right", "split_majority_right", "changed")


def per_question(record: dict, k: int, base: dict | None = None) -> dict[str, np.ndarray]:
    """Per-question arrays of one evaluation (each of length n = questions, values in [0, 1]):

    - ``greedy``, ``avg``, ``maj``: greedy answer correct, share of the k samples correct, the samples'
      majority answer correct;
    - ``agree`` = a_i: the greedy answer is equivalent to the samples' majority answer (math-verify; no
      answer in either counts as disagreement);
    - ``split_greedy_right`` = (1 − a_i)·greedy_i and ``split_majority_right`` = (1 − a_i)·maj_i: where
      the two disagree, which one is right;
    - ``changed``: the greedy answer differs from the greedy answer of ``base`` (the base evaluation's
      record) on the same question id — not equivalent, and not both missing; NaN without ``base`` or
      for an id ``base`` lacks.
    """
    from spine_ttrl.answers import is_equivalent

    recs = record["records"]
    greedy = np.array([float(r.get("greedy_correct", False)) for r in recs])
    maj = np.array([float(r.get("maj_correct", False)) for r in recs])
    agree = np.array([float(is_equivalent(r.get("greedy_answer"), r.get("majority"))) for r in recs])
    base_greedy = {b["id"]: b.get("greedy_answer") for b in base["records"]} if base else {}

    def changed(r: dict) -> float:
        if r.get("id") not in base_greedy:
            return float("nan")
        a, b = r.get("greedy_answer"), base_greedy[r["id"]]
        return float(not ((a is None and b is None) or is_equivalent(a, b)))

    return {"greedy": greedy, "avg": np.array([r.get("samples_correct", 0) / k for r in recs]), "maj": maj,
            "agree": agree, "split_greedy_right": (1 - agree) * greedy, "split_majority_right": (1 - agree) * maj,
            "changed": np.array([changed(r) for r in recs])}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over questions and its 95 % percentile interval (questions resampled with replacement)."""
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    return {"diff": float(d.mean()), "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5))}


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _step_mean(steps: list[dict], key: str, which: str) -> float:
    vals = [s[key] for s in steps if key in s and not (isinstance(s[key], float) and math.isnan(s[key]))]
    if not vals:
        return float("nan")
    return float(vals[0] if which == "first" else vals[-1] if which == "last" else np.mean(vals))


def _compute_s(record: dict) -> float:
    """Training + final evaluation seconds of a run, from its logs (counts steps done before a resume,
    which the process wall time of a resumed run misses)."""
    steps = sum(s.get("time/step_s", 0.0) for s in record["steps"])
    return float(steps + record["eval"].get("time_s", float("nan")))


def _load_block(tag_dir: Path) -> tuple[dict | None, dict[str, list[dict]]]:
    """The base record (or None) and the finished runs of one tag, grouped by run key (seeds sorted)."""
    base_file = tag_dir / "base.json"
    base = json.loads(base_file.read_text()) if base_file.exists() else None
    runs: dict[str, list[dict]] = {}
    records = [json.loads(f.read_text()) for f in tag_dir.glob("*-lr*-s*.json")]
    for r in sorted(records, key=lambda r: (METHODS.index(r["method"]), r.get("variant", ""), r["lr"], r["seed"])):
        runs.setdefault(run_key(r["method"], r.get("variant", ""), r["lr"]), []).append(r)
    return base, runs


def _seed_mean_arrays(rs: list[dict], k: int, base: dict | None) -> dict[str, np.ndarray]:
    """Per-question arrays of a run key (:func:`per_question`, ``changed`` against ``base``), averaged over
    its seeds (question order kept)."""
    arrays = [per_question(r, k, base) for r in rs]
    return {m: np.mean([a[m] for a in arrays], axis=0) for m in PER_QUESTION}


def _answer_stats(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over questions of the greedy-vs-samples arrays of :func:`per_question` (NaN if any
    question lacks a value, e.g. ``greedy_changed`` of the base or of a block without one)."""
    return {"greedy_is_majority": float(arrays["agree"].mean()),
            "split_greedy_right": float(arrays["split_greedy_right"].mean()),
            "split_majority_right": float(arrays["split_majority_right"].mean()),
            "greedy_changed": float(arrays["changed"].mean())}


def reference_method(record: dict) -> str:
    """The role of a run in the comparisons: its method, or ``"ttrl-switch"`` for a TTRL run whose
    ``--set`` changes a method setting (``spine.…``: a neighbour's single switch such as
    ``spine.reward=leave-one-out``). Plain TTRL runs, and TTRL runs that change only other sections
    (``model.precision=fp32``: the same method at another precision) or settings of the band TTRL
    does not have (:data:`BAND_ONLY`), are the references."""
    changed = [str(s).split("=", 1)[0] for s in record.get("set") or [] if str(s).startswith("spine.")]
    if record["method"] == "ttrl" and any(k.removeprefix("spine.") not in BAND_ONLY for k in changed):
        return "ttrl-switch"
    return record["method"]


def _comparisons(pq: dict[str, dict[str, np.ndarray]], method_of: dict[str, str]) -> dict:
    """Paired bootstraps: every SPINE run key (v1, then v2) against every reference TTRL key and the
    base, TTRL against the base, then every neighbour — a preset (ttrv, evol-rl, ettrl, siren) or a
    TTRL run with one switch (``method_of`` = "ttrl-switch", :func:`reference_method`) — against
    every reference TTRL key and the base. ``pq`` maps run keys (and optionally "base") to
    per-question arrays; ``method_of`` maps run keys to their :func:`reference_method`."""
    comparisons = {}
    has_base = "base" in pq
    spine_keys = [m for m in method_of if method_of[m] == "spine"] + [m for m in method_of if method_of[m] == "spine-v2"]
    ttrl_keys = [m for m in method_of if method_of[m] == "ttrl"]
    for s in spine_keys:
        for other in ttrl_keys + (["base"] if has_base else []):
            comparisons[f"{s} - {other}"] = {m: paired_bootstrap(pq[s][m], pq[other][m]) for m in ("greedy", "avg")}
    if has_base:  # TTRL's own gain, for reference
        for t in ttrl_keys:
            comparisons[f"{t} - base"] = {m: paired_bootstrap(pq[t][m], pq["base"][m]) for m in ("greedy", "avg")}
    neighbours = [m for m in method_of if method_of[m] not in ("ttrl", "spine", "spine-v2")]
    for n in neighbours:  # the neighbour presets and TTRL's single switches, as SPINE is compared
        for other in ttrl_keys + (["base"] if has_base else []):
            comparisons[f"{n} - {other}"] = {m: paired_bootstrap(pq[n][m], pq[other][m]) for m in ("greedy", "avg")}
    return comparisons


def _train_stats(rs: list[dict]) -> dict[str, float]:
    """Training-curve numbers of a set of runs (seeds, or blocks x seeds), each the mean over the runs:
    pseudo-label accuracy (mean over steps), rollout accuracy and completion length at the first and
    last step, entropy of the selected (forking) and the other tokens (mean over steps), and the
    training + evaluation seconds of one run."""
    steps = [r["steps"] for r in rs]

    def over_runs(key: str, which: str) -> float:
        return _nanmean([_step_mean(s, key, which) for s in steps])

    return {"wall_s": float(np.mean([_compute_s(r) for r in rs])),
            "pseudo_label_accuracy": over_runs("vote/label_accuracy", "mean"),
            "sample_accuracy_first": over_runs("vote/sample_accuracy", "first"),
            "sample_accuracy_last": over_runs("vote/sample_accuracy", "last"),
            "length_first": over_runs("completion/length_mean", "first"),
            "length_last": over_runs("completion/length_mean", "last"),
            "entropy_forking_mean": over_runs("entropy/forking_mean", "mean"),
            "entropy_other_mean": over_runs("entropy/other_mean", "mean")}


def summarize(tag_dir: Path, k: int) -> dict:
    base, runs = _load_block(tag_dir)
    out: dict = {"tag": tag_dir.name, "k": k, "methods": {}}
    if base:
        out["base"] = {m: base["eval"].get(m) for m in
                       ("greedy_pass@1", "greedy_pass@1_se", f"avg@{k}", f"avg@{k}_se", f"maj@{k}", f"maj@{k}_se",
                        f"pass@{k}", "majority_ratio", "distinct_answers", "greedy_boxed_rate", "sample_boxed_rate",
                        "greedy_length", "sample_length", "sample_truncated_rate")}
    pq: dict[str, dict[str, np.ndarray]] = {}
    for key, rs in runs.items():
        ev = {m: float(np.mean([r["eval"].get(m, float("nan")) for r in rs])) for m in rs[0]["eval"]}
        pq[key] = _seed_mean_arrays(rs, k, base)
        ev.update(_answer_stats(pq[key]))
        out["methods"][key] = {"seeds": [r["seed"] for r in rs], "eval": ev, **_train_stats(rs)}
    if base:
        pq["base"] = per_question(base, k)
        out["base"].update(_answer_stats(pq["base"]))
    out["paired_bootstrap"] = _comparisons(pq, {key: reference_method(rs[0]) for key, rs in runs.items()})
    return out


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def check_poolable(blocks: list[tuple[str, dict | None, dict[str, list[dict]]]]) -> None:
    """Refuse to pool blocks that share questions or differ in model (``SystemExit``, one line).

    Each block's question set is read from its records' ``data`` spec (``arith:…`` is regenerated, a
    file is loaded if it still exists) and compared by prompt text; two blocks with the same spec, or
    any prompt in two blocks, would count questions twice.
    """
    from spine_ttrl.data import DataError, load_examples

    names = [b[0] for b in blocks]
    if len(set(names)) < len(names):
        raise SystemExit(f"--pool: a block is named twice in {names}")
    specs: dict[str, str] = {}
    models: dict[str, set] = {}
    for name, base, runs in blocks:
        records = ([base] if base else []) + [r for rs in runs.values() for r in rs]
        data = {r.get("data") for r in records} - {None}
        if len(data) > 1:
            raise SystemExit(f"--pool: {name} mixes question sets {sorted(data)}")
        if data:
            specs[name] = data.pop()
        for r in records:
            models.setdefault(str(r.get("model")), set()).add(name)
    if len(models) > 1:
        raise SystemExit(f"--pool: the blocks use different models: "
                         + "; ".join(f"{m} in {sorted(b)}" for m, b in models.items()))
    block_of_spec: dict[str, str] = {}
    for name, spec in specs.items():
        if spec in block_of_spec:
            raise SystemExit(f"--pool: {block_of_spec[spec]} and {name} are the same questions ({spec})")
        block_of_spec[spec] = name
    prompts: dict[str, str] = {}
    for name, spec in specs.items():
        try:
            examples = load_examples(spec)
        except DataError:
            continue  # a file that moved: only the spec comparison above applies
        for ex in examples:
            if ex.prompt in prompts and prompts[ex.prompt] != name:
                raise SystemExit(f"--pool: {prompts[ex.prompt]} and {name} share the question {ex.prompt[:60]!r}")
            prompts[ex.prompt] = name


def summarize_pool(tag_dirs: list[Path], k: int, name: str) -> dict:
    """Pool blocks of questions run with the same protocol (e.g. adapt on 16 questions, evaluate them).

    Each block is one tag: its own questions, base evaluation and adaptation runs. A run key
    (method, variant, lr) is pooled only if every block has it, with the same seeds; its
    per-question values (seeds averaged within the block) are concatenated over blocks, so the
    means, standard errors and paired bootstraps are over all pooled questions. The base is pooled
    only if every block has one. Other evaluation numbers (majority share, lengths, format rates)
    are question-weighted means of the blocks' seed means. ``per_block`` keeps each block's greedy
    pass@1 and avg@k (base and pooled run keys), so that the spread between blocks stays visible.
    """
    if not tag_dirs:
        raise ValueError("no blocks to pool")
    blocks = []
    for d in tag_dirs:
        if not d.is_dir():
            raise SystemExit(f"--pool: no such experiment {d}")
        blocks.append((d.name, *_load_block(d)))
    check_poolable(blocks)
    out: dict = {"tag": name, "k": k, "pooled": [b[0] for b in blocks], "methods": {}, "left_out": {}}
    pq: dict[str, dict[str, np.ndarray]] = {}
    method_of: dict[str, str] = {}
    extra = (f"pass@{k}", "majority_ratio", "greedy_boxed_rate", "sample_boxed_rate", "greedy_length", "sample_length")

    def pooled_row(per_block: list[tuple[list[dict], dict[str, np.ndarray]]]) -> dict:
        arrays = {m: np.concatenate([a[m] for _, a in per_block]) for m in PER_QUESTION}
        n = [len(a["greedy"]) for _, a in per_block]
        row = {"questions": int(sum(n)), **_answer_stats(arrays)}
        for m, label in (("greedy", "greedy_pass@1"), ("avg", f"avg@{k}"), ("maj", f"maj@{k}")):
            row[label], row[f"{label}_se"] = _mean_se(arrays[m])
        for m in extra:
            vals = [np.mean([r["eval"].get(m, float("nan")) for r in rs]) for rs, _ in per_block]
            row[m] = float(np.average(vals, weights=n))
        return row, arrays

    # per block: the block's mean greedy pass@1 and avg@k of the base and of each pooled run key
    out["per_block"] = [{"block": name, "questions": len(base["records"]) if base else None, "base": None,
                         "methods": {}} for name, base, _ in blocks]
    if all(b[1] is not None for b in blocks):
        per_block_base = [([base], per_question(base, k)) for _, base, _ in blocks]
        row, pq["base"] = pooled_row(per_block_base)
        out["base"] = row
        for entry, (_, arrays) in zip(out["per_block"], per_block_base):
            entry["base"] = _block_means(arrays)
    for key, rs0 in blocks[0][2].items():
        seeds = [r["seed"] for r in rs0]
        missing = [b[0] for b in blocks if [r["seed"] for r in b[2].get(key, [])] != seeds]
        if missing:
            out["left_out"][key] = f"seeds {seeds} not finished in {', '.join(missing)}"
            continue
        per_block = [(b[2][key], _seed_mean_arrays(b[2][key], k, b[1])) for b in blocks]
        row, pq[key] = pooled_row(per_block)
        for entry, (_, arrays) in zip(out["per_block"], per_block):
            entry["questions"] = len(arrays["greedy"])
            entry["methods"][key] = _block_means(arrays)
        row.update(seeds=seeds, **_train_stats([r for rs, _ in per_block for r in rs]))
        out["methods"][key] = row
        method_of[key] = reference_method(rs0[0])
    out["paired_bootstrap"] = _comparisons(pq, method_of)
    out["questions_for_se"] = questions_for_se(([out["base"]] if "base" in out else []) + list(out["methods"].values()), k)
    return out


def _block_means(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Greedy pass@1 and avg@k of one block: means over its questions of :func:`per_question`'s
    ``greedy`` and ``avg`` (seeds already averaged)."""
    return {"greedy": float(arrays["greedy"].mean()), "avg": float(arrays["avg"].mean())}


def blocks_beyond(per_block: list[dict], key: str, against: str, metric: str, sign: int) -> int:
    """On how many blocks run key ``key`` is above (``sign`` = 1) or below (−1) ``against`` — "base" or
    another run key — on ``metric`` ("greedy" or "avg"): count of blocks with sign·(key − against) > 0,
    ties counting as neither; ``per_block`` is a pool summary's ``per_block``."""
    def ref(b: dict) -> float:
        return b["base"][metric] if against == "base" else b["methods"][against][metric]
    return sum(sign * (b["methods"][key][metric] - ref(b)) > 1e-12 for b in per_block)


def _per_block_lines(summary: dict) -> list[str]:
    """The per-block table of a pool: each block's base greedy pass@1 / avg@k, and each pooled run
    key's difference from that base in points (its own values if the pool has no base); then, per
    run key, on how many blocks it is above and below the base (ties count as neither)."""
    blocks, k = summary.get("per_block") or [], summary["k"]
    keys = list(summary["methods"])
    if not blocks or not keys:
        return []
    has_base = all(b["base"] is not None for b in blocks)
    head = ["block", "questions"] + ([f"base greedy / avg@{k}"] if has_base else [])
    head += [f"{key} − base (points)" if has_base else f"{key} greedy / avg@{k}" for key in keys]
    lines = ["", f"Per block (greedy pass@1 / avg@{k}):", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for b in blocks:
        cells = [b["block"], str(b["questions"])]
        if has_base:
            base = b["base"]
            cells.append(f"{base['greedy']:.3f} / {base['avg']:.3f}")
            cells += [f"{100 * (b['methods'][key]['greedy'] - base['greedy']):+.1f} / "
                      f"{100 * (b['methods'][key]['avg'] - base['avg']):+.1f}" for key in keys]
        else:
            cells += [f"{b['methods'][key]['greedy']:.3f} / {b['methods'][key]['avg']:.3f}" for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    if has_base:
        n = len(blocks)
        for word, sign in (("above", 1), ("below", -1)):
            cells = [f"blocks {word} base", "", ""]
            for key in keys:
                count = {m: blocks_beyond(blocks, key, "base", m, sign) for m in ("greedy", "avg")}
                cells.append(f"{count['greedy']} / {count['avg']} of {n}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def questions_for_se(rows: list[dict], k: int, target: float = 0.03) -> dict:
    """Questions needed for a standard error ≤ ``target`` at the pooled rows' spreads.

    SE = sd / √n, so n' = ⌈n · (SE / target)²⌉ per row and metric; the largest over the rows is
    reported (every method's SE must reach the target), for greedy pass@1 and avg@k.
    """
    out: dict = {"target": target}
    for label in ("greedy_pass@1", f"avg@{k}"):
        # a hair below the product, so that an exact integer is not rounded up by float error
        need = [math.ceil(r["questions"] * (r[f"{label}_se"] / target) ** 2 - 1e-9)
                for r in rows if r.get(f"{label}_se") == r.get(f"{label}_se")]
        out[label] = max(need) if need else None
    return out


def _eval_cells(e: dict, k: int) -> str:
    """The evaluation columns of a summary row: greedy pass@1, avg@k, maj@k (± standard errors),
    pass@k, majority share, share of greedy answers equal to the samples' majority, boxed rates and
    lengths of greedy / sampled answers."""
    def with_se(m: str) -> str:
        se = e.get(f"{m}_se")
        return _fmt(e.get(m)) + ("" if se is None else f"±{_fmt(se)}")

    return (f"{with_se('greedy_pass@1')} | {with_se(f'avg@{k}')} | {with_se(f'maj@{k}')} | "
            f"{_fmt(e.get(f'pass@{k}'))} | {_fmt(e.get('majority_ratio'))} | "
            f"{_fmt(e.get('greedy_is_majority'), '.2f')} | "
            f"{_fmt(e.get('greedy_boxed_rate'), '.2f')} / {_fmt(e.get('sample_boxed_rate'), '.2f')} | "
            f"{_fmt(e.get('greedy_length'), '.0f')} / {_fmt(e.get('sample_length'), '.0f')}")


def _comparison_lines(comparisons: dict) -> list[str]:
    if not comparisons:
        return []
    lines = ["", "| comparison | greedy pass@1 diff [95 % CI] | avg@k diff [95 % CI] |", "|---|---|---|"]
    for name, c in comparisons.items():
        g, a = c["greedy"], c["avg"]
        lines.append(f"| {name} | {g['diff']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] | "
                     f"{a['diff']:+.3f} [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}] |")
    return lines


def _answer_lines(rows: list[tuple[str, dict]], k: int) -> list[str]:
    """The greedy-vs-samples table: per row, shares of questions whose greedy answer changed from the
    base's, differs from the majority of the k samples, and, among those, is right / the majority is."""
    if not rows:
        return []
    lines = ["", f"| method | greedy changed vs base | greedy ≠ majority@{k} | … and greedy right | "
             "… and majority right |", "|---|---|---|---|---|"]
    for label, e in rows:
        split = 1 - e["greedy_is_majority"] if e.get("greedy_is_majority") is not None else None
        lines.append(f"| {label} | {_fmt(e.get('greedy_changed'), '.2f')} | {_fmt(split, '.2f')} | "
                     f"{_fmt(e.get('split_greedy_right'), '.2f')} | {_fmt(e.get('split_majority_right'), '.2f')} |")
    return lines


_TRAIN_HEADER = "pseudo-label acc | rollout acc first→last | length first→last | H fork / other | train+eval s"


def _train_cells(r: dict) -> str:
    """The training columns of a summary row (see :func:`_train_stats`)."""
    return (f"{_fmt(r['pseudo_label_accuracy'])} | "
            f"{_fmt(r['sample_accuracy_first'])}→{_fmt(r['sample_accuracy_last'])} | "
            f"{_fmt(r['length_first'], '.0f')}→{_fmt(r['length_last'], '.0f')} | "
            f"{_fmt(r['entropy_forking_mean'], '.2f')} / {_fmt(r['entropy_other_mean'], '.2f')} | "
            f"{_fmt(r['wall_s'], '.0f')}")


def _table_header(k: int, first: str) -> list[str]:
    cols = [first, f"greedy pass@1 | avg@{k} | maj@{k} | pass@{k} | majority share | greedy = majority | "
            f"boxed greedy / sampled | eval length greedy / sampled | {_TRAIN_HEADER}"]
    n = sum(c.count("|") + 1 for c in cols)
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * n]


def write_pool_markdown(summary: dict, path: Path) -> None:
    rows = [(f"{name} (seeds {r['seeds']})", r, r) for name, r in summary["methods"].items()]
    footer = []
    need = summary.get("questions_for_se")
    if need:
        k = summary["k"]
        footer = ["", f"Standard error ≤ {need['target']:g} at these spreads needs ≈ {need['greedy_pass@1']} "
                  f"questions for greedy pass@1 and ≈ {need[f'avg@{k}']} for avg@{k} (the largest over the rows; "
                  f"n · (SE / {need['target']:g})²)."]
    footer += _per_block_lines(summary)
    if summary["left_out"]:
        footer += ["", "Left out (pooled only if finished in every block with the same seeds): "
                  + "; ".join(f"{key} ({why})" for key, why in summary["left_out"].items()) + "."]
    _write_table(path, f"{summary['tag']} (pooled: {', '.join(summary['pooled'])})", summary, rows, footer,
                 questions=True)


def _write_table(path: Path, title: str, summary: dict, rows: list[tuple[str, dict, dict]], footer: list[str],
                 questions: bool) -> None:
    """``summary.md``: the base row, one row per (label, evaluation numbers, training numbers), the
    paired-bootstrap comparisons, the greedy-vs-samples table (:func:`_answer_lines`), then ``footer``;
    a "questions" column if ``questions``."""
    k = summary["k"]
    lines = [f"### {title}", "", *_table_header(k, "method | questions" if questions else "method")]

    def cells(label: str, ev: dict, train: dict | None) -> str:
        n = f" {ev['questions']} |" if questions else ""
        rest = f" {_train_cells(train)} |" if train else " |" * (_TRAIN_HEADER.count("|") + 1)
        return f"| {label} |{n} {_eval_cells(ev, k)} |{rest}"

    rows = ([("base", summary["base"], None)] if "base" in summary else []) + rows
    lines += [cells(label, ev, train) for label, ev, train in rows]
    lines += (_comparison_lines(summary["paired_bootstrap"]) + _answer_lines([(label, ev) for label, ev, _ in rows], k)
              + footer)
    path.write_text("\n".join(lines) + "\n")


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None or value != value else format(value, spec)


def write_markdown(summary: dict, path: Path) -> None:
    rows = [(f"{name} (seeds {r['seeds']})", r["eval"], r) for name, r in summary["methods"].items()]
    _write_table(path, summary["tag"], summary, rows, [], questions=False)


def plot_curves(tag_dir: Path) -> Path | None:
    """``curves.png`` of one tag: the per-step metrics of every finished run (one line per run)."""
    records = [json.loads(f.read_text()) for f in sorted(tag_dir.glob("*-lr*-s*.json"))]
    series = {f"{run_key(r['method'], r.get('variant', ''), r['lr'])} s{r['seed']}": [r] for r in records}
    return _plot_series(series, tag_dir / "curves.png")


def plot_pool_curves(tag_dirs: list[Path], keys: list[str], out: Path) -> Path | None:
    """``curves.png`` of a pool: per run key, each step's metric averaged over all blocks and seeds."""
    series: dict[str, list[dict]] = {key: [] for key in keys}
    for d in tag_dirs:
        for key, rs in _load_block(d)[1].items():
            if key in series:
                series[key] += rs
    return _plot_series({f"{key} (mean of {len(rs)} runs)": rs for key, rs in series.items() if rs}, out)


def _plot_series(series: dict[str, list[dict]], out: Path) -> Path | None:
    """One line per label: the step-wise mean over its runs of each metric (steps a run lacks are skipped)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series:
        return None
    panels = [("completion/length_mean", "completion length (tokens)"), ("vote/label_accuracy", "pseudo-label accuracy"),
              ("vote/sample_accuracy", "rollout accuracy vs labels (online avg@votes)"), ("reward/mean", "pseudo-reward"),
              ("entropy/all_mean", "entropy, all completion tokens"),
              ("entropy/forking_mean", "entropy, selected tokens (ttrl: all)"),
              ("entropy/other_mean", "entropy, unselected tokens"), ("loss/band", "band penalty")]
    fig = Figure(figsize=(19, 8))  # the Agg canvas directly: no global pyplot state
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(series.items()):
        # one colour per label in every panel, also where an earlier label has no data
        style = {"color": colors[i % len(colors)], "linestyle": "-" if i < len(colors) else "--"}
        for ax, (key, title) in zip(axes.flat, panels):
            by_step: dict[int, list[float]] = {}
            for r in runs:
                for s in r["steps"]:
                    if key in s and s[key] == s[key]:
                        by_step.setdefault(s["step"], []).append(s[key])
            if by_step:
                xs = sorted(by_step)
                ax.plot(xs, [float(np.mean(by_step[x])) for x in xs], marker=".", label=label, **style)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def run_key(method: str, variant: str | None, lr: float) -> str:
    """Name of a method setting: ``spine-lr0.0001``, or ``spine+noband-lr0.0001`` for a variant."""
    return f"{method}{'+' + variant if variant else ''}-lr{lr:g}"


def parse_sets(values: list[str]) -> dict[str, dict[str, str]]:
    """``--set spine.band=none optim.clip_eps=0.3`` -> {"spine": {"band": "none"}, "optim": {...}}."""
    out: dict[str, dict[str, str]] = {}
    for v in values:
        key, sep, value = v.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not section or not field:
            raise SystemExit(f"--set: expected section.field=value, got {v!r}")
        out.setdefault(section, {})[field] = value
    return out


def parse_lrs(values: list[str], methods: list[str]) -> dict[str, list[float]]:
    """``--lr 1e-5`` (all methods) or ``--lr ttrl=3e-6 spine=1e-5``; ``--lrs`` gives a grid."""
    out: dict[str, list[float]] = {}
    for v in values:
        if "=" in v:
            m, x = v.split("=", 1)
            if m not in METHODS:
                raise SystemExit(f"--lr: unknown method {m!r}")
            out.setdefault(m, []).append(float(x))
        else:
            for m in methods:
                out.setdefault(m, []).append(float(v))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True, help="experiment name (directory under bench/results/quality)")
    ap.add_argument("--data", help="questions, e.g. arith:2:256:7 (needed to run, not for --report-only or --pool)")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", "--lrs", dest="lrs", nargs="+", default=["1e-5"],
                    help="one value, a grid, or method=value pairs")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--questions-per-step", type=int, default=8)
    ap.add_argument("--votes", type=int, default=8, help="samples per question for the vote (and the update)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the votes")
    ap.add_argument("--k", type=int, default=8, help="evaluation samples per question (avg@k, maj@k)")
    ap.add_argument("--eval-temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--runs-root", default="~/.cache/spine-ttrl/bench/quality",
                    help="where the run directories (checkpoints, logs) live; results go to bench/results/quality")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                    help="extra config settings for every trained method (an ablation); needs --variant")
    ap.add_argument("--variant", default="", help="name of the --set variant, part of the run names (spine+NAME-lr...)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild summary files")
    ap.add_argument("--pool", nargs="+", default=[], metavar="TAG",
                    help="pool finished blocks (tags run with the same protocol on disjoint questions) into "
                         "--tag's summary.json / summary.md; runs nothing")
    args = ap.parse_args()
    if bool(args.set) != bool(args.variant):
        ap.error("--set and --variant go together: a variant must be named so its runs are not mixed with the preset's")
    parse_sets(args.set)  # fail on a malformed setting before any run starts

    tag_dir = ROOT / args.tag
    if args.pool:
        summary = summarize_pool([ROOT / t for t in args.pool], args.k, args.tag)
        tag_dir.mkdir(parents=True, exist_ok=True)
        _write_json(tag_dir / "summary.json", summary)
        write_pool_markdown(summary, tag_dir / "summary.md")
        plot_pool_curves([ROOT / t for t in args.pool], list(summary["methods"]), tag_dir / "curves.png")
        print((tag_dir / "summary.md").read_text())
        return
    if not args.report_only and not args.data:
        ap.error("--data is needed to run (only --report-only and --pool work without it)")
    tag_dir.mkdir(parents=True, exist_ok=True)
    lrs = parse_lrs(args.lrs, [m for m in args.methods if m != "none"])
    if not args.report_only:
        if "none" in args.methods:
            run_one(args, tag_dir, "none", 0, 0.0)
        for seed in args.seeds:
            for method in args.methods:
                if method == "none":
                    continue
                for lr in lrs.get(method, []):
                    run_one(args, tag_dir, method, seed, lr)
    summary = summarize(tag_dir, args.k)
    _write_json(tag_dir / "summary.json", summary)
    write_markdown(summary, tag_dir / "summary.md")
    plot_curves(tag_dir)
    print((tag_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
