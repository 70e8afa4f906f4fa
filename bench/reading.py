"""Write a pooled quality benchmark into docs/benchmarks/quality.md: its table and its reading.

``bench/quality.py --pool`` writes ``summary.json`` / ``summary.md`` for a pool of blocks. This script
re-reads that pool's blocks and rewrites three marked regions of a Markdown file (by default
``docs/benchmarks/quality.md``) from them, so that the numbers quoted in prose are regenerated with
the table instead of being copied by hand:

- ``<!-- pooled-table -->`` … ``<!-- /pooled-table -->``: ``summary.md`` without its title;
- ``<!-- pooled-headline -->`` … ``<!-- /pooled-headline -->``: three sentences for the top of the
  page (:func:`headline`);
- ``<!-- pooled-reading -->`` … ``<!-- /pooled-reading -->``: the reading — per method the gains and
  their paired-bootstrap intervals, greedy-vs-majority counts, block-by-block counts, the project's
  benchmark goals (met or not, computed), standard errors, and how the SPINE differences moved as blocks were
  added (each prefix of the pool re-pooled with :func:`quality.summarize_pool`).

Hand-written remarks about single blocks stay outside the markers. Usage::

    python bench/quality.py --tag pooled-L5 --pool pilot-L5 block2-L5 ...   # the pool's summary
    python bench/reading.py pooled-L5                                        # quality.md regions rewritten
    python bench/reading.py pooled-L5 --print                                # the reading on stdout only

The run keys are taken from the pool (the first TTRL, SPINE and SPINE-v2 keys); a pool without a
base or without one of the three methods is refused with a one-line error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUALITY_DOC = HERE.parent / "docs" / "benchmarks" / "quality.md"

_spec = importlib.util.spec_from_file_location("bench_quality", HERE / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
         11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen", 17: "seventeen",
         18: "eighteen", 19: "nineteen", 20: "twenty"}


def pts(x: float) -> str:
    """A fraction as signed points with one decimal and a typographic minus: -0.0234 -> '−2.3'."""
    s = f"{100 * x:+.1f}"
    return s.replace("-", "−")


def ci(c: dict) -> str:
    """A bootstrap result {'diff', 'ci_low', 'ci_high'} as '−2.3 [−4.2, −0.5]' (points)."""
    return f"{pts(c['diff'])} [{pts(c['ci_low'])}, {pts(c['ci_high'])}]"


def excludes_zero(c: dict) -> bool:
    """The 95 % interval lies entirely above or entirely below 0."""
    return c["ci_low"] > 0 or c["ci_high"] < 0


def arrow(values: list[float]) -> str:
    """Fractions as a sequence of signed points: [0.076, 0.044] -> '+7.6 → +4.4'."""
    return " → ".join(pts(v) for v in values)


def block_label(name: str) -> str:
    """'block7-L5' -> 'block 7', 'pilot-L5' -> 'the pilot'."""
    m = re.match(r"block(\d+)", name)
    return f"block {m.group(1)}" if m else f"the {name.split('-')[0]}"


def _keys(summary: dict) -> dict[str, str]:
    """The pooled run key of each method ('ttrl', 'spine', 'spine-v2'), the first one listed."""
    out: dict[str, str] = {}
    for key in summary["methods"]:
        method = re.sub(r"-lr.*$", "", key)
        if method in ("ttrl", "spine", "spine-v2"):  # variants ("spine+noband-lr…") do not match
            out.setdefault(method, key)
    missing = {"ttrl", "spine", "spine-v2"} - set(out)
    if missing or "base" not in summary:
        what = sorted(missing) + ([] if "base" in summary else ["base"])
        raise SystemExit(f"reading: the pool {summary['tag']} lacks {', '.join(what)}")
    return out


def standard_errors(summary: dict, keys: dict[str, str]) -> dict[str, dict[str, float]]:
    """The pooled standard error of greedy pass@1 and avg@k of the base, TTRL, SPINE and SPINE-v2 rows:
    {"greedy_pass@1": {"base": se, "TTRL": se, ...}, "avg@k": {...}} (fractions, SE = sd / √n)."""
    rows = [("base", summary["base"])] + [(name, summary["methods"][keys[m]])
                                         for name, m in (("TTRL", "ttrl"), ("SPINE", "spine"), ("SPINE-v2", "spine-v2"))]
    return {label: {name: row[f"{label}_se"] for name, row in rows}
            for label in ("greedy_pass@1", f"avg@{summary['k']}")}


def block_stats(summary: dict, keys: dict[str, str]) -> list[dict]:
    """Per block (in pool order): the per-question arrays of the base and of each method (seeds
    averaged), the methods' mean majority share, and paired bootstraps of each method − base."""
    k = summary["k"]
    out = []
    for name in summary["pooled"]:
        base, runs = quality._load_block(quality.ROOT / name)
        entry = {"block": name, "base": quality.per_question(base, k), "base_majority": base["eval"]["majority_ratio"],
                 "methods": {}, "majority": {}, "vs_base": {}}
        for method, key in keys.items():
            arrays = quality._seed_mean_arrays(runs[key], k, base)
            entry["methods"][method] = arrays
            entry["majority"][method] = float(np.mean([r["eval"]["majority_ratio"] for r in runs[key]]))
            entry["vs_base"][method] = {m: quality.paired_bootstrap(arrays[m], entry["base"][m]) for m in ("greedy", "avg")}
        out.append(entry)
    return out


