"""Speed and memory of one test-time RL step: spine-ttrl's engine against Hugging Face TRL's GRPOTrainer.

The step, identical for both engines: the embedded SmolLM2-135M-Instruct (the plain model rebuilt
from the GGUF, fp32 weights), 4 questions x 8 samples, 64 new tokens at temperature 1.0 (top-p 1),
majority-vote reward (the same :func:`spine_ttrl.rewards.majority_rewards`), policy gradient on the
top-20 % entropy tokens of the batch, no KL (TRL ``beta=0``, ``top_entropy_quantile=0.2``,
``num_iterations=1``), AdamW lr 2e-5, no gradient checkpointing, micro-batches of 8 completions
(TRL ``per_device_train_batch_size=8``, ``gradient_accumulation_steps=4``; ``--micro`` changes both). Our side runs the
``spine`` preset with ``band=none`` so that the work equals TRL's (the band adds no pass).

Each measurement is a fresh subprocess (``--worker``) that runs ``--steps`` steps; the first is a
warm-up, the others are timed. Engines alternate and the order flips every repetition. One JSON
file per (setting, engine, repetition) in ``bench/results/speed/``: an interrupted sweep resumes.

    python bench/speed.py --reps 3                  # both settings: fp32 and best (bf16 autocast)
    python bench/speed.py --summary                 # only (re)build the summary from the files
    python bench/speed.py --engine trl --reps 3     # SpineGRPOTrainer vs GRPOTrainer; 2 processes vs 1

Settings: ``fp32`` = both engines in fp32; ``best`` = bf16 autocast (our ``precision=bf16``, TRL
``bf16=True``), each engine's best CPU setting here. Reported per engine: median seconds per
timed step, peak RSS of the process (``ru_maxrss``), prompt and completion tokens per step,
sampling / forward+backward / optimiser time, training FLOP/s (6 x parameters x trained sequence
tokens / forward+backward time; and the same over the positions the model actually ran, which
for our engine count a prompt shared by a question's samples once) against the matmul peak
measured by ``--worker peak``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "speed"
DATA = "arith:1:4:0"
QUESTIONS, SAMPLES, NEW_TOKENS, MICRO = 4, 8, 64, 8
LR, TEMPERATURE, RHO = 2e-5, 1.0, 0.2


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- workers

def worker_ours(precision: str, steps: int, seed: int, threads: int, micro: int = MICRO) -> dict:
    from spine_ttrl import adapt, make_config

    out = tempfile.mkdtemp(prefix="speed-ours-")
    cfg = make_config("spine", overrides={
        "model": {"precision": precision},
        "data": {"data": DATA},
        "sampling": {"num_votes": SAMPLES, "num_train_samples": SAMPLES, "max_new_tokens": NEW_TOKENS,
                     "temperature": TEMPERATURE, "top_p": 1.0},
        "spine": {"selection": "top", "rho": RHO, "scope": "batch", "band": "none", "kl_coef": 0.0},
        "optim": {"steps": steps, "questions_per_step": QUESTIONS, "micro_batch_size": micro, "lr": LR},
        "eval": {"skip_eval_before": True, "eval_limit": 1, "eval_samples": 0, "eval_max_new_tokens": 1},
        "run": {"out": out, "seed": seed, "threads": threads, "progress": False},
    })
    t0 = time.perf_counter()
    res = adapt(cfg)
    wall = time.perf_counter() - t0
    n_params = sum(p.numel() for p in res.model.parameters())
    prompt_lens = _prompt_lengths(res.tokenizer)
    rows = []
    for m in res.metrics:
        completion = m["completion/sampled_tokens"]
        rows.append({
            "step_s": m["time/step_s"],
            "sampling_s": m["time/sampling_s"],
            "reward_s": m.get("time/vote_s", 0.0),
            "scoring_s": m.get("time/scoring_s", 0.0),
            "forward_backward_s": m.get("time/forward_backward_s", 0.0),
            "optimizer_s": m.get("time/optimizer_s", 0.0),
            "prompt_tokens": float(sum(prompt_lens) * SAMPLES),
            "completion_tokens": completion,
            "trained_completion_tokens": m.get("tokens/trained", 0.0),
            "model_positions": m.get("tokens/model_positions", 0.0),
        })
    return {"steps": rows, "params": n_params, "wall_s": wall, "peak_rss_mb": _peak_rss_mb()}


def _prompt_lengths(tokenizer) -> list[int]:
    from spine_ttrl.data import build_messages, load_examples, resolve_task
    from spine_ttrl.prompting import encode_prompt

    examples = load_examples(DATA)
    task = resolve_task(examples, "auto")
    return [len(encode_prompt(tokenizer, build_messages(ex, task))) for ex in examples]


def worker_trl(precision: str, steps: int, seed: int, threads: int, micro: int = MICRO, spine: bool = False) -> dict:
    """TRL's GRPOTrainer (top_entropy_quantile=0.2) or, with ``spine``, our SpineGRPOTrainer on the
    same step (SPINE v1: top 20 % of the generation batch, quantile band, label-free vote). Under
    torchrun every process runs this; the batch is split over the processes."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from spine_ttrl.answers import extract_answer
    from spine_ttrl.data import build_messages, load_examples, resolve_task
    from spine_ttrl.models import load_model_and_tokenizer
    from spine_ttrl.rewards import majority_rewards

    from accelerate import PartialState

    if threads:
        torch.set_num_threads(threads)
    procs = PartialState(cpu=True).num_processes  # cpu=True: else torchrun's WORLD_SIZE is ignored without a GPU
    model, tokenizer = load_model_and_tokenizer(None)
    examples = load_examples(DATA)
    task = resolve_task(examples, "auto")
    ds = Dataset.from_list([{"prompt": build_messages(ex, task), "qid": i} for i, ex in enumerate(examples)])

    def majority_reward(prompts, completions, qid, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        answers = [extract_answer(t, task) for t in texts]
        rewards = [0.0] * len(texts)
        for q in dict.fromkeys(qid):
            rows = [i for i, x in enumerate(qid) if x == q]
            for i, r in zip(rows, majority_rewards([answers[i] for i in rows], task)):
                rewards[i] = r
        return rewards

    timers = {"generate_s": 0.0, "generate_and_score_s": 0.0, "selection_s": 0.0, "forward_s": 0.0,
              "backward_s": 0.0, "optimizer_s": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0}

    def timed(fn, key, after=None):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            timers[key] += time.perf_counter() - t0
            if after is not None:
                after(out)
            return out
        return wrapper

    gen = transformers.generation.utils.GenerationMixin.generate
    transformers.generation.utils.GenerationMixin.generate = timed(gen, "generate_s")

    rows: list[dict] = []
    marks = [0.0]

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks[0] = time.perf_counter()

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            if optimizer is not None and not getattr(optimizer, "_speed_wrapped", False):
                optimizer.step = timed(optimizer.step, "optimizer_s")
                optimizer._speed_wrapped = True

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            rows.append({"step_s": now - marks[0], "sampling_s": timers["generate_s"],
                         "reward_s": timers["generate_and_score_s"] - timers["generate_s"],
                         "forward_backward_s": timers["forward_s"] + timers["backward_s"],
                         "forward_s": timers["forward_s"], "backward_s": timers["backward_s"],
                         "optimizer_s": timers["optimizer_s"], "selection_s": timers["selection_s"],
                         "prompt_tokens": timers["prompt_tokens"],
                         "completion_tokens": timers["completion_tokens"],
                         "trained_completion_tokens": timers["completion_tokens"]})
            for k in timers:
                timers[k] = 0.0
            marks[0] = time.perf_counter()

    out = tempfile.mkdtemp(prefix="speed-trl-")
    common = dict(
        output_dir=out, max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=QUESTIONS * SAMPLES // (micro * procs), num_generations=SAMPLES,
        max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, beta=0.0, num_iterations=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, use_cpu=True, bf16=precision == "bf16", fp16=False,
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no", seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
    )
    if spine:
        from spine_ttrl.integrations.trl import SpineGRPOConfig, SpineGRPOTrainer

        args = SpineGRPOConfig(**common, selection="top", rho=RHO, scope="batch", band="quantile", task=task)
        trainer = SpineGRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                                   callbacks=[StepTimer()])
        trainer._attach_selection = timed(trainer._attach_selection, "selection_s")
    else:
        args = GRPOConfig(**common, top_entropy_quantile=RHO)
        trainer = GRPOTrainer(model=model, reward_funcs=majority_reward, args=args, train_dataset=ds,
                              processing_class=tokenizer, callbacks=[StepTimer()])

    def count_tokens(batch):
        timers["prompt_tokens"] += float(batch["prompt_mask"].sum())
        timers["completion_tokens"] += float(batch["completion_mask"].sum())

    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions,
                                                    "generate_and_score_s", after=count_tokens)
    trainer.compute_loss = timed(trainer.compute_loss, "forward_s")
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward_s")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"steps": rows, "params": n_params, "wall_s": wall, "peak_rss_mb": _peak_rss_mb(),
            "trl_version": __import__("trl").__version__, "processes": procs,
            "rank": PartialState(cpu=True).process_index}


