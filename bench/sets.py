"""Real question sets for the benchmarks, read from the shared data folder (never copied into the project).

``materialise(name, n, seed, offset)`` writes ``n`` questions of a seeded shuffle of a set, from
position ``offset`` on, to a JSONL file under ``~/.cache/spine-ttrl/bench/sets/`` (``prompt``,
``answer``, ``id``, ``source``) and returns its path, ready for ``--data``; offsets 0, n, 2n, ... of
one seed give disjoint blocks of one evaluation set. From the shell::

    python bench/sets.py svamp 16 0 --offset 16     # prints the path of SVAMP's second 16-question block

Sets:

- ``gsm8k``: GSM8K test (1,319); the answer is the number after ``####``.
- ``svamp``: SVAMP (1,000); the prompt is ``Body`` + " " + ``Question`` (the question alone lacks
  the numbers), the answer ``Answer`` printed without a trailing ``.0``.
- ``math-prealgebra``: MATH-500's prealgebra questions (the subject is in each row's ``id``).
- ``mixed``: equal parts of the three, for a per-``source`` breakdown in one run.
- ``claims``: label answers (``--task label``, yes / no) made offline from the built-in level-5
  arithmetic (``arith:5:1000:99``): the question, then "A student answered N. Is the student's
  answer correct?". Half the claims (seeded) are the true answer; the others are off by a small
  amount (±1–5, ±10 or ±10 %), so judging a claim means solving the question. There is no
  PubMedQA-style set in the shared data; this one measures the label path of the loop on the
  benchmark model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path("~/.cache/spine-ttrl/bench/sets").expanduser()
SETS = ("gsm8k", "svamp", "math-prealgebra", "mixed", "claims")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def load_set(name: str) -> list[dict]:
    """All rows of a named set as {prompt, answer, id, source}."""
    if name == "gsm8k":
        rows = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
        return [{"prompt": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", ""),
                 "id": f"gsm8k-{i}", "source": "gsm8k"} for i, r in enumerate(rows)]
    if name == "svamp":
        rows = json.loads((DATA / "svamp" / "SVAMP.json").read_text())
        return [{"prompt": f"{r['Body'].strip()} {r['Question'].strip()}", "answer": _number(r["Answer"]),
                 "id": f"svamp-{r['ID']}", "source": "svamp"} for r in rows]
    if name == "math-prealgebra":
        rows = json.loads((DATA / "ttrl" / "math.json").read_text())
        return [{"prompt": r["prompt"], "answer": r["answer"], "id": r["id"], "source": "math-prealgebra"}
                for r in rows if "/prealgebra/" in r["id"]]
    if name == "claims":
        return _claims()
    raise ValueError(f"unknown set {name!r} (expected one of {', '.join(SETS)})")


def _claims(count: int = 1000, seed: int = 99) -> list[dict]:
    """Yes / no claims about level-5 arithmetic questions (see the module docstring)."""
    from spine_ttrl.data import generate_arith

    rng = random.Random(seed)
    rows = []
    for ex in generate_arith(5, count, seed):
        truth = int(ex.answer)
        right = rng.random() < 0.5
        claim = truth
        while not right and (claim == truth or claim < 0):
            kind = rng.choice(("small", "ten", "percent"))
            step = rng.randint(1, 5) if kind == "small" else 10 if kind == "ten" else max(1, round(truth * 0.1))
            claim = truth + rng.choice((-1, 1)) * step
        rows.append({"prompt": f"{ex.prompt} A student answered {claim}. Is the student's answer correct?",
                     "answer": "yes" if right else "no", "labels": ["yes", "no"],
                     "id": f"claims-{ex.id}", "source": "claims"})
    return rows


def materialise(name: str, n: int, seed: int = 0, offset: int = 0) -> Path:
    """Write ``n`` questions of set ``name`` (seeded shuffle, from position ``offset`` on; ``mixed``:
    n/3 of each) to a JSONL file."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if name == "mixed":
        if offset:
            raise ValueError("mixed: blocks (offset) are not supported; materialise each set instead")
        parts = ["gsm8k", "svamp", "math-prealgebra"]
        rows = [r for i, p in enumerate(parts) for r in _pick(load_set(p), n // 3 + (i < n % 3), seed)]
    else:
        rows = _pick(load_set(name), n, seed, offset)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-n{n}-s{seed}{f'-o{offset}' if offset else ''}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pick(rows: list[dict], n: int, seed: int, offset: int = 0) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if offset + n > len(rows):
        raise ValueError(f"asked for questions {offset}..{offset + n - 1}, the set has {len(rows)}")
    return rows[offset:offset + n]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write a block of a real question set to a JSONL file; print its path.")
    p.add_argument("name", choices=SETS)
    p.add_argument("n", type=int, help="questions in the block")
    p.add_argument("seed", type=int, nargs="?", default=0, help="seed of the shuffle")
    p.add_argument("--offset", type=int, default=0, help="position of the block's first question in the shuffle")
    args = p.parse_args(argv)
    try:
        print(materialise(args.name, args.n, args.seed, args.offset))
    except ValueError as e:
        p.error(str(e))  # one line on stderr, exit status 2; nothing written
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
