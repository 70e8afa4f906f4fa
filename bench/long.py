"""Long transductive adaptation: every question trained on many times (TTRL's protocol), per method.

A fixed set of questions is adapted on for ``--episodes`` passes (an episode = every question once:
``ceil(questions / questions_per_step)`` steps), with a greedy evaluation of every question every
``--eval-every-episodes`` episodes and the sampled avg@k / maj@k before and after. Every run logs
the update-size diagnostics (``diagnostics``: weight change, KL(new‖old), gradient norm of each
loss term) so step sizes can be compared between methods, on the first step of every episode
(``diagnostics_every`` = one episode: on every step they cost an extra no-grad pass and one
backward per loss term, ≈ 30 % of a SPINE step on the benchmark model).

Runs are resumable: each run directory lives under ``--runs-root`` (default
``~/.cache/spine-ttrl/bench/long``, outside the work tree, with a checkpoint after every step);
re-running the same command continues where it stopped. Its small logs (``config.toml``,
``metrics.jsonl``, ``eval.jsonl``, ``eval_records.jsonl``) are copied to
``bench/results/long/<tag>/<run>/`` after every run and with ``--sync``.

Examples::

    M=~/.cache/spine-ttrl/bench/qwen2.5-coder-0.5b-instruct.gguf     # python bench/fetch_qwen.py
    # learning-rate tuning on separate questions
    python bench/long.py --tag tune-L5 --model $M --data arith:5:16:4242 --methods ttrl spine \\
        --lrs 3e-5 1e-4 3e-4 --seeds 0 1 --episodes 12
    # a band variant: --set section.field=value, named by --variant
    python bench/long.py --tag tune-L5 ... --methods spine --set spine.beta_low=0.3 spine.beta_up=0.3 --variant b0.3
    # curves, final / best episode, paired-bootstrap intervals, label-free stopping
    python bench/long.py --tag tune-L5 --summary
    # ... compared with other reference keys than the plain TTRL one
    python bench/long.py --tag tune-L5 --summary --reference ttrl-lr0.0001 ttrl+same-machine-lr0.0001
    # ... or with one seed of a key that pools several (a run's name)
    python bench/long.py --tag tune-L5 --summary --reference ttrl-lr0.0001 ttrl-lr0.0001-s0
    # an evaluation set in blocks (bench/sets.py svamp 16 0 --offset 16: the second block), pooled
    python bench/long.py --tag svamp16-b1 --model $M --data $(python bench/sets.py svamp 16 0 --offset 16)
    python bench/long.py --tag svamp64 --pool svamp16-b0 svamp16-b1 svamp16-b2 svamp16-b3

The summary (``summary.md``, ``summary.json``, ``curves.png`` under ``bench/results/long/<tag>/``) reports
per run key (method, variant, learning rate; its finished seeds averaged, each unfinished seed of a
key that has a finished one in a row of its own): greedy pass@1 at every evaluated
episode (plotted with its 95 % interval over the questions), the final and the best episode, avg@k /
maj@k before and after, and per complete episode the mean completion length, majority share,
forking-token entropy and update size; paired-bootstrap 95 %
intervals (questions resampled) of every run key against ``ttrl`` (or the ``--reference`` keys) and
against the base at the final and the best episode; and the episode the label-free stopping rule picks (:func:`stop_episode`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine_ttrl.report import read_jsonl  # noqa: E402
from quality import _mean_se, paired_bootstrap, parse_sets, run_key, saved_config_to_resume  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results" / "long"
RUNS_ROOT = Path("~/.cache/spine-ttrl/bench/long").expanduser()
SYNCED = ("config.toml", "metrics.jsonl", "eval.jsonl", "eval_records.jsonl")
MAJORITIES = "majorities.jsonl"  # written by sync from samples.jsonl: the training majority per question and step


def episode_steps(questions: int, questions_per_step: int) -> int:
    """Steps per episode: every question once (the loop visits questions in seeded permutations)."""
    return math.ceil(questions / questions_per_step)


def run_config(args, method: str, seed: int, lr: float, out: Path, n_questions: int):
    """The adaptation config of one run of the long protocol."""
    from spine_ttrl import make_config

    per_episode = episode_steps(n_questions, args.questions_per_step)
    overrides = {
        "model": {"model": args.model, "precision": args.precision, "lora_r": args.lora_r},
        "data": {"data": args.data},
        "sampling": {"num_votes": args.votes, "num_train_samples": args.votes, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature},
        "optim": {"steps": args.episodes * per_episode, "questions_per_step": args.questions_per_step, "lr": lr,
                  "micro_batch_size": args.micro_batch_size, "diagnostics": True,
                  "diagnostics_every": per_episode},
        "eval": {"eval_every": args.eval_every_episodes * per_episode, "eval_every_samples": 0, "eval_samples": args.k,
                 "eval_temperature": args.eval_temperature, "eval_top_p": 1.0,
                 "eval_max_new_tokens": args.max_new_tokens},
        "run": {"out": str(out), "seed": seed, "threads": args.threads, "save_every": 1, "keep_checkpoints": 1,
                "progress": args.progress},
    }
    if args.model is None:
        del overrides["model"]["model"]
    for section, fields in parse_sets(args.set).items():
        overrides.setdefault(section, {}).update(fields)
    return make_config(method, overrides=overrides)


def _steps_logged(run_dir: Path) -> int:
    from spine_ttrl.checkpoint import count_lines

    return count_lines(run_dir / "metrics.jsonl")


def sync(run_dir: Path, dest: Path) -> bool:
    """Copy a run's small logs into the repository's results folder; False (and nothing copied) when
    the copy there has more steps than the run, i.e. the run was started again on a machine that had
    lost its checkpoints: its logs replace the longer ones only once it has caught up."""
    there, here = _steps_logged(dest), _steps_logged(run_dir)
    if there > here:
        print(f"not synced: {dest} has {there} steps, {run_dir} only {here}", file=sys.stderr)
        return False
    dest.mkdir(parents=True, exist_ok=True)
    for name in SYNCED:
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, dest / name)
    if (run_dir / "samples.jsonl").exists():  # the rollouts' texts stay behind; their votes come along
        from spine_ttrl.config import load_toml
        from spine_ttrl.data import load_examples, resolve_task

        data = load_toml(run_dir / "config.toml")["data"]
        examples = load_examples(data["data"])
        trace = majority_trace(read_jsonl(run_dir / "samples.jsonl"), {e.id: e.answer for e in examples},
                               resolve_task(examples, data.get("task", "auto")))
        trace = [r for r in trace if int(r["step"]) <= here]  # a step being trained has its samples, not its metrics yet
        (dest / MAJORITIES).write_text("".join(json.dumps(r) + "\n" for r in trace))
    return True


def sync_tag(runs_root: Path, tag: str) -> None:
    """:func:`sync` every run of ``tag`` under ``runs_root`` whose synced copy is not marked done."""
    for d in sorted((runs_root / tag).glob("*-s*")):
        if (d / "config.toml").exists() and not (ROOT / tag / d.name / "done").exists():
            sync(d, ROOT / tag / d.name)


def majority_trace(samples: list[dict], labels: dict[str, str | None], task: str) -> list[dict]:
    """Each trained question's sampled majority at every step, from ``samples.jsonl`` records
    (``{"step", "questions": [{"id", "answers"}]}``): one row ``{"step", "id", "majority", "votes",
    "of", "label", "right"}`` per question and step — the majority answer
    (:func:`spine_ttrl.answers.majority_vote`, None if nothing parsed), its votes out of ``of``, the
    question's label and whether the majority is equivalent to it (None without a label or a
    majority). Labels are only read here, for the report; they never entered the reward."""
    from spine_ttrl.answers import is_equivalent, majority_vote

    rows = []
    for rec in samples:
        for q in rec["questions"]:
            v, label = majority_vote(q["answers"], task), labels.get(q["id"])
            right = None if label is None or v.label is None else bool(is_equivalent(v.label, label, task))
            rows.append({"step": rec["step"], "id": q["id"], "majority": v.label, "votes": v.count,
                         "of": len(q["answers"]), "label": label, "right": right})
    return rows


def _majority_by_episode(trace: list[dict], per_episode: int) -> dict[str, dict[int, dict]]:
    """``{id: {episode: row}}`` from majorities.jsonl rows, episodes 0-based; a question trained more
    than once in an episode keeps the row of its last step there."""
    by_q: dict[str, dict[int, dict]] = {}
    for r in sorted(trace, key=lambda r: int(r["step"])):
        by_q.setdefault(r["id"], {})[(int(r["step"]) - 1) // per_episode] = r
    return by_q


def majority_changes(trace: list[dict], per_episode: int) -> dict[str, dict]:
    """Per question, its sampled majority per episode (the last step of the episode that trained it):
    ``{id: {"label", "episodes": [(majority, votes, right), ...], "kind"}}`` for the questions whose
    majority was wrong in some episode; ``kind`` is ``lost`` (right in an earlier episode, wrong in
    the last), ``gained`` (wrong earlier, right in the last), ``wrong`` (never right) or ``mixed``
    (right in the last and wrong in between)."""
    out = {}
    for q, eps in _majority_by_episode(trace, per_episode).items():
        seq = [(eps[e]["majority"], eps[e]["votes"], eps[e]["right"]) for e in sorted(eps)]
        right = [x[2] for x in seq]
        if all(right) or not any(x is False for x in right):
            continue
        if right[-1] is False:
            kind = "lost" if any(right[:-1]) else "wrong"
        else:
            kind = "gained" if right[0] is False else "mixed"
        out[q] = {"label": eps[max(eps)]["label"], "episodes": seq, "kind": kind}
    return out


def majority_switches(trace: list[dict], per_episode: int) -> list[float]:
    """Per training episode e, the share of questions whose sampled majority answer differs from the one
    they had in episode e − 1 (label-free: how far the pseudo-label target moves between visits):
    ``s_e = |{q : m_q(e) ≠ m_q(e−1)}| / |{q trained in e and e − 1}|``, NaN for the first episode.
    ``trace`` rows as written to majorities.jsonl (``step``, ``id``, ``majority``); a question's
    majority in an episode is the one of the last step that trained it there. As in
    :func:`per_episode_means`, a trailing episode whose last step is not in the trace is left out."""
    by_q = _majority_by_episode(trace, per_episode)
    n_ep = max((int(r["step"]) for r in trace), default=0) // per_episode
    out = []
    for e in range(n_ep):
        pairs = [(eps[e - 1]["majority"], eps[e]["majority"]) for eps in by_q.values()
                 if e > 0 and e in eps and e - 1 in eps]
        out.append(sum(a != b for a, b in pairs) / len(pairs) if pairs else float("nan"))
    return out


def base_evaluation(cfg, tag_dirs: list[Path], run_dir: Path) -> Path | None:
    """A run of the tag whose evaluation before adaptation is the one ``cfg`` would make (same model,
    data, evaluation settings, seed and threads: ``spine_ttrl.rundir.check_before_from``), to be
    reused with ``eval.before_from``; None if there is none. ``tag_dirs`` are searched in order: the
    runs' own directories, then their logs synced into ``bench/results`` (which hold everything the
    check and the copy need, so a machine without the runs' directories still skips it)."""
    from spine_ttrl.rundir import check_before_from

    probe = copy.deepcopy(cfg)
    for d in [d for tag_dir in tag_dirs for d in sorted(tag_dir.glob("*-s*"))]:
        probe.eval.before_from = str(d)
        try:
            if d != run_dir and check_before_from(probe):
                return d
        except ValueError:
            continue
    return None


