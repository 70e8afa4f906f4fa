"""Reading a run's logs, the collapse monitor, plots and the markdown report.

A run directory ``RUN`` holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one
object per optimiser step, names in ``docs/metrics.md``), ``eval.jsonl`` (one object per
evaluation, tagged ``before`` / ``stepN`` / ``after``) and ``final/`` (the adapted model).
From these :func:`write_report` builds ``RUN/report.md`` and :func:`make_plots` the PNG files
in ``RUN/plots/``. Everything here reads files and returns values; nothing touches a model.

The collapse monitor (:func:`collapse_warnings`) watches for the failure of plain TTRL: the
majority vote saturates (every sample agrees, so the reward is 1 everywhere), the completions
shorten and the token entropy collapses, while the true pass@1 falls.

matplotlib is imported inside :func:`make_plots` only, so ``import spine_ttrl.report`` stays light.
Figures are drawn on the Agg canvas directly (``matplotlib.figure.Figure``), never through
``pyplot``: no global backend switch, no figure registry that could leak figures.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import load_toml

# ------------------------------------------------------------------ reading logs


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a missing file gives [].

    ``NaN`` / ``Infinity`` literals (as ``json.dumps`` writes them) are read as floats. Blank
    lines are skipped. The last line may be cut short by a killed run: it is ignored. A bad line
    anywhere else is corruption and raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # a write interrupted by a kill: drop it
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON line: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records, NaN/inf/missing values dropped.

    The step is the record's ``step`` field, or its 1-based position when that is missing.
    """
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if _finite(v):
            step = r.get("step")
            xs.append(float(step) if _finite(step) else float(i + 1))
            ys.append(float(v))
    return xs, ys


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ------------------------------------------------------------------ collapse monitor


def collapse_warnings(metrics: Sequence[dict], *, length_fraction: float = 0.5, ratio_saturation: float = 0.95,
                      entropy_fraction: float = 0.5, window: int = 3) -> list[str]:
    """Signs of the collapse of plain TTRL in the per-step metrics so far, as one-line warnings.

    Each warning reads ``"<kind>: step N: <numbers>"``; the kind (text before the first colon)
    is one of

    - ``length collapse``: mean of ``completion/length_mean`` over the last ``window`` steps
      < ``length_fraction`` × its initial value (mean over the first ``window`` steps);
    - ``vote saturation``: mean of ``vote/majority_ratio`` over the last ``window`` steps
      >= ``ratio_saturation`` *and* mean of ``entropy/all_mean`` over the last ``window`` steps
      < ``entropy_fraction`` × its initial value. A saturated vote alone is not a warning: an
      easy question set is unanimous from the start;
    - ``fork entropy collapse``: mean of ``entropy/top20_mean`` (the entropy of the batch's 20 %
      highest-entropy tokens, the forks) over the last ``window`` steps < ``entropy_fraction`` ×
      its initial value, whatever the vote: what SPINE's band is meant to prevent.

    NaN and missing values are ignored (the windows are over the steps that have a value).
    With fewer than ``2 * window`` values the windows shrink to ``n // 2`` each, so the initial
    and the last window never overlap. Fewer than 2 steps gives []. At most one warning per kind,
    for the latest step: the loop calls this after every step and logs kinds it has not logged yet.
    """
    if len(metrics) < 2:
        return []
    last = metrics[-1].get("step")
    step = int(last) if _finite(last) else len(metrics)

    def initial_and_last(key: str) -> tuple[float, float, int] | None:
        values = _series(metrics, key)[1]
        w = min(window, len(values) // 2)
        if w < 1:
            return None
        return _mean(values[:w]), _mean(values[-w:]), w

    def fell(key: str, fraction: float) -> tuple[float, float, int] | None:
        """(initial, last, window) when ``key``'s last-window mean is below ``fraction`` x its initial one."""
        got = initial_and_last(key)
        return got if got is not None and got[0] > 0 and got[1] < fraction * got[0] else None

    out = []
    if (lengths := fell("completion/length_mean", length_fraction)) is not None:
        first, now, w = lengths
        out.append(f"length collapse: step {step}: mean completion length {now:.1f} tokens (last {w} steps) "
                   f"is below {length_fraction:g} x its initial {first:.1f} (first {w} steps)")

    ratios = _series(metrics, "vote/majority_ratio")[1]
    entropy = fell("entropy/all_mean", entropy_fraction)
    ratio = _mean(ratios[-window:]) if ratios else math.nan
    if entropy is not None and ratio >= ratio_saturation:
        first, now, w = entropy
        out.append(f"vote saturation: step {step}: majority ratio {ratio:.3f} >= {ratio_saturation:g} "
                   f"(last {min(window, len(ratios))} steps) while token entropy {now:.3f} nats fell below "
                   f"{entropy_fraction:g} x its initial {first:.3f} (means over the first / last {w} steps)")

    if (forks := fell("entropy/top20_mean", entropy_fraction)) is not None:
        first, now, w = forks
        out.append(f"fork entropy collapse: step {step}: entropy of the top-20 % tokens {now:.3f} nats (last {w} "
                   f"steps) is below {entropy_fraction:g} x its initial {first:.3f} (first {w} steps)")
    return out


# ------------------------------------------------------------------ plots

_FIGSIZE, _DPI = (6.0, 3.5), 100
_ACCURACY = re.compile(r"^eval/(greedy_pass@1|avg@\d+|maj@\d+|pass@\d+)$")
_EVAL_PLOTTED = re.compile(r"^eval/(greedy_pass@1|avg@\d+|maj@\d+)$")  # pass@k: in the table only


def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    fig.clear()
    return path


def _line_plot(records: Sequence[dict], lines: Sequence[tuple[str, str]], path: Path, title: str, ylabel: str,
               unit_interval: bool = False) -> Path | None:
    """One line per (metric key, label) that has data; None (no file) when none has."""
    data = [(label, *_series(records, key)) for key, label in lines]
    data = [d for d in data if d[1]]
    if not data:
        return None
    fig, ax = _new_figure(title, "step", ylabel)
    for label, xs, ys in data:
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if unit_interval:
        ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _length_plot(metrics: Sequence[dict], path: Path) -> Path | None:
    xs, ys = _series(metrics, "completion/length_mean")
    txs, tys = _series(metrics, "completion/truncated_fraction")
    if not xs and not txs:
        return None
    fig, ax = _new_figure("Completion length", "step", "mean length (tokens)")
    handles = []
    if xs:
        handles += ax.plot(xs, ys, marker="o", markersize=3, color="C0", label="completion/length_mean")
    if txs:
        twin = ax.twinx()
        handles += twin.plot(txs, tys, marker="s", markersize=3, linestyle="--", color="C3",
                             label="completion/truncated_fraction")
        twin.set_ylabel("truncated fraction")
        twin.set_ylim(-0.03, 1.03)
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8)
    return _save(fig, path)