def worker_peak(threads: int) -> dict:
    """Matmul throughput of this machine: best of several 2048^3 products, fp32 and bf16."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = {}
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2 * n ** 3 / best / 1e9
    return out


# ----------------------------------------------------------------------------- driver

def run_worker(argv: list[str], out: Path, timeout: float, processes: int = 1) -> None:
    cmd = [sys.executable, __file__, "--worker", *argv, "--out", str(out)]
    if processes > 1:  # torchrun (gloo on CPU); rank 0 writes the file
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *cmd[1:]]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(argv)}")


def summarize(peak: dict | None) -> dict:
    """Median over repetitions of each run's median timed step; ratios ours / TRL."""
    summary: dict = {"peak_matmul": peak, "settings": {}}
    for setting in ("fp32", "best"):
        per_engine = {}
        for engine in ("ours", "trl"):
            files = sorted(RESULTS.glob(f"{setting}-{engine}-rep*.json"))
            if not files:
                continue
            runs = [json.loads(f.read_text()) for f in files]
            keys = [k for k in runs[0]["steps"][-1] if isinstance(runs[0]["steps"][-1][k], (int, float))]
            per_run = [{k: statistics.median(s[k] for s in r["steps"][1:] or r["steps"]) for k in keys} for r in runs]
            med = {k: statistics.median(p[k] for p in per_run) for k in keys}
            med["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
            med["step_s_all"] = [p["step_s"] for p in per_run]
            params = runs[0]["params"]
            fb_tokens = med["prompt_tokens"] + med["completion_tokens"]
            med["train_gflops_per_s"] = 6 * params * fb_tokens / max(med["forward_backward_s"], 1e-9) / 1e9
            # FLOP/s of what the model actually ran: our engine runs a prompt shared by a question's
            # samples once (tokens/model_positions); TRL runs every row's prompt (its padding is not
            # counted, so its figure is a lower bound).
            positions = med.get("model_positions") or fb_tokens
            med["model_gflops_per_s"] = 6 * params * positions / max(med["forward_backward_s"], 1e-9) / 1e9
            if peak:
                pk = peak["bf16_gflops" if setting == "best" else "fp32_gflops"]
                med["train_fraction_of_peak"] = med["train_gflops_per_s"] / pk
                med["model_fraction_of_peak"] = med["model_gflops_per_s"] / pk
            med["repetitions"] = len(runs)
            med["params"] = params
            per_engine[engine] = med
        if len(per_engine) == 2:
            o, t = per_engine["ours"], per_engine["trl"]
            per_engine["ratio_step_time"] = o["step_s"] / t["step_s"]
            per_engine["ratio_peak_rss"] = o["peak_rss_mb"] / t["peak_rss_mb"]
        summary["settings"][setting] = per_engine
    return summary


RESULTS_TRL = RESULTS.parent / "speed-trl"
TRL_ENGINES = ("trl", "spine-trl", "spine-trl-2proc")


def summarize_trl() -> dict:
    """``--engine trl``: median timed step per engine; SpineGRPOTrainer / GRPOTrainer (the SPINE
    additions' overhead) and 2 processes / 1 process."""
    out: dict = {}
    for engine in TRL_ENGINES:
        runs = [json.loads(f.read_text()) for f in sorted(RESULTS_TRL.glob(f"fp32-{engine}-rep*.json"))]
        if not runs:
            continue
        keys = [k for k in runs[0]["steps"][-1] if isinstance(runs[0]["steps"][-1][k], (int, float))]
        per_run = [{k: statistics.median(s[k] for s in r["steps"][1:] or r["steps"]) for k in keys} for r in runs]
        med = {k: statistics.median(p[k] for p in per_run) for k in keys}
        med.update(step_s_all=[p["step_s"] for p in per_run], repetitions=len(runs),
                   peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in runs), processes=runs[0].get("processes", 1))
        out[engine] = med
    if "trl" in out and "spine-trl" in out:
        out["overhead_spine_vs_trl"] = out["spine-trl"]["step_s"] / out["trl"]["step_s"] - 1
    if "spine-trl" in out and "spine-trl-2proc" in out:
        out["ratio_2proc_vs_1proc"] = out["spine-trl-2proc"]["step_s"] / out["spine-trl"]["step_s"]
    return out


