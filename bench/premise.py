"""Does the TTRL premise hold? Measure maj@k against pass@1 per task level and temperature.

Test-time RL with a majority-vote reward can only help where the majority answer is right more
often than a single sample (maj@k well above pass@1). This script evaluates a model on generated
arithmetic levels at several temperatures and writes one result file per setting to
``bench/results/premise-*.json``; settings whose file exists are skipped, so an interrupted sweep
resumes where it stopped.

    python bench/premise.py --levels 1 2 3 --temperatures 0.6 0.8 1.0 --questions 64 --k 8
    python bench/premise.py --sets gsm8k svamp math-prealgebra --model $M --temperatures 0.8 --questions 32

``--sets`` measures real question sets from the shared data folder (:mod:`sets`) instead of the
generated levels; their result files carry the set name where the level would be.

Each file holds the settings, the metrics of :func:`spine_ttrl.evaluate_model` (greedy pass@1,
avg@k = sampled pass@1, maj@k, pass@k, truncation and format rates, each accuracy with its
standard error) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--sets", nargs="+", default=[], help="real sets instead of levels: gsm8k svamp math-prealgebra")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.8, 1.0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--k", type=int, default=8, help="samples per question")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1000, help="question seed (kept apart from evaluation seeds)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--summary", action="store_true", help="only print a markdown table of the existing result files")
    args = ap.parse_args()
    if args.summary:
        print_table()
        return

    import torch

    from spine_ttrl import evaluate_model
    from spine_ttrl.models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    model_name = args.model or "embedded-smollm2-135m"
    model = tokenizer = None
    if args.sets:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sets import materialise

        specs = [(name, str(materialise(name, args.questions, args.seed))) for name in args.sets]
    else:
        specs = [(f"L{level}", f"arith:{level}:{args.questions}:{args.seed}") for level in args.levels]
    for label, spec in specs:
        level = label[1:] if label.startswith("L") and label[1:].isdigit() else label
        for temp in args.temperatures:
            name = (f"premise-{Path(model_name).name}-{label}-T{temp}-n{args.questions}-k{args.k}-s{args.seed}"
                    f"-m{args.max_new_tokens}.json")  # one file per setting, token budget included
            out = RESULTS / name
            if out.exists():
                print(f"skip {name} (done)")
                continue
            if model is None:
                model, tokenizer = load_model_and_tokenizer(args.model)
            t0 = time.perf_counter()
            res = evaluate_model(model, spec, tokenizer=tokenizer,
                                 num_samples=args.k, temperature=temp, top_p=1.0, greedy=temp == args.temperatures[0],
                                 max_new_tokens=args.max_new_tokens)
            record = {"model": model_name, "level": int(level) if str(level).isdigit() else level, "temperature": temp, "questions": args.questions,
                      "k": args.k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                      "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0, "metrics": res.metrics}
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, out)
            m = res.metrics
            print(f"{label} T{temp}: avg@{args.k}={m[f'avg@{args.k}']:.3f}±{m[f'avg@{args.k}_se']:.3f} "
                  f"maj@{args.k}={m[f'maj@{args.k}']:.3f}±{m[f'maj@{args.k}_se']:.3f} "
                  f"truncated={m['sample_truncated_rate']:.3f} ({record['wall_s']:.0f} s)")


def print_table() -> None:
    """A markdown table of every premise result file (maj@k - avg@k is the premise gap)."""
    print("| model | level | T | n | k | max new | greedy pass@1 | avg@k | maj@k | maj@k − avg@k | pass@k | truncated | boxed | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sorted(RESULTS.glob("premise-*.json")):
        r = json.loads(f.read_text())
        m, k = r["metrics"], r["k"]
        greedy = f"{m['greedy_pass@1']:.3f}±{m['greedy_pass@1_se']:.3f}" if "greedy_pass@1" in m else "–"
        print(f"| {Path(r['model']).name} | {r['level']} | {r['temperature']} | {r['questions']} | {k} | {r['max_new_tokens']} | {greedy} | "
              f"{m[f'avg@{k}']:.3f}±{m[f'avg@{k}_se']:.3f} | {m[f'maj@{k}']:.3f}±{m[f'maj@{k}_se']:.3f} | "
              f"{m[f'maj@{k}'] - m[f'avg@{k}']:+.3f} | {m[f'pass@{k}']:.3f} | {m['sample_truncated_rate']:.2f} | "
              f"{m['sample_boxed_rate']:.2f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