def _eval_by_tag(evals: Sequence[dict]) -> list[dict]:
    """One record per tag (the last written, as a resumed run may repeat one), ordered by step."""
    latest: dict[str, dict] = {}
    for r in evals:
        latest[str(r.get("tag", len(latest)))] = r
    return sorted(latest.values(), key=lambda r: r.get("step", 0) if _finite(r.get("step")) else 0)


def _eval_plot(evals: Sequence[dict], path: Path) -> Path | None:
    records = _eval_by_tag(evals)
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if _EVAL_PLOTTED.match(k)]
    ylabel = "accuracy (± s.e.)"
    if not keys:  # no labels: the label-free agreement instead
        keys, ylabel = ["eval/majority_ratio"], "majority ratio (± s.e.)"
    drawn = []
    for key in keys:
        pts = [(r.get("step", 0), r[key], r.get(key + "_se")) for r in records if _finite(r.get(key))]
        if pts:
            drawn.append((key, pts))
    if not drawn:
        return None
    fig, ax = _new_figure("Evaluation", "step", ylabel)
    for key, pts in drawn:
        xs = [float(p[0]) if _finite(p[0]) else 0.0 for p in pts]
        ys = [p[1] for p in pts]
        err = [p[2] if _finite(p[2]) else 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=3, label=key[5:])
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    return _save(fig, path)