def print_table_trl(summary: dict) -> None:
    print("| engine | processes x threads | s/step (runs) | sampling s | selection pass s | fwd+bwd s | optim s | peak RSS MB/process |")
    print("|---|---|---|---|---|---|---|---|")
    for engine in TRL_ENGINES:
        if engine in summary:
            m = summary[engine]
            th = "2 x 1" if m["processes"] == 2 else "1 x 2"
            runs = ", ".join(f"{x:.1f}" for x in m["step_s_all"])
            print(f"| {engine} | {th} | {m['step_s']:.1f} ({runs}) | {m['sampling_s']:.1f} | {m.get('selection_s', 0):.1f} | "
                  f"{m['forward_backward_s']:.1f} | {m['optimizer_s']:.2f} | {m['peak_rss_mb']:.0f} |")
    for k in ("overhead_spine_vs_trl", "ratio_2proc_vs_1proc"):
        if k in summary:
            print(f"{k}: {summary[k]:+.3f}" if k.startswith("overhead") else f"{k}: {summary[k]:.2f}")


def main_trl(args) -> None:
    RESULTS_TRL.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        for rep in range(args.reps):
            order = list(TRL_ENGINES) if rep % 2 == 0 else list(reversed(TRL_ENGINES))
            for engine in order:
                out = RESULTS_TRL / f"fp32-{engine}-rep{rep}.json"
                if out.exists():
                    continue
                two = engine.endswith("2proc")
                worker = "trl" if engine == "trl" else "spine-trl"
                run_worker([worker, "--precision", "fp32", "--steps", str(args.steps), "--seed", str(rep),
                            "--threads", "1" if two else str(args.threads), "--micro", str(args.micro)], out,
                           args.timeout, processes=2 if two else 1)
                r = json.loads(out.read_text())
                print(f"  {engine} rep{rep}: steps {[round(s['step_s'], 1) for s in r['steps']]} s", flush=True)
    summary = summarize_trl()
    (RESULTS_TRL.parent / "speed-trl-summary.json").write_text(json.dumps(summary, indent=1))
    print_table_trl(summary)