def resume_or_reuse(cfg, run_dir: Path, search: list[Path]):
    """``cfg`` set to resume ``run_dir`` when it holds a run, else to reuse a matching base evaluation
    found in ``search`` (:func:`base_evaluation`; none searched when empty). A run is resumed only
    with its own method settings (:func:`quality.saved_config_to_resume`). A resumed run rewrites
    its ``config.toml`` from ``cfg``, so the ``eval.before_from`` it was started with is carried over
    (while that directory exists): the saved config keeps saying where its base evaluation came from."""
    if (run_dir / "config.toml").exists():
        saved = saved_config_to_resume(run_dir, cfg)
        cfg.run.resume, cfg.run.out = str(run_dir), ""
        kept = saved.get("eval", {}).get("before_from", "")
        if kept and Path(kept).is_dir():
            cfg.eval.before_from = kept
    elif search and (src := base_evaluation(cfg, search, run_dir)) is not None:
        cfg.eval.before_from = str(src)  # the base model's sampled evaluation is the same for every run
    return cfg


def run_one(args, method: str, seed: int, lr: float, n_questions: int) -> None:
    from spine_ttrl import adapt

    name = f"{run_key(method, args.variant, lr)}-s{seed}"
    run_dir, dest = args.runs_root / args.tag / name, ROOT / args.tag / name
    if (dest / "done").exists():
        return
    cfg = run_config(args, method, seed, lr, run_dir, n_questions)
    cfg = resume_or_reuse(cfg, run_dir, [args.runs_root / args.tag, ROOT / args.tag] if args.reuse_before else [])
    print(f"== {args.tag}/{name}: {cfg.optim.steps} steps", flush=True)
    adapt(cfg)
    sync(run_dir, dest)
    (dest / "done").write_text("finished\n")
    # the merged model (≈ 1 GB) goes; the last checkpoint (the LoRA state, ≈ 0.1 GB) stays for
    # bench/tokens_moved.py
    shutil.rmtree(run_dir / "final", ignore_errors=True)