def growth(summary: dict, keys: dict[str, str], first: int = 2) -> list[dict]:
    """SPINE − base and SPINE − TTRL (greedy, avg@k) for each prefix of the pool's blocks, from
    ``first`` blocks to all of them: the same pooling, re-run on the blocks added so far (the whole
    pool is ``summary`` itself, not pooled again)."""
    k, names = summary["k"], summary["pooled"]
    s, t = keys["spine"], keys["ttrl"]
    prefixes = [quality.summarize_pool([quality.ROOT / b for b in names[:n]], k, "prefix")
                for n in range(min(first, len(names)), len(names))]
    return [{"questions": p["base"]["questions"], "spine_base": p["paired_bootstrap"][f"{s} - base"],
             "spine_ttrl": p["paired_bootstrap"][f"{s} - {t}"]} for p in prefixes + [summary]]


def reading(summary: dict, blocks: list[dict], grow: list[dict]) -> str:
    """The generated reading (Markdown bullets) of a pooled summary with a base, TTRL, SPINE and SPINE-v2."""
    keys = _keys(summary)
    k = summary["k"]
    t, s, v = (summary["methods"][keys[m]] for m in ("ttrl", "spine", "spine-v2"))
    b = summary["base"]
    pb = summary["paired_bootstrap"]
    st, sb = pb[f"{keys['spine']} - {keys['ttrl']}"], pb[f"{keys['spine']} - base"]
    vt, vb = pb[f"{keys['spine-v2']} - {keys['ttrl']}"], pb[f"{keys['spine-v2']} - base"]
    tb = pb[f"{keys['ttrl']} - base"]
    n = b["questions"]
    pairs = n * len(s["seeds"])
    nb = len(blocks)
    avg = f"avg@{k}"
    lines = []

    def rnd(x: float) -> int:
        return int(round(x))

    # TTRL
    lines.append(
        f"- **TTRL** (`{keys['ttrl']}`): greedy pass@1 {b['greedy_pass@1']:.3f} → {t['greedy_pass@1']:.3f} "
        f"({ci(tb['greedy'])} over base), {avg} {b[avg]:.3f} → {t[avg]:.3f} ({ci(tb['avg'])}); "
        f"{'it narrows the samples' if t['majority_ratio'] > b['majority_ratio'] else 'the samples'} (majority share {b['majority_ratio']:.2f} → {t['majority_ratio']:.2f}, pass@{k} "
        f"{b[f'pass@{k}']:.2f} → {t[f'pass@{k}']:.2f}) and changes {rnd(t['greedy_changed'] * pairs)} of {pairs} "
        f"greedy answers (question × seed pairs) from the base's.")

    # SPINE
    unchanged = [x["block"] for x in blocks if np.nanmax(x["methods"]["spine"]["changed"]) == 0]
    names = [block_label(u) for u in unchanged]
    unchanged_txt = (f" (none on {' and '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)})"
                     if unchanged else "")
    length_ratio = s["length_last"] / s["length_first"]
    lines.append(
        f"- **SPINE** (`{keys['spine']}`): {avg} {s[avg]:.3f} (**{ci(sb['avg'])} over base**"
        f"{', the interval excludes 0' if excludes_zero(sb['avg']) else ', the interval includes 0'}; "
        f"SPINE − TTRL {ci(st['avg'])}), maj@{k} {s[f'maj@{k}']:.3f} (TTRL {t[f'maj@{k}']:.3f}, base "
        f"{b[f'maj@{k}']:.3f}); diversity and length: majority share {s['majority_ratio']:.2f} (base "
        f"{b['majority_ratio']:.2f}), pass@{k} {s[f'pass@{k}']:.2f} (base {b[f'pass@{k}']:.2f}), sampled answers "
        f"{s['sample_length']:.0f} tokens (base {b['sample_length']:.0f}), training rollouts {s['length_first']:.0f} → "
        f"{s['length_last']:.0f} ({length_ratio:.2f}×). {rnd(s['greedy_changed'] * pairs)} of its {pairs} greedy "
        f"answers differ from the base's{unchanged_txt}, TTRL's {rnd(t['greedy_changed'] * pairs)}; greedy pass@1 "
        f"{s['greedy_pass@1']:.3f} ({ci(sb['greedy'])} over base) and **SPINE − TTRL greedy {ci(st['greedy'])}**"
        + (": on greedy pass@1 TTRL beats SPINE." if st["greedy"]["ci_high"] < 0 else
           ": on greedy pass@1 SPINE beats TTRL." if st["greedy"]["ci_low"] > 0 else
           ": the interval includes 0."))

    # greedy vs majority
    def split(row: dict, scale: int) -> tuple[int, int, int]:
        return rnd((1 - row["greedy_is_majority"]) * scale), rnd(row["split_majority_right"] * scale), \
            rnd(row["split_greedy_right"] * scale)

    bd, bm, bg = split(b, n)
    sd, sm, sg = split(s, pairs)
    td, tm, tg = split(t, pairs)
    lines.append(
        f"- **Greedy against the sampled majority** (the \"greedy = majority\" column: the share of questions "
        f"whose greedy answer equals the majority of the {k} samples; counts are the \"greedy vs samples\" "
        f"table's shares times {n} questions, or {pairs} question × seed pairs): the base's greedy answer agrees "
        f"with its own sampled majority on {100 * b['greedy_is_majority']:.0f} % of the questions; where they "
        f"differ ({bd}) the majority is right {bm} times and the greedy answer {bg} times. After TTRL they agree "
        f"on {100 * t['greedy_is_majority']:.0f} % (of {td} disagreements the majority is right {tm} times, greedy "
        f"{tg}); after SPINE on {100 * s['greedy_is_majority']:.0f} % (of {sd}: majority {sm}, greedy {sg}); after "
        f"SPINE-v2 on {100 * v['greedy_is_majority']:.0f} %.")

    # SPINE-v2
    ranked = sorted(blocks, key=lambda x: -x["vs_base"]["spine-v2"]["avg"]["diff"])
    best = ranked[:3]
    rest = [x["vs_base"]["spine-v2"]["avg"]["diff"] for x in ranked[3:]]
    narrower = sum(x["majority"]["spine-v2"] > x["base_majority"] for x in blocks)
    best_txt = ", ".join(
        f"{block_label(x['block'])} ({avg} {x['base']['avg'].mean():.3f} → {x['methods']['spine-v2']['avg'].mean():.3f}, "
        f"{ci(x['vs_base']['spine-v2']['avg'])})" for x in best)
    rest_txt = (f"; on the other {WORDS.get(len(rest), len(rest))} blocks SPINE-v2 − base {avg} lies between "
                f"{pts(min(rest))} and {pts(max(rest))}" if rest else "")
    lines.append(
        f"- **SPINE-v2** (`{keys['spine-v2']}`): majority share {v['majority_ratio']:.2f} (base "
        f"{b['majority_ratio']:.2f}; higher than the base's on {narrower} of {nb} blocks), pass@{k} "
        f"{v[f'pass@{k}']:.2f}, maj@{k} {v[f'maj@{k}']:.3f}; SPINE-v2 − TTRL {avg} {ci(vt['avg'])}, greedy "
        f"{ci(vt['greedy'])}; − base {avg} {ci(vb['avg'])}, greedy {ci(vb['greedy'])}. "
        f"{'Its best blocks on ' + avg if rest else 'Per block, on ' + avg}: "
        f"{best_txt}{rest_txt}.")

    # block by block
    def count(method: str, m: str, sign: int, against: str = "base") -> int:
        return quality.blocks_beyond(summary["per_block"], keys[method], keys.get(against, against), m, sign)

    def above_below(method: str, against: str = "base") -> str:
        return (f"{count(method, 'greedy', 1, against)} / {count(method, 'avg', 1, against)} above and "
                f"{count(method, 'greedy', -1, against)} / {count(method, 'avg', -1, against)} below")

    base_greedy = [x["base"]["greedy"].mean() for x in blocks]
    lines.append(
        f"- **Block by block** (the per-block table under the pooled table; greedy / {avg}, of {nb} blocks): "
        f"TTRL is {above_below('ttrl')} the base, SPINE {above_below('spine')}, SPINE-v2 "
        f"{above_below('spine-v2')}; SPINE is {above_below('spine', 'ttrl')} TTRL. Base greedy pass@1 ranges "
        f"from {min(base_greedy):.3f} to {max(base_greedy):.3f} between blocks.")

    # the benchmark goals
    def met(c: dict, target: float) -> str:
        if c["ci_low"] >= target:
            return "met (the whole interval)"
        if c["diff"] >= target:
            return "met by the point estimate, not by the whole interval"
        if c["ci_high"] < target:
            return f"not met (missed by {100 * (target - c['diff']):.1f} points; the whole interval lies below the target)"
        return f"not met by the point estimate (missed by {100 * (target - c['diff']):.1f} points)"

    ses = standard_errors(summary, keys)
    need = summary.get("questions_for_se", {})

    def se_txt(label: str) -> str:
        vals = ses[label]
        ok = all(x <= 0.03 for x in vals.values())
        return (", ".join(f"{name} {100 * x:.2f}" for name, x in vals.items())
                + (" — ≤ 3 for every row" if ok else f" — ≤ 3 not reached for every row (≈ {need.get(label)} "
                                                     f"questions needed at these spreads)"))

    eval_ratio = s["sample_length"] / b["sample_length"]
    lines.append(
        f"- **Benchmark goals** (reported, not asserted): SPINE ≥ TTRL + 3 points — {avg} {ci(st['avg'])}: "
        f"{met(st['avg'], 0.03)}; greedy {ci(st['greedy'])}: {met(st['greedy'], 0.03)}. SPINE ≥ base + 5 — "
        f"{avg} {ci(sb['avg'])}: {met(sb['avg'], 0.05)}; greedy {ci(sb['greedy'])}: {met(sb['greedy'], 0.05)}. "
        f"SPINE's final length ≥ 0.8 × initial — {'met' if length_ratio >= 0.8 else 'not met'} "
        f"({length_ratio:.2f}× in training; evaluation samples {eval_ratio:.2f}× the base's). Standard errors "
        f"(points) at {n} questions: {avg} {se_txt(avg)}; greedy pass@1 {se_txt('greedy_pass@1')}.")

    # growth
    if len(grow) > 1:
        qs = [g["questions"] for g in grow]
        q_txt = " → ".join(str(q) for q in qs) if len(qs) <= 4 else f"{qs[0]} → {qs[1]} → … → {qs[-2]} → {qs[-1]}"
        last = grow[-1]
        lines.append(
            f"- **As the pool grew** ({q_txt} questions, one block at a time in pool order): SPINE − base "
            f"{avg} {arrow([g['spine_base']['avg']['diff'] for g in grow])}, greedy "
            f"{arrow([g['spine_base']['greedy']['diff'] for g in grow])}; SPINE − TTRL {avg} "
            f"{arrow([g['spine_ttrl']['avg']['diff'] for g in grow])}, greedy "
            f"{arrow([g['spine_ttrl']['greedy']['diff'] for g in grow])}. At {last['questions']} questions the "
            f"SPINE − TTRL interval {'excludes' if excludes_zero(last['spine_ttrl']['avg']) else 'includes'} 0 on "
            f"{avg} and {'excludes' if excludes_zero(last['spine_ttrl']['greedy']) else 'includes'} 0 on greedy.")

    blocks_txt = ", ".join(summary["pooled"])
    head = (f"Reading of `{summary['tag']}` ({n} questions from {nb} blocks: {blocks_txt}; seeds "
            f"{', '.join(str(x) for x in s['seeds'])}; written by `python bench/reading.py {summary['tag']}`):")
    return head + "\n\n" + "\n".join(lines) + "\n"