def make_plots(run_dir: str | Path) -> list[Path]:
    """Draw the run's PNG plots into ``RUN/plots/``; return the files written.

    ``reward.png`` (pseudo-reward, majority ratio, label accuracy), ``eval.png`` (greedy pass@1,
    avg@k and maj@k vs step with standard-error bars; the majority ratio when there are no
    labels), ``length.png`` (mean completion length, truncated fraction on a twin axis),
    ``entropy.png`` (entropy at forking vs other tokens), ``selection.png`` (selected fraction,
    share of forks below / above the band). A missing metric drops its line; a plot with no data
    at all is not drawn.
    """
    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not metrics and not evals:
        return []
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [
        _line_plot(metrics, [("reward/mean", "reward/mean"), ("vote/majority_ratio", "vote/majority_ratio"),
                             ("vote/label_accuracy", "vote/label_accuracy")],
                   out_dir / "reward.png", "Pseudo-reward and vote", "fraction", unit_interval=True),
        _eval_plot(evals, out_dir / "eval.png"),
        _length_plot(metrics, out_dir / "length.png"),
        _line_plot(metrics, [("entropy/forking_mean", "forking tokens"), ("entropy/other_mean", "other tokens"),
                             ("entropy/top20_mean", "top-20 % tokens")],
                   out_dir / "entropy.png", "Token entropy (behaviour policy)", "mean entropy (nats)"),
        _line_plot(metrics, [("tokens/selected_fraction", "tokens/selected_fraction"),
                             ("band/below_fraction", "band/below_fraction"),
                             ("band/above_fraction", "band/above_fraction")],
                   out_dir / "selection.png", "Forking-token selection and band", "fraction", unit_interval=True),
    ]
    return [p for p in made if p is not None]


# ------------------------------------------------------------------ markdown report

_BUDGET = [("optim", "steps"), ("optim", "questions_per_step"), ("sampling", "num_votes"),
           ("sampling", "num_train_samples"), ("sampling", "max_new_tokens"), ("sampling", "temperature"),
           ("optim", "lr"), ("optim", "updates_per_batch"), ("model", "precision")]
_METHOD = [("spine", "selection"), ("spine", "rho"), ("spine", "scope"), ("spine", "band"), ("spine", "kl_coef")]
_TRAINING_KEYS = ["reward/mean", "vote/majority_ratio", "vote/label_accuracy", "reward/accuracy",
                  "completion/length_mean", "completion/truncated_fraction", "entropy/all_mean",
                  "entropy/forking_mean", "entropy/top20_mean", "tokens/selected_fraction", "loss/policy", "loss/band", "loss/kl",
                  "optim/grad_norm", "tokens/per_second"]
_EMBEDDED_MODEL = "embedded SmolLM2-135M-Instruct"


def _fmt3(value: Any) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _with_se(record: dict, key: str) -> str:
    se = record.get(key + "_se")
    return _fmt3(record.get(key)) + (f" ± {se:.3f}" if _finite(se) else "")


def _eval_rows(keys: Sequence[str]) -> list[str]:
    """Metric names (without ``eval/``), accuracies first, then the rest in logged order."""
    names = [k for k in keys if k.startswith("eval/") and not k.endswith("_se")]
    return [k for k in names if _ACCURACY.match(k)] + [k for k in names if not _ACCURACY.match(k)]


def _config_section(cfg: dict) -> list[str]:
    def get(section: str, name: str, default: Any = None) -> Any:
        sec = cfg.get(section)
        return sec.get(name, default) if isinstance(sec, dict) else default

    model = get("model", "model") or _EMBEDDED_MODEL
    if get("model", "lora_r", 0):
        model += f" (LoRA r={get('model', 'lora_r')}, alpha={get('model', 'lora_alpha')})"
    lines = ["## What was run", ""]
    if not cfg:
        return lines + ["config.toml is missing or unreadable.", ""]
    lines.append(f"- model: `{model}`")
    data = get("data", "data")
    if data is not None:
        limit = get("data", "limit", 0)
        lines.append(f"- data: `{data}`" + (f" (first {limit} questions)" if limit else ""))
    if get("data", "task") is not None:
        lines.append(f"- task: {get('data', 'task')}")
    lines.append(f"- preset: {cfg.get('preset', 'n/a')}")
    method = [f"{n}={get(s, n)}" for s, n in _METHOD if get(s, n) is not None]
    if method and cfg.get("preset") != "none":
        lines.append("- method: " + ", ".join(method))
    budget = [f"{n}={get(s, n)}" for s, n in _BUDGET if get(s, n) is not None]
    if budget:
        lines.append("- budget: " + ", ".join(budget))
    return lines + [""]