# ----------------------------------------------------------------------------- analysis


def load_run(run: Path) -> dict:
    """One run's logs: per-step metrics, evaluations, per-question greedy correctness per evaluation."""
    from spine_ttrl.config import load_toml

    cfg = load_toml(run / "config.toml")
    n_q = None
    evals = read_jsonl(run / "eval.jsonl")
    per_q, sources, answers = {}, {}, {}
    for rec in read_jsonl(run / "eval_records.jsonl"):
        ids = [r["id"] for r in rec["records"]]
        per_q[rec["tag"]] = dict(zip(ids, [float(r.get("greedy_correct", False)) for r in rec["records"]]))
        answers[rec["tag"]] = {r["id"]: {k: r.get(k) for k in ("greedy_answer", "majority", "greedy_length")}
                               for r in rec["records"]}
        sources.update({r["id"]: r.get("source", "") for r in rec["records"]})
        n_q = len(ids)
    per_episode = episode_steps(n_q or 1, cfg["optim"]["questions_per_step"])
    return {"config": cfg, "metrics": read_jsonl(run / "metrics.jsonl"), "evals": evals, "per_question": per_q,
            "answers": answers, "sources": sources, "per_episode": per_episode, "finished": (run / "done").exists(),
            "name": run.name, "majorities": read_jsonl(run / MAJORITIES)}


def episode_of(step: int, per_episode: int) -> float:
    return step / per_episode