def headline(summary: dict) -> str:
    """Three sentences for the top of the benchmark section: size (and whether every row's standard error
    of greedy pass@1 and avg@k is ≤ 3 points, the benchmark's size goal: "Result" if so, "Result so far" if
    not), the SPINE and TTRL differences (paired-bootstrap intervals) and whether the project's benchmark
    goals are met."""
    keys = _keys(summary)
    k, pb, n = summary["k"], summary["paired_bootstrap"], summary["base"]["questions"]
    st, sb = pb[f"{keys['spine']} - {keys['ttrl']}"], pb[f"{keys['spine']} - base"]
    tb = pb[f"{keys['ttrl']} - base"]
    met_t = st["greedy"]["diff"] >= 0.03 and st["avg"]["diff"] >= 0.03
    met_b = sb["greedy"]["diff"] >= 0.05 and sb["avg"]["diff"] >= 0.05
    ses = standard_errors(summary, keys)
    se_max = max(x for vals in ses.values() for x in vals.values())
    counts = [summary.get("questions_for_se", {}).get(label) for label in ses]  # None: no spread to scale
    need = max((c for c in counts if c is not None), default=n)
    size = ("standard errors ≤ 3 points on every row, the benchmark's size goal" if se_max <= 0.03 else
            f"standard errors up to {100 * se_max:.2f} points, ≈ {need} questions needed for ≤ 3")
    base, _ = quality._load_block(quality.ROOT / summary["pooled"][0])
    model = Path(str(base.get("model"))).name if base.get("model") else "model not recorded"
    return (f"**{'Result' if se_max <= 0.03 else 'Result so far'}** ({n} questions pooled from {len(summary['pooled'])} blocks, `{model}`, "
            f"seeds {', '.join(str(x) for x in summary['methods'][keys['spine']]['seeds'])}; {size}; points, paired-bootstrap "
            f"95 % intervals; details under \"The evaluation set in blocks\" below): TTRL − base greedy pass@1 "
            f"{ci(tb['greedy'])}, avg@{k} {ci(tb['avg'])}; SPINE − base greedy {ci(sb['greedy'])}, avg@{k} "
            f"{ci(sb['avg'])}; SPINE − TTRL greedy {ci(st['greedy'])}, avg@{k} {ci(st['avg'])}. The project's benchmark goals "
            f"(point estimates, both metrics): SPINE ≥ TTRL + 3 points {'met' if met_t else 'not met'}; SPINE ≥ "
            f"base + 5 points {'met' if met_b else 'not met'}.\n")


