"""Evaluate a model on questions: greedy pass@1, sampled avg@k / maj@k / pass@k, diagnostics.

Each accuracy comes with its standard error over questions. With labels, accuracies are
computed; without, only the label-free diagnostics (majority ratio, distinct answers per
question, completion length, ``\\boxed{}`` format rate) are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .answers import DEFAULT_LABELS, cluster_answers, extract_answer, is_equivalent, majority_vote
from .data import Example
from .evaluate import mean_and_stderr, pass_at_k
from .engine import SamplingParams
from .engine.builtin import builtin_sampler, eos_token_ids  # noqa: F401  (eos_token_ids: public here too)


@dataclass
class EvalResult:
    """Aggregate metrics (``metrics``, flat name -> float) and one record per question."""

    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)


def has_boxed(text: str) -> bool:
    """True when the completion states its answer in ``\\boxed{...}`` (the requested format)."""
    return "\\boxed" in text


def _add(metrics: dict, name: str, values: Sequence[float], with_se: bool = True) -> None:
    if not values:
        return
    mean, se = mean_and_stderr(list(values))
    metrics[name] = mean
    if with_se:
        metrics[name + "_se"] = se


def evaluate_prompts(
    sampler,
    examples: Sequence[Example],
    prompt_ids: Sequence[Sequence[int]],
    task: str,
    params: SamplingParams,
    *,
    greedy: bool = True,
    seed: int = 0,
    progress=None,
) -> EvalResult:
    """Score the model behind ``sampler`` (a :class:`~spine_ttrl.engine.Sampler`) on encoded prompts.

    ``params``: the sampled evaluation's settings (``num_samples`` = k, 0 = greedy only,
    temperature, top-p, ``max_new_tokens``, ``batch_size``); the greedy pass uses the same
    length budget at temperature 0. Metrics (``eval/`` prefix added by the caller):

    - ``greedy_pass@1``: share of questions whose greedy (temperature 0) answer is correct.
    - ``avg@k``: mean over questions of the share of k sampled answers that are correct.
    - ``maj@k``: share of questions whose majority answer over k samples is correct.
    - ``pass@k``: unbiased pass@k with n = k samples (= any of the k correct).
    - ``greedy_length`` / ``sample_length``: mean completion length in tokens.
    - ``greedy_boxed_rate`` / ``sample_boxed_rate``: share of completions using ``\\boxed{}``.
    - ``greedy_parsed_rate``: share of greedy completions with an extractable answer.
    - ``majority_ratio``: mean share of the k votes held by the majority answer (label-free).
    - ``distinct_answers``: mean number of distinct answer clusters among the k samples.
    - ``source/<s>/...``: greedy pass@1, avg@k and maj@k per data source, when the examples come
      from two or more (:func:`source_metrics`); each record then carries its ``source``.

    Sampling uses its own generator seeded with ``seed``, so two evaluations with the same
    seed (before and after adaptation) draw the same random stream: a paired comparison.
    """
    metrics: dict[str, float] = {"questions": float(len(examples))}
    records = [{"id": ex.id, "label": ex.answer, **({"source": ex.source} if ex.source else {})} for ex in examples]
    label_sets = [ex.labels or DEFAULT_LABELS for ex in examples]  # task "label": what each answer may be
    prompts = [p if isinstance(p, list) else list(p) for p in prompt_ids]  # a list subclass keeps its images
    if greedy and examples:
        roll = sampler.generate(prompts, replace(params, num_samples=1, temperature=0.0, top_p=1.0,
                                                 return_entropy=False), progress=progress)
        _greedy_metrics(roll, records, metrics, task, label_sets)
    if params.num_samples > 0 and examples:
        gen = torch.Generator(device=getattr(sampler, "device", "cpu")).manual_seed(seed)
        roll = sampler.generate(prompts, replace(params, return_entropy=False), generator=gen, progress=progress)
        _sampled_metrics(roll, records, metrics, task, params.num_samples, label_sets)
    metrics.update(source_metrics(records, params.num_samples))
    return EvalResult(metrics=metrics, records=records)


def source_metrics(records: Sequence[dict], k: int) -> dict[str, float]:
    """Accuracy per data source, when the questions come from two or more (a ``source`` column).

    For each source s with questions Q_s (records whose ``source`` is s; "/" in s becomes "-"):
    ``source/<s>/questions`` = |Q_s|, and over the labelled questions of Q_s, with their standard
    errors (``_se``): ``source/<s>/greedy_pass@1`` = mean of ``greedy_correct``,
    ``source/<s>/avg@k`` = mean of ``samples_correct`` / k, ``source/<s>/maj@k`` = mean of
    ``maj_correct``. A metric is left out where no record of s has its field. One source or none:
    {} (the overall metrics already are that source's).

    Args:
        records: :func:`evaluate_prompts` records (one per question).
        k: samples per question of the sampled evaluation (0 = greedy only).
    """
    sources = sorted({r["source"] for r in records if r.get("source")})
    if len(sources) < 2:
        return {}
    out: dict[str, float] = {}
    for s in sources:
        group = [r for r in records if r.get("source") == s]
        name = f"source/{s.replace('/', '-')}/"
        out[name + "questions"] = float(len(group))
        _add(out, name + "greedy_pass@1", [float(r["greedy_correct"]) for r in group if "greedy_correct" in r])
        if k > 0:
            _add(out, name + f"avg@{k}", [r["samples_correct"] / k for r in group if "samples_correct" in r])
            _add(out, name + f"maj@{k}", [float(r["maj_correct"]) for r in group if "maj_correct" in r])
    return out


def _greedy_metrics(roll, records: list[dict], metrics: dict, task: str, label_sets: list) -> None:
    lengths = roll.completion_mask.sum(dim=1).tolist()
    answers = [extract_answer(t, task, labels) for t, labels in zip(roll.texts, label_sets)]
    for rec, text, ans, n in zip(records, roll.texts, answers, lengths):
        rec.update(greedy_answer=ans, greedy_length=n, greedy_text=text)
        if rec["label"] is not None:
            rec["greedy_correct"] = bool(ans is not None and is_equivalent(ans, rec["label"], task))
    _add(metrics, "greedy_length", lengths, with_se=False)
    _add(metrics, "greedy_boxed_rate", [float(has_boxed(t)) for t in roll.texts], with_se=False)
    _add(metrics, "greedy_parsed_rate", [float(a is not None) for a in answers], with_se=False)
    _add(metrics, "greedy_truncated_rate", roll.truncated.float().tolist(), with_se=False)
    if any(r["label"] is not None for r in records):
        _add(metrics, "greedy_pass@1", [float(r["greedy_correct"]) for r in records if "greedy_correct" in r])


def _sampled_metrics(roll, records: list[dict], metrics: dict, task: str, k: int, label_sets: list) -> None:
    lengths = roll.completion_mask.sum(dim=1).tolist()
    answers = [extract_answer(t, task, label_sets[i // k]) for i, t in enumerate(roll.texts)]
    ratios, distinct, avg, maj, passk = [], [], [], [], []
    for q, rec in enumerate(records):
        ans_q = answers[q * k:(q + 1) * k]
        vote = majority_vote(ans_q, task)
        ratios.append(vote.ratio)
        distinct.append(float(len({c for c in cluster_answers(ans_q, task) if c is not None})))
        rec.update(sample_answers=ans_q, majority=vote.label, majority_ratio=vote.ratio)
        if rec["label"] is not None:
            correct = [a is not None and is_equivalent(a, rec["label"], task) for a in ans_q]
            c = sum(correct)
            rec.update(samples_correct=c,
                       maj_correct=bool(vote.label is not None and is_equivalent(vote.label, rec["label"], task)))
            avg.append(c / k)
            maj.append(float(rec["maj_correct"]))
            passk.append(pass_at_k(k, c, k))
    _add(metrics, "sample_length", lengths, with_se=False)
    _add(metrics, "sample_boxed_rate", [float(has_boxed(t)) for t in roll.texts], with_se=False)
    _add(metrics, "sample_truncated_rate", roll.truncated.float().tolist(), with_se=False)
    _add(metrics, "majority_ratio", ratios)
    _add(metrics, "distinct_answers", distinct)
    if avg:
        _add(metrics, f"avg@{k}", avg)
        _add(metrics, f"maj@{k}", maj)
        _add(metrics, f"pass@{k}", passk)


def evaluate_model(
    model=None,
    data="arith:2:24:0",
    *,
    tokenizer=None,
    task: str = "auto",
    max_new_tokens: int = 160,
    num_samples: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    greedy: bool = True,
    seed: int = 2,
    max_prompt_tokens: int | None = 1024,
    long_prompts: str = "skip",
    precision: str = "auto",
    batch_size: int = 64,
) -> EvalResult:
    """Evaluate a model on questions — the Python twin of ``spine-ttrl eval``.

    ``model``: None (the embedded default), an HF id, a directory (e.g. ``RUN/final``), a
    ``.gguf`` file, or an already-loaded model (then pass its ``tokenizer``). ``data``: a
    data spec for :func:`spine_ttrl.data.load_examples` or a list of ``Example``.
    Returns an :class:`EvalResult` with the metrics of :func:`evaluate_prompts`.

    Example::

        from spine_ttrl import evaluate_model
        res = evaluate_model(None, "arith:1:20", num_samples=4)
        print(res.metrics["greedy_pass@1"], res.metrics["greedy_pass@1_se"])
    """
    from .data import load_examples, resolve_task
    from .engine.models import load_model_and_tokenizer
    from .engine.precision import autocast_dtype_for, device_of as sampler_device
    from .prompting import encode_examples

    examples = load_examples(data) if isinstance(data, str) else list(data)
    task = resolve_task(examples, task)
    if model is None or isinstance(model, str):
        model, tokenizer = load_model_and_tokenizer(model)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with an already-loaded model")
    examples, prompt_ids, _ = encode_examples(tokenizer, examples, task, max_prompt_tokens=max_prompt_tokens,
                                              long_prompts=long_prompts)
    model.eval()
    sampler = builtin_sampler(model, tokenizer, autocast_dtype_for(precision, sampler_device(model)))
    params = SamplingParams(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, batch_size=batch_size)
    return evaluate_prompts(sampler, examples, prompt_ids, task, params, greedy=greedy, seed=seed)