def per_episode_means(metrics: list[dict], per_episode: int, key: str) -> list[float]:
    """Mean of ``key`` over each complete episode's steps (NaN-free values; NaN for an episode without
    any). A trailing episode whose last step is not logged yet is left out: its mean would cover only
    some of the questions."""
    out: dict[int, list[float]] = {}
    for m in metrics:
        v = m.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.setdefault((int(m["step"]) - 1) // per_episode, []).append(float(v))
    n = max((int(m["step"]) for m in metrics), default=0) // per_episode if out else 0
    return [float(np.mean(out[e])) if e in out else float("nan") for e in range(n)]


def stop_episode(majority: list[float], fork_entropy: list[float], saturation: float = 0.9,
                 entropy_fraction: float = 0.5, length: list[float] | None = None,
                 length_fraction: float = 0.5) -> int | None:
    """The label-free stopping rule: the first episode (1-based) that shows either sign of collapse,

    - the vote has saturated on narrowed forks: mean majority share >= ``saturation`` and mean
      forking-token entropy < ``entropy_fraction`` × the first episode's; or
    - the answers have shrunk: mean sampled length < ``length_fraction`` × the first episode's
      (``length``, per episode; the collapse monitor's criterion, :func:`spine_ttrl.report.collapse_warnings`).

    None if neither fires. Uses no labels: only the votes, the entropies and the lengths."""
    length = length or []

    def first(series: list[float]) -> float:  # the reference value; NaN (never fires) if unusable
        return series[0] if series and math.isfinite(series[0]) else math.nan

    h0, l0 = first(fork_entropy), first(length)
    for e in range(max(len(majority), len(length))):
        narrowed = e < min(len(majority), len(fork_entropy)) and majority[e] >= saturation \
            and fork_entropy[e] < entropy_fraction * h0
        if narrowed or (e < len(length) and length[e] < length_fraction * l0):
            return e + 1
    return None


def greedy_curve(run: dict) -> list[tuple[float, float]]:
    """(episode, greedy pass@1) at every evaluation, episode 0 = before adaptation."""
    out = []
    for e in run["evals"]:
        if "eval/greedy_pass@1" in e:
            out.append((episode_of(int(e["step"]), run["per_episode"]), float(e["eval/greedy_pass@1"])))
    return sorted(set(out))


def _tag_at(run: dict, episode: float) -> str | None:
    for e in run["evals"]:
        if abs(episode_of(int(e["step"]), run["per_episode"]) - episode) < 1e-9 and e["tag"] in run["per_question"]:
            return e["tag"]
    return None


def _question_vector(runs: list[dict], episode: float) -> np.ndarray | None:
    """Per-question greedy correctness at ``episode``, averaged over the runs (seeds)."""
    vecs = []
    for r in runs:
        tag = _tag_at(r, episode)
        if tag is None:
            return None
        q = r["per_question"][tag]
        vecs.append([q[i] for i in sorted(q)])
    return np.mean(np.array(vecs), axis=0)


def flips(runs: list[dict], episode: float | None) -> dict | None:
    """Which greedy answers moved between before adaptation and ``episode``, summed over the runs
    (seeds): ``pairs`` question-seed pairs; ``wrong_to_right`` / ``right_to_wrong`` by greedy
    correctness; ``changed`` greedy answers that differ; ``off_majority`` pairs whose greedy answer
    before differed from the base model's sampled majority, and ``onto_majority`` how many of them
    now give that majority (the move a majority reward teaches, right or wrong); greedy length
    before and at ``episode``. None when an evaluation with records is missing."""
    if episode is None:
        return None
    out = dict.fromkeys(("pairs", "wrong_to_right", "right_to_wrong", "changed", "off_majority", "onto_majority"), 0)
    lengths = ([], [])
    for r in runs:
        t0, t1 = _tag_at(r, 0.0), _tag_at(r, episode)
        if t0 is None or t1 is None or t0 not in r.get("answers", {}) or t1 not in r.get("answers", {}):
            return None
        c0, c1 = r["per_question"][t0], r["per_question"][t1]
        a0, a1 = r["answers"][t0], r["answers"][t1]
        for q in c0:
            if q not in c1:
                continue
            out["pairs"] += 1
            out["wrong_to_right"] += int(c0[q] < c1[q])
            out["right_to_wrong"] += int(c0[q] > c1[q])
            g0, g1, maj = a0[q]["greedy_answer"], a1[q]["greedy_answer"], a0[q]["majority"]
            out["changed"] += int(g0 != g1)
            if maj is not None and g0 != maj:
                out["off_majority"] += 1
                out["onto_majority"] += int(g1 == maj)
            for lst, a in zip(lengths, (a0[q], a1[q])):
                if a.get("greedy_length") is not None:
                    lst.append(float(a["greedy_length"]))
    out["greedy_length_before"] = float(np.mean(lengths[0])) if lengths[0] else None
    out["greedy_length_after"] = float(np.mean(lengths[1])) if lengths[1] else None
    return out


def source_curves(runs: list[dict], episodes: list[float]) -> dict[str, list[float]]:
    """Greedy pass@1 per data source (the data's ``source`` column) at each of ``episodes``, seeds
    averaged; {} when the questions come from fewer than two sources."""
    sources = runs[0].get("sources", {}) if runs else {}
    names = sorted({s for s in sources.values() if s})
    if len(names) < 2:
        return {}
    order = sorted(sources)  # the question order of _question_vector
    vectors = [_question_vector(runs, e) for e in episodes]
    out = {}
    for name in names:
        idx = [j for j, i in enumerate(order) if sources[i] == name]
        out[name] = [float("nan") if v is None else float(np.mean(v[idx])) for v in vectors]
    return out


def summarise_key(runs: list[dict]) -> dict:
    """Curves and episode statistics of one run key, seeds averaged."""
    curves = [dict(greedy_curve(r)) for r in runs]
    episodes = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
    greedy = [float(np.mean([c[e] for c in curves])) for e in episodes]
    pe = runs[0]["per_episode"]
    series = {k: np.nanmean([per_episode_means(r["metrics"], pe, k) for r in runs
                             if per_episode_means(r["metrics"], pe, k)], axis=0).tolist()
              if any(per_episode_means(r["metrics"], pe, k) for r in runs) else []
              for k in ("completion/length_mean", "vote/majority_ratio", "entropy/forking_mean",
                        "entropy/top20_mean", "update/weight_change_norm", "update/kl_new_old", "grad/policy_norm",
                        "grad/band_norm", "vote/label_accuracy")}
    trained = [e for e in episodes if e > 0]
    final = trained[-1] if trained else None  # no "final" before the first evaluation after training
    best = max(trained, key=lambda e: greedy[episodes.index(e)]) if trained else None
    # fork entropy comparable across methods: the top-20 % tokens' where logged from the first episode
    # (TTRL's selected tokens are all tokens), else the selected tokens'
    top20 = series["entropy/top20_mean"]
    fork_h = top20 if top20 and math.isfinite(top20[0]) else series["entropy/forking_mean"]
    stop = stop_episode(series["vote/majority_ratio"], fork_h, length=series["completion/length_mean"])
    stop_eval = next((e for e in episodes if stop is not None and e >= stop), None)
    sampled = {}
    for tag in ("before", "after"):
        vals = [e for r in runs for e in r["evals"] if e["tag"] == tag]
        for k in vals[0] if vals else {}:
            if k.startswith("eval/") and (k.startswith("eval/avg@") or k.startswith("eval/maj@")) and not k.endswith("_se"):
                sampled[f"{tag}/{k[5:]}"] = float(np.mean([v[k] for v in vals if k in v]))
    before = _question_vector(runs, 0.0) if 0.0 in episodes else None
    # standard error over the questions, sd / √n; None without ≥ 2 questions
    greedy_se = [_mean_se(v)[1] if (v := _question_vector(runs, e)) is not None and len(v) > 1 else None
                 for e in episodes]
    # the hardware the runs trained on (engine.precision.machine_name; a reused "before" line is another run's)
    machines = sorted({e["machine"] for r in runs for e in r["evals"] if e.get("machine") and e.get("tag") != "before"})
    # the label-free drift of the pseudo-labels, per episode, over the seeds' common episodes
    sw = [majority_switches(r["majorities"], pe) for r in runs if r["majorities"]]
    n_sw = min((len(v) for v in sw), default=0)
    switched = [float(np.mean(col)) if all(map(math.isfinite, col)) else float("nan")
                for col in zip(*(v[:n_sw] for v in sw))]
    return {"seeds": len(runs), "finished": all(r["finished"] for r in runs), "machines": machines,
            "episodes": episodes, "greedy": greedy,
            "greedy_se": greedy_se,
            "final_episode": final, "best_episode": best, "stop_episode": stop, "stop_eval_episode": stop_eval,
            "series": series, "sampled": sampled, "questions": 0 if before is None else len(before),
            "by_source": source_curves(runs, episodes), "flips_final": flips(runs, final), "fork_entropy": fork_h,
            "majority_changes": {r["name"]: majority_changes(r["majorities"], pe) for r in runs if r["majorities"]},
            "majority_switched": switched}


def load_tag(tag: str) -> dict[str, list[dict]]:
    return split_unfinished(_runs_of(tag))


def _runs_of(tag: str) -> dict[str, list[dict]]:
    """Every run synced under ``tag``, by run key (its seeds in name order)."""
    runs: dict[str, list[dict]] = {}
    for d in sorted((ROOT / tag).glob("*-s*")):
        if d.is_dir() and (d / "config.toml").exists():
            runs.setdefault(d.name.rsplit("-s", 1)[0], []).append(load_run(d))
    return runs


def pool_runs(blocks: list[str]) -> dict[str, list[dict]]:
    """The runs of several block tags — the same protocol on disjoint question sets — pooled into
    one run per key and seed that every block has, as if one run had adapted on all their
    questions: per-question greedy correctness concatenated (so paired intervals resample all the
    questions), greedy pass@1 and the sampled avg@k / maj@k recomputed as means over all of them,
    per-step metrics averaged over the blocks at the steps every block has logged, finished when
    every block's run is. Keys and seeds missing from a block are left out. Refuses
    (``SystemExit``) blocks named twice, blocks sharing a question id or a data spec, different
    models, and different numbers of steps per episode."""
    if len(set(blocks)) < len(blocks) or len(blocks) < 2:
        raise SystemExit(f"--pool: name two or more different block tags, got {blocks}")
    per_block = {b: _runs_of(b) for b in blocks}
    for b, runs in per_block.items():
        if not runs:
            raise SystemExit(f"--pool: no runs under {ROOT / b}")
    owner: dict[str, str] = {}
    specs: dict[str, str] = {}
    models = set()
    for b, runs in per_block.items():
        for r in (r for rs in runs.values() for r in rs):
            spec = r["config"].get("data", {}).get("data")
            if spec is not None:
                if specs.get(spec, b) != b:
                    raise SystemExit(f"--pool: {specs[spec]} and {b} are the same questions ({spec})")
                specs[spec] = b
            models.add(str(r["config"].get("model", {}).get("model")))
            for q in (q for pq in r["per_question"].values() for q in pq):
                if owner.setdefault(q, b) != b:
                    raise SystemExit(f"--pool: {owner[q]} and {b} share the question {q}")
    if len(models) > 1:
        raise SystemExit(f"--pool: the blocks use different models: {sorted(models)}")
    pooled: dict[str, list[dict]] = {}
    for key in [k for k in per_block[blocks[0]] if all(k in per_block[b] for b in blocks)]:
        by_seed = [{r["name"]: r for r in per_block[b][key]} for b in blocks]
        for name in [n for n in by_seed[0] if all(n in s for s in by_seed)]:
            parts = [s[name] for s in by_seed]
            if len({r["per_episode"] for r in parts}) > 1:
                raise SystemExit(f"--pool: {name} has different steps per episode in {blocks}")
            pooled.setdefault(key, []).append(_pool_one(parts))
    if not pooled:
        raise SystemExit(f"--pool: no run (key and seed) is in every block of {blocks}")
    return split_unfinished(pooled)


def _pool_one(parts: list[dict]) -> dict:
    """One run pooled from the same run (key, seed) of each block (see :func:`pool_runs`)."""
    tags = [t for t in parts[0]["per_question"]
            if all(t in r["per_question"] and any(e["tag"] == t for e in r["evals"]) for r in parts)]
    per_q = {t: {q: v for r in parts for q, v in r["per_question"][t].items()} for t in tags}
    sizes = [len(r["per_question"][tags[0]]) if tags else 1 for r in parts]
    evals = []
    for t in tags:
        lines = [next(e for e in r["evals"] if e["tag"] == t) for r in parts]
        line = {"tag": t, "step": lines[0]["step"]}
        machines = sorted({e["machine"] for e in lines if e.get("machine")})
        if machines:
            line["machine"] = "; ".join(machines)
        for k in lines[0]:
            if k.startswith("eval/") and not k.endswith("_se") and all(isinstance(e.get(k), (int, float)) for e in lines):
                line[k] = float(np.average([e[k] for e in lines], weights=sizes))
        line["eval/greedy_pass@1"] = float(np.mean(list(per_q[t].values())))
        evals.append(line)
    steps = [{int(m["step"]): m for m in r["metrics"]} for r in parts]
    metrics = []
    for step in sorted(set.intersection(*[set(s) for s in steps])):
        rows = [s[step] for s in steps]
        row = {"step": step}
        for k in rows[0]:
            vals = [m.get(k) for m in rows]
            if k != "step" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                finite = [float(v) for v in vals if math.isfinite(v)]
                row[k] = float(np.mean(finite)) if finite else float("nan")
        metrics.append(row)
    return {"config": parts[0]["config"], "metrics": metrics, "evals": evals, "per_question": per_q,
            "answers": {t: {q: a for r in parts for q, a in r["answers"].get(t, {}).items()} for t in tags},
            "sources": {q: src for r in parts for q, src in r["sources"].items()},
            "per_episode": parts[0]["per_episode"], "finished": all(r["finished"] for r in parts),
            "name": parts[0]["name"], "majorities": [m for r in parts for m in r["majorities"]]}


def split_unfinished(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Rows of the summary from the runs of each key (its seeds). A key pools its finished seeds;
    while some of its seeds are unfinished, each of those gets a row of its own,
    ``"<key> s<seed> (unfinished)"``, after the pooled one, so that a seed that has just started
    (or stopped early) neither hides the finished seeds' final episode nor is averaged into their
    curve. A key none of whose seeds has finished pools them all, as it will once they have."""
    out: dict[str, list[dict]] = {}
    for key, rs in runs.items():
        done = [r for r in rs if r["finished"]]
        if not done or len(done) == len(rs):
            out[key] = rs
            continue
        out[key] = done
        for r in rs:
            if not r["finished"]:
                out[f"{key} s{r['name'].rsplit('-s', 1)[1]} (unfinished)"] = [r]
    return out


def compare(a: list[dict], b: list[dict], episode: float | None) -> dict | None:
    if episode is None:
        return None
    va, vb = _question_vector(a, episode), _question_vector(b, episode)
    if va is None or vb is None or len(va) != len(vb):
        return None
    return paired_bootstrap(va, vb)


def questions_for_halfwidth(c: dict | None, questions: int, target: float = 0.03) -> int | None:
    """Questions a paired interval needs for a half-width of ``target`` (3 points), from one
    measured at ``questions`` questions: the half-width shrinks as 1/√n, so
    n' = ⌈n · (h / target)²⌉ with h = (ci_high − ci_low) / 2. None without an interval, and
    for a zero-width one (the two runs answered every question alike: nothing to extrapolate)."""
    if not c or questions < 1:
        return None
    h = (c["ci_high"] - c["ci_low"]) / 2
    if h <= 0:
        return None
    return max(1, math.ceil(questions * (h / target) ** 2 - 1e-9))


def summary(tag: str, references: list[str] | None = None, pool: list[str] | None = None) -> dict:
    """Summarise every run key of ``tag`` and compare each, at its final and its best episode, with
    the base (its own evaluation before adaptation) and with each reference key: by default the
    plain TTRL key (``ttrl-lr…``); ``references`` names others, e.g. a TTRL re-run on the machine that
    ran the methods it should be compared with. A reference that has not reached a key's episode
    gives no interval there; the key is then also compared with it at the latest episode both have
    evaluated (``vs_<ref>/ep<N>``). A reference may also name one run, ``<key>-s<seed>``: that seed
    alone, with a row of its own, for comparing with one seed of a key that pools several. With
    ``pool`` (block tags), the runs are those blocks' pooled (:func:`pool_runs`) and the summary is
    written under ``tag``."""
    runs = pool_runs(pool) if pool else load_tag(tag)
    if references is None:
        references = [k for k in runs if k.startswith("ttrl-") and not k.endswith("(unfinished)")][:1]
    by_name = {r["name"]: r for rs in runs.values() for r in rs}
    runs.update({ref: [by_name[ref]] for ref in references if ref not in runs and ref in by_name})
    missing = [r for r in references if r not in runs]
    if missing:
        raise SystemExit(f"--reference {' '.join(missing)}: no such run key or run in {tag} (keys: {', '.join(runs)})")
    keys = {k: summarise_key(v) for k, v in runs.items()}
    out = {"tag": tag, "keys": keys, "comparisons": {}, **({"blocks": list(pool)} if pool else {})}
    for k, s in keys.items():
        comp = {}
        for where in ("final", "best"):
            ep = s[f"{where}_episode"]
            comp[f"vs_base/{where}"] = (paired_bootstrap(_question_vector(runs[k], ep), _question_vector(runs[k], 0.0))
                                        if ep is not None and _question_vector(runs[k], 0.0) is not None
                                        and _question_vector(runs[k], ep) is not None else None)
            for ref in references:
                if k != ref:
                    comp[f"vs_{ref}/{where}"] = compare(runs[k], runs[ref], ep)
        for ref in references:
            # a reference still running: also compare where both are, at the latest episode both evaluated
            shared = [e for e in s["episodes"] if e > 0 and e in keys[ref]["episodes"]] if k != ref else []
            if shared and shared[-1] != s["final_episode"]:
                comp[f"vs_{ref}/ep{shared[-1]:g}"] = compare(runs[k], runs[ref], shared[-1])
        out["comparisons"][k] = comp
    (ROOT / tag).mkdir(parents=True, exist_ok=True)
    (ROOT / tag / "summary.json").write_text(json.dumps(out, indent=1, default=float))
    (ROOT / tag / "summary.md").write_text(render(out))
    plot(out, ROOT / tag / "curves.png")
    return out


def _f(x, digits=3):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(c):
    return "–" if not c else f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def render(out: dict) -> str:
    lines = [f"# Long adaptation: {out['tag']}", "",
             *([f"Pooled from the blocks {', '.join(out['blocks'])} (disjoint questions; each run key and "
                f"seed that every block has).", ""] if out.get("blocks") else []),
             "| run key | seeds | done | machine | greedy before | final (ep) | best (ep) | stop rule ep → greedy | "
             "avg before → after | length ep1 → last | majority ep1 → last | fork H ep1 → last | "
             "top-20 % H ep1 → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in out["keys"].items():
        g = dict(zip(s["episodes"], s["greedy"]))
        ser = s["series"]

        def first_last(name):
            v = ser.get(name) or []
            return f"{_f(v[0], 2)} → {_f(v[-1], 2)}" if v else "–"
        avg = [v for kk, v in s["sampled"].items() if "avg@" in kk]
        lines.append(
            f"| {k} | {s['seeds']} | {'yes' if s['finished'] else 'no'} | {'; '.join(s['machines']) or '–'} | "
            f"{_f(g.get(0.0))} | "
            f"{_f(g.get(s['final_episode']))} ({_f(s['final_episode'], 0)}) | {_f(g.get(s['best_episode']))} "
            f"({_f(s['best_episode'], 0)}) | {s['stop_episode'] or '–'} → {_f(g.get(s['stop_eval_episode']))} | "
            f"{' → '.join(_f(v) for v in avg) or '–'} | {first_last('completion/length_mean')} | "
            f"{first_last('vote/majority_ratio')} | {first_last('entropy/forking_mean')} | "
            f"{first_last('entropy/top20_mean')} |")
    lines += ["", "Paired bootstrap, greedy pass@1 in points (95 % interval), questions resampled; the "
              "half-width reached and the questions a ±3-point half-width would need (it shrinks as 1/√n):", "",
              "| run key | comparison | difference | half-width | questions for ±3 |", "|---|---|---|---|---|"]
    for k, comp in out["comparisons"].items():
        n = out["keys"][k].get("questions") or 0
        for name, c in comp.items():
            half = f"{100 * (c['ci_high'] - c['ci_low']) / 2:.1f}" if c else "–"
            lines.append(f"| {k} | {name} | {_ci(c)} | {half} | {questions_for_halfwidth(c, n) or '–'} |")
    lines += ["", "Greedy pass@1 per evaluated episode:", ""]
    for k, s in out["keys"].items():
        lines.append(f"- {k}: " + ", ".join(f"ep{_f(e, 0)} {_f(v)}" for e, v in zip(s["episodes"], s["greedy"])))
    lines += ["", "Per training episode (means over its steps and the seeds): completion length, majority share, "
              "majority right (the share of questions whose training majority is the labelled answer; the label "
              "is read for this diagnostic only), majority switched (the share of questions whose sampled majority "
              "answer differs from their previous episode's; label-free), top-20 % (forking-token) entropy in nats:", ""]
    for k, s in out["keys"].items():
        for name, v, digits in (("length", s["series"].get("completion/length_mean"), 0),
                                ("majority", s["series"].get("vote/majority_ratio"), 2),
                                ("majority right", s["series"].get("vote/label_accuracy"), 2),
                                ("majority switched", s.get("majority_switched"), 2),
                                ("fork H", s.get("fork_entropy"), 2)):
            if v:
                lines.append(f"- {k}, {name}: " + ", ".join(f"ep{i} {_f(x, digits)}" for i, x in enumerate(v, 1)))
    moved = [(k, s["flips_final"]) for k, s in out["keys"].items() if s.get("flips_final")]
    if moved:
        lines += ["", "Which greedy answers moved, before → final episode (question-seed pairs; \"onto the "
                  "majority\": of the answers that differed from the base model's sampled majority, how many "
                  "now give it):", "",
                  "| run key | pairs | wrong → right | right → wrong | changed | onto the majority | "
                  "greedy length before → final |", "|---|---|---|---|---|---|---|"]
        for k, f in moved:
            lines.append(f"| {k} | {f['pairs']} | {f['wrong_to_right']} | {f['right_to_wrong']} | {f['changed']} | "
                         f"{f['onto_majority']} of {f['off_majority']} | {_f(f['greedy_length_before'], 0)} → "
                         f"{_f(f['greedy_length_after'], 0)} |")
    changes = [(run, ch) for s in out["keys"].values() for run, ch in (s.get("majority_changes") or {}).items()]
    if changes:
        lines += ["", "The training majority of every question that was wrong in some episode (its sampled "
                  "majority answer, votes, ✗ = wrong, per episode; lost = right earlier and wrong at the end):", ""]
        for run, ch in changes:
            kinds = {k: sum(c["kind"] == k for c in ch.values()) for k in ("lost", "gained", "wrong", "mixed")}
            lines.append(f"- {run}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) if ch else f"- {run}: none")
            for q, c in sorted(ch.items()):
                lines.append(f"  - {q} (label {c['label']}, {c['kind']}): " + ", ".join(
                    f"{m}{'✗' if r is False else ''} ({v})" for m, v, r in c["episodes"]))
    by_source = [(k, s) for k, s in out["keys"].items() if s.get("by_source")]
    if by_source:
        lines += ["", "Greedy pass@1 per data source (the data's `source` column), before → final (best episode):", "",
                  "| run key | source | before | final | best |", "|---|---|---|---|---|"]
        for k, s in by_source:
            for name, curve in s["by_source"].items():
                g = dict(zip(s["episodes"], curve))
                lines.append(f"| {k} | {name} | {_f(g.get(0.0))} | {_f(g.get(s['final_episode']))} | "
                             f"{_f(g.get(s['best_episode']))} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    """Greedy pass@1 (with its 95 % interval, ±1.96 standard errors over the questions), forking-token
    entropy, completion length and majority share per episode, one line per run key."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    for k, s in out["keys"].items():
        line, = axes[0].plot(s["episodes"], s["greedy"], marker="o", label=k)
        band = [(e, g, se) for e, g, se in zip(s["episodes"], s["greedy"], s.get("greedy_se") or []) if se is not None]
        if band:
            e, g, se = (np.array(x) for x in zip(*band))
            axes[0].fill_between(e, np.clip(g - 1.96 * se, 0, 1), np.clip(g + 1.96 * se, 0, 1),
                                 color=line.get_color(), alpha=0.12)
        for ax, v in ((axes[1], s.get("fork_entropy") or []), (axes[2], s["series"].get("completion/length_mean") or []),
                      (axes[3], s["series"].get("vote/majority_ratio") or [])):
            ax.plot(range(1, len(v) + 1), v, label=k)
    for ax, title in zip(axes, ("greedy pass@1 (95 % interval)", "forking-token entropy (nats)",
                                "completion length (tokens)", "majority share of the rollouts")):
        ax.set_title(title)
        ax.set_xlabel("episode")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--data", default="arith:5:16:4242")
    p.add_argument("--model", default=None)
    p.add_argument("--methods", nargs="*", default=["ttrl", "spine"])
    p.add_argument("--lrs", nargs="*", type=float, default=[1e-4])
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--eval-every-episodes", type=int, default=2)
    p.add_argument("--questions-per-step", type=int, default=4)
    p.add_argument("--votes", type=int, default=8)
    p.add_argument("--k", type=int, default=8, help="samples per question in the sampled evaluation")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--eval-temperature", type=float, default=0.8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="rows per forward/backward (the same update at any size; 4 keeps an update of the 0.5B model near 7 GiB)")
    p.add_argument("--precision", default="bf16",
                   help="compute precision, pinned so that a run resumed on another machine computes the same way "
                        "(auto is bf16 on one CPU and fp32 on another); bf16 = bf16 autocast, fp32 weights")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="section.field=value overrides")
    p.add_argument("--variant", default="")
    p.add_argument("--runs-root", type=Path, default=RUNS_ROOT)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--no-reuse-before", dest="reuse_before", action="store_false",
                   help="compute the evaluation before adaptation even when another run of the tag has made the same one")
    p.add_argument("--summary", action="store_true", help="only write the summary of --tag")
    p.add_argument("--reference", nargs="*", default=None,
                   help="run keys every other key is compared with (default: the plain TTRL key, ttrl-lr…); "
                        "a run's name, <key>-s<seed>, compares with that seed alone")
    p.add_argument("--sync", action="store_true", help="only copy the logs of --tag's runs into bench/results")
    p.add_argument("--pool", nargs="+", default=None, metavar="BLOCK_TAG",
                   help="only write the summary of these block tags' runs pooled (disjoint question sets, same "
                        "protocol), under --tag")
    args = p.parse_args(argv)
    if args.pool:
        for block in args.pool:
            sync_tag(args.runs_root, block)
        print(render(summary(args.tag, args.reference, pool=args.pool)))
        return 0
    if args.sync or args.summary:
        sync_tag(args.runs_root, args.tag)
        if args.summary:
            print(render(summary(args.tag, args.reference)))
        return 0
    from spine_ttrl.data import load_examples

    n_questions = len(load_examples(args.data))
    for seed in args.seeds:
        for lr in args.lrs:
            for method in args.methods:
                run_one(args, method, seed, lr, n_questions)
    print(render(summary(args.tag, args.reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
