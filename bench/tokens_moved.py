"""Which tokens moved: the entropy of fixed completions under the base model and under each run's
latest checkpoint (runs of ``bench/long.py``).

The completions are the base model's greedy answers to the runs' questions (the ``before``
evaluation of the first run's ``eval_records.jsonl``), so every model is scored on the same tokens.
The base model's *forks* are the 20 % highest-entropy tokens over all those completions (the tokens
the ``spine`` preset selects). For the base and for each checkpoint the script reports:

- the mean entropy (logits / the sampling temperature) over all tokens and over the base forks, and
  its ratio to the base;
- the share of base forks whose entropy fell below half of the base's;
- the mean log-probability of the completion tokens (how much more certain the model became of the
  base's greedy text);
- per token category (digit, operator or math symbol, whitespace, word, other) the share of the base
  forks in it and their mean entropy before and after;
- per token category over *all* tokens of the text (not only the forks) its share, mean entropy and
  mean log-probability: whether a model became less sure of the base's digits (an arithmetic slip in
  a greedy answer is a digit token whose probability fell);
- the token strings whose fork entropy fell the most in total;
- how far the weights moved: the displacement ‖ΔW‖ of the adapted weights from the base (the
  Frobenius norm of the merged LoRA deltas, scale · B·A, over all adapted matrices; for a full
  fine-tune, of the changed weights), next to the path length Σ‖Δθ‖ of its steps (in the trained
  parameters; estimated as the number of steps × the mean logged ``update/weight_change_norm``,
  which ``bench/long.py`` runs log on the first step of every episode). A run whose steps cancel (an anchor
  pulling back what the policy term pushed) has a short displacement for its path;
- against a fixed entropy band [low, high] (by default the anchored band of the first listed run
  that has one, ``band_anchor=first``): the share of each model's *own* forks on the text below and
  above the band, and the token categories of those forks. Below the band the ``spine`` band term
  raises a fork's entropy, above it lowers it. (Approximation: in training the forks are chosen on
  the model's own samples, here on the base's greedy text.)

Usage::

    M=~/.cache/spine-ttrl/bench/qwen2.5-coder-0.5b-instruct.gguf
    python bench/tokens_moved.py --tag tune-L5 --runs ttrl-lr0.0001-s0 spine-lr0.0001-s0 --threads 1

writes ``bench/results/long/<tag>/tokens_moved.{json,md}`` (``--out NAME``: ``NAME.{json,md}``). A
run's checkpoint must still exist (``~/.cache/spine-ttrl/bench/long/<tag>/<run>/checkpoints/``; a
finished run keeps its last one).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent / "results" / "long"
RUNS_ROOT = Path.home() / ".cache" / "spine-ttrl" / "bench" / "long"
CATEGORIES = ("digit", "math", "space", "word", "other")


def token_category(piece: str) -> str:
    """The category of a decoded token: ``digit`` if it has a digit, ``math`` if (stripped) it is
    made of operator / bracket / LaTeX characters, ``space`` if it is only whitespace, ``word`` if it
    has a letter, else ``other``."""
    if any(c.isdigit() for c in piece):
        return "digit"
    s = piece.strip()
    if not s:
        return "space"
    if all(c in "+-*/=×÷^()[]{}\\$<>.,:;!?%|_" for c in s) and any(c in "+-*/=×÷^()[]{}\\$<>%|_" for c in s):
        return "math"
    if any(c.isalpha() for c in s):
        return "word"
    return "other"


def fork_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    """The ceil(rho · n) highest-entropy valid tokens over the whole batch (n valid tokens)."""
    from spine_ttrl.selection import top_entropy_mask

    return top_entropy_mask(entropy, mask, rho, "batch")


def moved(base_h: torch.Tensor, h: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, forks: torch.Tensor,
          pieces: list[list[str]], top: int = 15) -> dict:
    """Entropy statistics of one model against the base on the same tokens.

    ``base_h``, ``h``, ``logp``, ``mask``, ``forks``: (B, T); ``pieces[b][t]`` the decoded token.
    Returns mean entropy over all valid tokens and over the forks, the share of forks whose
    entropy is below half the base's, the mean log-probability of the valid tokens, per category
    {share of forks, base entropy, entropy}, per category over all valid tokens {share, entropy,
    log-probability} (``all_categories``), and the ``top`` token strings by total entropy drop at
    the forks [(piece, count, base mean, mean)]."""
    out = {"entropy_all": h[mask].mean().item(), "entropy_forks": h[forks].mean().item(),
           "forks_below_half": (h[forks] < 0.5 * base_h[forks]).float().mean().item(),
           "logp_mean": logp[mask].mean().item()}
    def tally(table: dict, key, x: torch.Tensor, y: torch.Tensor, b: int, t: int) -> None:
        v = table.setdefault(key, [0, 0.0, 0.0])  # count, sum of x, sum of y
        v[0], v[1], v[2] = v[0] + 1, v[1] + x[b, t].item(), v[2] + y[b, t].item()

    def means(table: dict, n: int, names: tuple[str, str, str]) -> dict:
        return {k: {names[0]: v[0] / n, names[1]: v[1] / v[0] if v[0] else math.nan,
                    names[2]: v[2] / v[0] if v[0] else math.nan} for k, v in table.items()}

    cats, drops, every = {c: [0, 0.0, 0.0] for c in CATEGORIES}, {}, {c: [0, 0.0, 0.0] for c in CATEGORIES}
    for b, t in forks.nonzero().tolist():
        tally(cats, token_category(pieces[b][t]), base_h, h, b, t)
        tally(drops, pieces[b][t], base_h, h, b, t)
    for b, t in mask.nonzero().tolist():
        tally(every, token_category(pieces[b][t]), h, logp, b, t)
    out["categories"] = means(cats, max(int(forks.sum()), 1), ("fork_share", "base", "now"))
    out["all_categories"] = means(every, max(int(mask.sum()), 1), ("share", "entropy", "logp"))
    ranked = sorted(drops.items(), key=lambda kv: kv[1][2] - kv[1][1])[:top]
    out["top_drops"] = [(p, v[0], v[1] / v[0], v[2] / v[0]) for p, v in ranked]
    return out


def band_sides(h: torch.Tensor, mask: torch.Tensor, low: float, high: float, pieces: list[list[str]]) -> dict:
    """Where a model's own forks sit against a fixed band [low, high].

    forks = the top-20 % entropy valid tokens of ``h`` (B, T) over the batch (``fork_mask``);
    below = forks with H < low, above = forks with H > high. Returns ``below`` = |below| / |forks|,
    ``above`` = |above| / |forks|, and per token category the share of the forks (``fork_mix``), of
    the below-band forks (``below_mix``) and of the above-band forks (``above_mix``) in it (each mix
    sums to 1; all zero when its set is empty)."""
    forks = fork_mask(h, mask)
    sides = {"fork_mix": forks, "below_mix": forks & (h < low), "above_mix": forks & (h > high)}
    n = max(int(forks.sum()), 1)
    out = {"low": low, "high": high, "below": int(sides["below_mix"].sum()) / n, "above": int(sides["above_mix"].sum()) / n}
    for key, sel in sides.items():
        counts = dict.fromkeys(CATEGORIES, 0)
        for b, t in sel.nonzero().tolist():
            counts[token_category(pieces[b][t])] += 1
        total = sum(counts.values())
        out[key] = {c: k / total if total else 0.0 for c, k in counts.items()}
    return out


def anchored_band(dirs: list[Path]) -> tuple[float, float] | None:
    """The anchored band (``band/anchor_low``, ``band/anchor_high`` of the first logged step) of
    the first run directory that has one, else None."""
    for d in dirs:
        f = d / "metrics.jsonl"
        if f.exists() and (line := f.read_text().split("\n", 1)[0].strip()):
            first = json.loads(line)
            if "band/anchor_low" in first:
                return first["band/anchor_low"], first["band/anchor_high"]
    return None


def weight_displacement(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> float:
    """‖W − W₀‖_F over the model's adapted weights: for LoRA layers (PEFT) the merged delta
    ``get_delta_weight`` (scale · B·A; 0 at initialisation, since B starts at 0), for a full fine-tune the
    trained parameters against their ``initial`` values."""
    sq, lora = 0.0, False
    for module in model.modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "active_adapters", None):
            lora = True
            for name in module.active_adapters:
                if name in getattr(module, "lora_A", {}):
                    sq += module.get_delta_weight(name).float().pow(2).sum().item()
    if not lora:
        sq = sum((p.detach().float() - initial[n].float()).pow(2).sum().item()
                 for n, p in model.named_parameters() if n in initial)
    return math.sqrt(sq)


def path_length(run_dir: Path, step: int) -> float | None:
    """The path length of the run's first ``step`` steps, Σₛ ‖Δθₛ‖, estimated as ``step`` × the mean
    ``update/weight_change_norm`` over the steps ≤ ``step`` that logged it (runs log it on every step with
    ``--diagnostics``, on every k-th with ``--diagnostics-every k``; ``bench/long.py`` on the first step of
    every episode). None if no step logged it."""
    from spine_ttrl.report import read_jsonl  # a running run's cut-short last line is skipped

    xs = [m.get("update/weight_change_norm") for m in read_jsonl(run_dir / "metrics.jsonl")
          if m.get("step", 0) <= step]
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return step * sum(xs) / len(xs) if xs else None


def _render(out: dict) -> str:
    lines = [f"# Which tokens moved: {out['tag']}", "",
             f"{out['completions']} base greedy completions, {out['tokens']} tokens, {out['forks']} base forks "
             f"(top 20 %); entropy at temperature {out['temperature']}.", "",
             "| model | step | entropy, all tokens | entropy, base forks | forks below half the base | "
             "mean log-prob of the text | weights moved ‖ΔW‖ | path Σ‖Δθ‖ (est.) |", "|---|---|---|---|---|---|---|---|"]
    num = lambda x: "–" if x is None else f"{x:.3f}"
    for name, r in out["models"].items():
        lines.append(f"| {name} | {r['step']} | {r['entropy_all']:.3f} | {r['entropy_forks']:.3f} | "
                     f"{r['forks_below_half']:.2f} | {r['logp_mean']:.3f} | {num(r.get('displacement'))} | "
                     f"{num(r.get('path'))} |")
    lines += ["", "Base forks by token category: share, then mean entropy base → now:", "",
              "| model | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for name, r in out["models"].items():
        cells = [f"{c['fork_share']:.2f}: {c['base']:.2f} → {c['now']:.2f}" if c["fork_share"] else "–"
                 for c in (r["categories"][k] for k in CATEGORIES)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if all("all_categories" in r for r in out["models"].values()):
        lines += ["", "All tokens of the text by category: share, then mean entropy / mean log-probability of "
                  "the base's token:", "", "| model | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
        for name, r in out["models"].items():
            cells = [f"{c['share']:.2f}: {c['entropy']:.3f} / {c['logp']:.3f}" if c["share"] else "–"
                     for c in (r["all_categories"][k] for k in CATEGORIES)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if all("band" in r for r in out["models"].values()):
        low, high = out["band"]
        lines += ["", f"Each model's own forks (top 20 % of its entropies on the text) against the band "
                  f"[{low:.3f}, {high:.3f}]: share below (entropy pushed up) and above (pushed down), then the "
                  "token categories of the forks below and above it:", "",
                  "| model | below | above | below: " + " / ".join(CATEGORIES) + " | above: " + " / ".join(CATEGORIES) + " |",
                  "|---|---|---|---|---|"]
        for name, r in out["models"].items():
            b = r["band"]
            mix = lambda m: " / ".join(f"{m[c]:.2f}" for c in CATEGORIES)
            lines.append(f"| {name} | {b['below']:.2f} | {b['above']:.2f} | {mix(b['below_mix'])} | {mix(b['above_mix'])} |")
    for name, r in out["models"].items():
        if name == "base":
            continue
        lines += ["", f"Largest total entropy drops at the base forks, {name}: "
                  + ", ".join(f"{p!r} ×{n} ({b:.2f} → {a:.2f})" for p, n, b, a in r["top_drops"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="run directory names under --runs-root/--tag")
    p.add_argument("--runs-root", type=Path, default=RUNS_ROOT)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--band", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="entropy band to place each model's forks against (default: the anchored band of the "
                        "first listed run that has one; without either the band table is left out)")
    p.add_argument("--out", default="tokens_moved",
                   help="file name (without suffix) of the report under bench/results/long/<tag>/, so that a "
                        "comparison of other runs does not replace an earlier one")
    args = p.parse_args(argv)
    if not args.out or Path(args.out).name != args.out:
        p.error(f"--out must be a plain file name without a directory, got {args.out!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from spine_ttrl.checkpoint import list_checkpoints, load_checkpoint, load_trainable_state
    from spine_ttrl.config import make_config
    from spine_ttrl.data import load_examples, resolve_task
    from spine_ttrl.engine.builtin import lora_settings
    from spine_ttrl.engine.models import load_model_and_tokenizer
    from spine_ttrl.engine.scoring import build_training_batch, score_batch
    from spine_ttrl.prompting import encode_examples

    dirs = [args.runs_root / args.tag / r for r in args.runs]
    for d in dirs:
        if not (d / "config.toml").exists():
            raise SystemExit(f"no run at {d}")
    cfg = make_config(config_file=str(dirs[0] / "config.toml"))
    temperature = cfg.sampling.temperature
    records = next(json.loads(line) for line in (dirs[0] / "eval_records.jsonl").read_text().splitlines()
                   if json.loads(line)["tag"] == "before")["records"]
    model, tok = load_model_and_tokenizer(cfg.model.model, lora=lora_settings(cfg.model))
    examples = load_examples(cfg.data.data)
    task = resolve_task(examples, cfg.data.task)
    examples, prompt_ids, _ = encode_examples(tok, examples, task, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                              long_prompts=cfg.data.long_prompts, system_prompt=cfg.data.system_prompt)
    by_id = {e.id: ids for e, ids in zip(examples, prompt_ids)}
    recs = [r for r in records if r["id"] in by_id and r.get("greedy_text")]
    completions = [tok(r["greedy_text"], add_special_tokens=False)["input_ids"] for r in recs]
    batch = build_training_batch([by_id[r["id"]] for r in recs], completions, tok.pad_token_id)
    mask = batch[4]
    pieces = [[tok.decode([t]) for t in c] for c in completions]
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    band = tuple(args.band) if args.band else anchored_band(dirs)

    def stats(h: torch.Tensor, logp: torch.Tensor) -> dict:
        out = moved(base_h, h, logp, mask, forks, pieces)
        if band:
            out["band"] = band_sides(h, mask, band[0], band[1], pieces)
        return out

    base_logp, base_h = score_batch(model, batch, 4, temperature=temperature, chunk_size=1024)
    forks = fork_mask(base_h, mask)
    models = {"base": {"step": 0, "displacement": 0.0, "path": 0.0, **stats(base_h, base_logp)}}
    for name, d in zip(args.runs, dirs):
        ckpts = list_checkpoints(d)
        if not ckpts:
            print(f"{name}: no checkpoint left, skipped", flush=True)
            continue
        load_trainable_state(model, initial)
        load_trainable_state(model, load_checkpoint(ckpts[-1])["model"])
        logp, h = score_batch(model, batch, 4, temperature=temperature, chunk_size=1024)
        step = int(ckpts[-1].name.split("-")[-1])
        models[name] = {"step": step, "displacement": weight_displacement(model, initial),
                        "path": path_length(d, step), **stats(h, logp)}
        print(f"{name} (step {step}): entropy at base forks {models[name]['entropy_forks']:.3f}", flush=True)
    out = {"tag": args.tag, "completions": len(recs), "tokens": int(mask.sum()), "forks": int(forks.sum()),
           "temperature": temperature, "band": band, "models": models}
    dest = ROOT / args.tag
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    (dest / f"{args.out}.md").write_text(_render(out))
    print(_render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