def print_table(summary: dict) -> None:
    print("| setting | engine | s/step | sampling s | reward s | fwd+bwd s | optim s | prompt+completion tok | "
          "positions run | peak RSS MB | GFLOP/s per token trained | GFLOP/s run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, d in summary["settings"].items():
        for engine in ("ours", "trl"):
            if engine not in d:
                continue
            m = d[engine]
            print(f"| {setting} | {engine} | {m['step_s']:.1f} | {m['sampling_s']:.1f} | {m['reward_s']:.2f} | "
                  f"{m['forward_backward_s']:.1f} | {m['optimizer_s']:.2f} | {m['prompt_tokens']:.0f}+{m['completion_tokens']:.0f} | "
                  f"{m.get('model_positions') or m['prompt_tokens'] + m['completion_tokens']:.0f} | "
                  f"{m['peak_rss_mb']:.0f} | {m['train_gflops_per_s']:.0f} | {m['model_gflops_per_s']:.0f} |")
        if "ratio_step_time" in d:
            print(f"| {setting} | ours/TRL | {d['ratio_step_time']:.2f} | | | | | | | {d['ratio_peak_rss']:.2f} | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per measurement (the first is a warm-up)")
    ap.add_argument("--settings", nargs="+", default=["fp32", "best"], choices=["fp32", "best"])
    ap.add_argument("--engines", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro", type=int, default=MICRO, help="completions per forward/backward pass, both engines")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--summary", action="store_true", help="only rebuild the summary from existing files")
    ap.add_argument("--engine", choices=["builtin", "trl"], default="builtin",
                    help="builtin: our engine vs GRPOTrainer; trl: SpineGRPOTrainer vs GRPOTrainer, and 2 processes vs 1")
    ap.add_argument("--worker", choices=["ours", "trl", "spine-trl", "peak"], help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "peak":
            rec = worker_peak(args.threads)
        elif args.worker == "ours":
            rec = worker_ours(args.precision, args.steps, args.seed, args.threads, args.micro)
        else:
            rec = worker_trl(args.precision, args.steps, args.seed, args.threads, args.micro,
                             spine=args.worker == "spine-trl")
            if rec["rank"] != 0:
                return
        rec.update(engine=args.worker, precision=args.precision, seed=args.seed, threads=args.threads,
                   micro_batch_size=args.micro)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, args.out)
        return

    if args.engine == "trl":
        return main_trl(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    peak_file = RESULTS / "peak-matmul.json"
    if not args.summary:
        if not peak_file.exists():
            run_worker(["peak", "--threads", str(args.threads)], peak_file, args.timeout)
        for setting in args.settings:
            precision = "fp32" if setting == "fp32" else "bf16"
            for rep in range(args.reps):
                order = list(args.engines) if rep % 2 == 0 else list(reversed(args.engines))
                for engine in order:
                    out = RESULTS / f"{setting}-{engine}-rep{rep}.json"
                    if out.exists():
                        continue
                    run_worker([engine, "--precision", precision, "--steps", str(args.steps), "--seed", str(rep),
                                "--threads", str(args.threads), "--micro", str(args.micro)], out, args.timeout)
                    r = json.loads(out.read_text())
                    print(f"  {setting} {engine} rep{rep}: steps {[round(s['step_s'], 1) for s in r['steps']]} s, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else None
    summary = summarize(peak)
    (RESULTS.parent / "speed-summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)


if __name__ == "__main__":
    main()