def splice(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- name -->`` and ``<!-- /name -->`` (each once in ``text``) by ``body``."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"reading: the target file needs one {start} … {end} region")
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body.strip("\n") + "\n" + text[j:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tag", help="the pooled experiment (bench/results/quality/<tag>/summary.json)")
    ap.add_argument("--doc", type=Path, default=QUALITY_DOC, help="the Markdown file whose marked regions are rewritten")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the reading, change nothing")
    args = ap.parse_args()
    path = quality.ROOT / args.tag / "summary.json"
    if not path.exists():
        raise SystemExit(f"reading: no pooled summary {path} (run bench/quality.py --pool first)")
    summary = json.loads(path.read_text())
    if not summary.get("pooled"):
        raise SystemExit(f"reading: {args.tag} is not a pool")
    keys = _keys(summary)
    text = reading(summary, block_stats(summary, keys), growth(summary, keys))
    if args.print_only:
        print(text)
        return
    table = (quality.ROOT / args.tag / "summary.md").read_text().split("\n", 2)[2]
    doc = args.doc.read_text()
    doc = splice(splice(doc, "pooled-table", table), "pooled-reading", text)
    doc = splice(doc, "pooled-headline", headline(summary))
    args.doc.write_text(doc)
    print(f"rewrote the pooled table and reading of {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
