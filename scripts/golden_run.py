"""Record or check a golden run: the same sampled token ids and metrics before and after a change.

A refactor that claims "behaviour unchanged" runs this before the change (``--record``) and after
it (``--check``): for each configuration below it runs a tiny adaptation on the embedded model
with a fixed seed and compares, step by step, the SHA-256 of the sampled completion ids and every
logged metric (times and memory excluded) within ``--atol``.

    python scripts/golden_run.py --record golden.json     # on the old code
    python scripts/golden_run.py --check golden.json      # on the new code: exit 1 on a mismatch

The numbers depend on the CPU's kernels (bf16 support, vector width): compare runs made on the
same kind of machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

BASE = ["--data", "arith:1:4:3", "--steps", "2", "--questions-per-step", "2", "--num-votes", "4",
        "--num-train-samples", "2", "--max-new-tokens", "12", "--micro-batch-size", "2",
        "--eval-samples", "2", "--eval-limit", "2", "--eval-max-new-tokens", "8", "--lr", "1e-4",
        "--threads", "1", "--seed", "7", "--no-progress"]
CASES = {
    "ttrl": ["--preset", "ttrl"],
    "spine": ["--preset", "spine"],
    "spine-v2": ["--preset", "spine-v2"],
    "spine-kl-anchor": ["--preset", "spine", "--kl-coef", "0.1", "--band-anchor", "first",
                        "--updates-per-batch", "2"],
}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(("time", "memory/")) and k != "tokens/per_second"
            and k != "eval/time_s"}


def run_case(argv: list[str]) -> dict:
    from spine_ttrl.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        code = main(["adapt", *BASE, *argv, "--out", str(out)])
        if code != 0:
            raise SystemExit(f"run failed with exit code {code}: {argv}")
        return {"samples": [r["completion_ids_sha256"] for r in _records(out / "samples.jsonl")],
                "metrics": [_strip(m) for m in _records(out / "metrics.jsonl")],
                "eval": [_strip(m) for m in _records(out / "eval.jsonl")]}


def compare(a: dict, b: dict, atol: float) -> list[str]:
    """Differences between two recorded cases (empty when they match)."""
    errs = []
    if a["samples"] != b["samples"]:
        errs.append(f"sampled token ids differ: {a['samples']} vs {b['samples']}")
    for part in ("metrics", "eval"):
        if len(a[part]) != len(b[part]):
            errs.append(f"{part}: {len(a[part])} vs {len(b[part])} records")
            continue
        for i, (x, y) in enumerate(zip(a[part], b[part])):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    errs.append(f"{part}[{i}] {k}: only in {'old' if k in x else 'new'}")
                    continue
                u, v = x[k], y[k]
                same = (u == v) or (isinstance(u, float) and isinstance(v, float)
                                    and ((math.isnan(u) and math.isnan(v)) or abs(u - v) <= atol))
                if not same:
                    errs.append(f"{part}[{i}] {k}: {u} vs {v}")
    return errs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    args = p.parse_args(argv)
    got = {name: run_case(CASES[name]) for name in args.cases}
    if args.record:
        Path(args.record).write_text(json.dumps(got, indent=1) + "\n")
        print(f"recorded {len(got)} cases to {args.record}")
        return 0
    want = json.loads(Path(args.check).read_text())
    bad = 0
    for name, rec in got.items():
        errs = compare(want[name], rec, args.atol)
        print(f"{name}: {'same' if not errs else 'DIFFERENT'}")
        for e in errs[:20]:
            print("   ", e)
        bad += bool(errs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