def _eval_section(evals: Sequence[dict]) -> list[str]:
    lines = ["## Before / after", ""]
    before = [r for r in evals if r.get("tag") == "before"]
    after = [r for r in evals if r.get("tag") == "after"]
    b, a = (before[-1] if before else None), (after[-1] if after else None)
    if b is None and a is None:
        if evals:  # only intermediate evaluations (an interrupted run): show the latest
            b = evals[-1]
        else:
            return lines + ["No evaluation was recorded (no eval.jsonl).", ""]
    if b is not None and a is not None:
        rows = [k for k in _eval_rows(list(b)) if k in a]
        lines += [f"Evaluation before (step {b.get('step', 0)}) and after (step {a.get('step', '?')}) adaptation; "
                  "± is the standard error over questions.", "",
                  "| metric | before | after | after − before |", "|---|---|---|---|"]
        for k in rows:
            diff = a[k] - b[k] if _finite(a.get(k)) and _finite(b.get(k)) else float("nan")
            lines.append(f"| {k[5:]} | {_with_se(b, k)} | {_with_se(a, k)} | "
                         + (f"{diff:+.3f}" if _finite(diff) else "n/a") + " |")
    else:
        single = b if b is not None else a
        lines += [f"A single evaluation (`{single.get('tag', '?')}`, step {single.get('step', 0)}); "
                  "± is the standard error over questions.", "",
                  "| metric | value |", "|---|---|"]
        rows = _eval_rows(list(single))
        lines += [f"| {k[5:]} | {_with_se(single, k)} |" for k in rows]
    lines.append("")
    if any(_ACCURACY.match(k) for k in rows):
        lines.append("Labels are used only for these evaluation accuracies; the training reward is the "
                     "label-free majority vote.")
    else:
        lines.append("No labels: only label-free metrics were evaluated.")
    return lines + [""]


def _training_section(metrics: Sequence[dict]) -> list[str]:
    lines = ["## Training", ""]
    if not metrics:
        return lines + ["No training steps were run (evaluation only).", ""]
    last_step = metrics[-1].get("step", len(metrics))
    times = _series(metrics, "time/step_s")[1]
    tokens = _series(metrics, "completion/sampled_tokens")[1]
    skipped = sum(1 for r in metrics if r.get("optim/skipped_step") == 1)
    lines.append(f"- steps run: {len(metrics)} (last step {last_step})"
                 + (f", {skipped} without an update (nothing parsed)" if skipped else ""))
    if times:
        lines.append(f"- mean step time: {_mean(times):.2f} s")
    if tokens:
        lines.append(f"- total sampled tokens: {int(sum(tokens))}")
    rows = []
    for key in _TRAINING_KEYS:
        first, last = metrics[0].get(key), metrics[-1].get(key)
        if _finite(first) or _finite(last):
            fmt = lambda v: f"{v:.4g}" if _finite(v) else "n/a"  # noqa: E731
            rows.append(f"| {key} | {fmt(first)} | {fmt(last)} |")
    if rows:
        lines += ["", f"| metric | step {metrics[0].get('step', 1)} | step {last_step} |", "|---|---|---|", *rows]
    return lines + [""]


def write_report(run_dir: str | Path, warnings: Sequence[str] | None = None) -> Path:
    """Write ``RUN/report.md`` (atomically) and the plots it embeds; return its path.

    Sections: what was run (model, data, task, preset, budget), the before / after evaluation
    table (value ± standard error, difference after − before, 3 decimals), a training summary,
    the collapse ``warnings`` (computed from ``metrics.jsonl`` when None) and the plots. Works
    for a run without training steps (a single evaluation) and for a run without ``eval.jsonl``.
    """
    run_dir = Path(run_dir)
    try:
        cfg = load_toml(run_dir / "config.toml")
    except ValueError:
        cfg = {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if warnings is None:
        warnings = collapse_warnings(metrics)

    lines = [f"# spine-ttrl run report: {run_dir.resolve().name}", ""]
    lines += _config_section(cfg)
    if (run_dir / "final").exists():
        lines += ["Adapted model: `final/` (loads with `AutoModelForCausalLM.from_pretrained`).", ""]
    lines += _eval_section(evals)
    lines += _training_section(metrics)
    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in warnings] if warnings else ["none"]
    lines += ["", "## Plots", ""]
    plots = make_plots(run_dir)
    for p in plots:
        lines += [f"![{p.stem}](plots/{p.name})", ""]
    if not plots:
        lines += ["No data to plot.", ""]

    path = run_dir / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
