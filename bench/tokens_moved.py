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
- the token strings whose fork entropy fell the most in total.

Usage::

    M=~/.cache/spine-ttrl/bench/qwen2.5-coder-0.5b-instruct.gguf
    python bench/tokens_moved.py --tag tune-L5 --runs ttrl-lr0.0001-s0 spine-lr0.0001-s0 --threads 1

writes ``bench/results/long/<tag>/tokens_moved.{json,md}``. A run's checkpoint must still exist
(``~/.cache/spine-ttrl/bench/long/<tag>/<run>/checkpoints/``; a finished run keeps its last one).
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


def _render(out: dict) -> str:
    lines = [f"# Which tokens moved: {out['tag']}", "",
             f"{out['completions']} base greedy completions, {out['tokens']} tokens, {out['forks']} base forks "
             f"(top 20 %); entropy at temperature {out['temperature']}.", "",
             "| model | step | entropy, all tokens | entropy, base forks | forks below half the base | "
             "mean log-prob of the text |", "|---|---|---|---|---|---|"]
    for name, r in out["models"].items():
        lines.append(f"| {name} | {r['step']} | {r['entropy_all']:.3f} | {r['entropy_forks']:.3f} | "
                     f"{r['forks_below_half']:.2f} | {r['logp_mean']:.3f} |")
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
    args = p.parse_args(argv)
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

    base_logp, base_h = score_batch(model, batch, 4, temperature=temperature, chunk_size=1024)
    forks = fork_mask(base_h, mask)
    models = {"base": {"step": 0, **moved(base_h, base_h, base_logp, mask, forks, pieces)}}
    for name, d in zip(args.runs, dirs):
        ckpts = list_checkpoints(d)
        if not ckpts:
            print(f"{name}: no checkpoint left, skipped", flush=True)
            continue
        load_trainable_state(model, initial)
        load_trainable_state(model, load_checkpoint(ckpts[-1])["model"])
        logp, h = score_batch(model, batch, 4, temperature=temperature, chunk_size=1024)
        step = int(ckpts[-1].name.split("-")[-1])
        models[name] = {"step": step, **moved(base_h, h, logp, mask, forks, pieces)}
        print(f"{name} (step {step}): entropy at base forks {models[name]['entropy_forks']:.3f}", flush=True)
    out = {"tag": args.tag, "completions": len(recs), "tokens": int(mask.sum()), "forks": int(forks.sum()),
           "temperature": temperature, "models": models}
    dest = ROOT / args.tag
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokens_moved.json").write_text(json.dumps(out, indent=1))
    (dest / "tokens_moved.md").write_text(_render(out))
    print(_render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
