"""``spine-ttrl adapt --engine trl``: the built-in engine's configuration and run directory, trained
by SpineGRPOTrainer; one process in-process, resume from TRL's checkpoint, two processes with
torchrun (gloo), and the one-line refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from spine_ttrl import cli  # noqa: E402
from spine_ttrl.config import make_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_trl_engine import tiny_model, tiny_tokenizer  # noqa: E402

OUR_METRICS = ("reward/mean", "vote/majority_ratio", "completion/length_mean", "completion/truncated_fraction",
               "loss/policy", "loss/band", "loss/kl", "optim/grad_norm", "optim/lr", "tokens/selected_fraction",
               "entropy/forking_mean", "time/step_s", "vote/label_accuracy", "vote/sample_accuracy", "reward/accuracy")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer and a chat template, saved like a hub model,
    and four questions with labels."""
    root = tmp_path_factory.mktemp("trl-cli")
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the answer is {% endif %}")
    model = tiny_model()
    model.generation_config.eos_token_id = 2
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "q.jsonl", "w") as fh:
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]:
            fh.write(json.dumps({"prompt": f"what is {a} plus {b}", "answer": str(a + b)}) + "\n")
    return root / "model", root / "q.jsonl"


def _flags(model, data, out, *extra):
    return ["adapt", "--engine", "trl", "--model", str(model), "--data", str(data), "--out", str(out),
            "--questions-per-step", "2", "--num-votes", "4", "--num-train-samples", "4", "--micro-batch-size", "4",
            "--max-new-tokens", "8", "--eval-samples", "2", "--threads", "1", "--no-progress", "--lr", "1e-3", *extra]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_adapt_engine_trl_writes_the_run_directory(model_and_data, tmp_path):
    model, data = model_and_data
    out = tmp_path / "run"
    assert cli.main(_flags(model, data, out, "--preset", "spine", "--steps", "2", "--eval-every", "1")) == 0
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["data/epoch"] == 1.0  # 2 questions per step: 2 steps = one pass over the 4 questions
    for name in OUR_METRICS:
        assert name in metrics[0], name
    assert 0.1 < metrics[0]["tokens/selected_fraction"] < 0.4  # top 20 % of the batch's tokens
    if sys.platform == "linux":
        assert all(0 < m["memory/peak_rss_gb"] < 24 for m in metrics)
    evals = _jsonl(out / "eval.jsonl")
    assert [(e["tag"], e["step"]) for e in evals] == [("before", 0), ("step1", 1), ("after", 2)]
    assert len(_jsonl(out / "eval_records.jsonl")) == 3
    assert (out / "report.md").exists() and list((out / "plots").glob("*.png"))
    assert make_config(config_file=out / "config.toml").run.engine == "trl"
    from transformers import AutoModelForCausalLM

    adapted = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(model)
    assert any(not torch.equal(a, b) for a, b in zip(adapted.parameters(), start.parameters()))


def test_resume_continues_from_trl_checkpoint(model_and_data, tmp_path):
    model, data = model_and_data
    out = tmp_path / "run"
    assert cli.main(_flags(model, data, out, "--preset", "ttrl", "--steps", "1", "--save-every", "1")) == 0
    assert (out / "trl" / "checkpoint-1").is_dir()
    first = _jsonl(out / "metrics.jsonl")
    assert cli.main(["adapt", "--resume", str(out), "--steps", "2", "--no-progress"]) == 0
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0] == first[0]  # step 1 is not trained again
    assert [(e["tag"], e["step"]) for e in _jsonl(out / "eval.jsonl")] == [("before", 0), ("after", 2)]


@pytest.mark.parametrize("flags, message", [
    (["--questions-per-step", "3", "--micro-batch-size", "8"], "multiple of micro_batch_size"),
    (["--long-prompts", "truncate"], "long_prompts=truncate"),
    (["--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
    (["--sampler", "vllm"], "spine-ttrl[vllm]"),
    (["--reward", "novelty"], "--engine trl supports reward=majority|frequency|ttrv|leave-one-out"),
    (["--preset", "ettrl"], "(got advantage_shaping=ear, rollout=tree)"),
    (["--preset", "siren"], "(got entropy_reg=anchored)"),
    (["--preset", "spine", "--band-rows", "contested"], "(got band_rows=contested)"),
    (["--skip-empty-steps"], "skip_empty_steps is a built-in engine setting"),
    (["--advantage-norm", "batch", "--token-weights", "steer", "--selection-signal", "window"],
     "(got advantage_norm=batch, token_weights=steer, selection_signal=window)"),
])
def test_refusals_are_one_line(model_and_data, tmp_path, capsys, flags, message):
    model, data = model_and_data
    assert cli.main(_flags(model, data, tmp_path / "run", "--steps", "1", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_without_trl_the_engine_is_refused_in_one_line(model_and_data, tmp_path):
    model, data = model_and_data
    code = ("import sys; sys.modules['trl'] = None\nfrom spine_ttrl import cli\n"
            f"sys.exit(cli.main({_flags(model, data, tmp_path / 'run', '--steps', '1')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'spine-ttrl[trl]'" in proc.stderr.strip().splitlines()[-1]


def test_trl_args_map_the_configuration():
    from spine_ttrl.integrations.trl_adapt import trl_args

    cfg = make_config("spine-v2", overrides={
        "sampling": {"num_votes": 8, "num_train_samples": 4, "max_new_tokens": 32, "temperature": 0.8, "top_p": 0.9},
        "optim": {"steps": 5, "questions_per_step": 4, "micro_batch_size": 2, "updates_per_batch": 2, "lr": 3e-5,
                  "clip_eps": 0.25, "schedule": "cosine", "warmup_steps": 1},
        "spine": {"kl_coef": 0.05, "beta_up": 0.3}, "run": {"seed": 11, "save_every": 2}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument names of transformers/TRL
        a = trl_args(cfg, "/tmp/x", bf16=False, use_cpu=True, task="math")
    assert a.gradient_checkpointing is False  # the rollouts and their scoring run without recomputation
    two = trl_args(cfg, "/tmp/x", bf16=False, use_cpu=True, task="math", num_processes=2)
    assert two.gradient_accumulation_steps == two.steps_per_generation == 4  # the batch is split, not doubled
    assert (a.num_generations, a.num_votes, a.per_device_train_batch_size) == (4, 8, 2)
    assert a.gradient_accumulation_steps == a.steps_per_generation == 8  # 4 questions x 4 samples / 2 rows
    assert (a.num_iterations, a.max_steps, a.warmup_steps, a.save_steps) == (2, 10, 2, 4)
    assert (a.selection, a.band, a.kl_coef, a.beta_up, a.beta) == ("otsu", "mad", 0.05, 0.3, 0.0)
    assert (a.learning_rate, a.epsilon, a.temperature, a.top_p, a.max_completion_length) == (3e-5, 0.25, 0.8, 0.9, 32)
    assert (a.lr_scheduler_type, a.seed, a.loss_type) == ("cosine", 11, "dapo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(model_and_data, tmp_path):
    """``torchrun --nproc_per_node 2 -m spine_ttrl adapt --engine trl``: both processes train, rank 0
    writes one run directory."""
    model, data = model_and_data
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "spine_ttrl",
           *_flags(model, data, out, "--preset", "spine", "--steps", "2", "--micro-batch-size", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes=2" in proc.stdout + proc.stderr
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["data/epoch"] == 1.0  # the 2 processes share one step's 2 questions, not 2 each
    assert [e["tag"] for e in _jsonl(out / "eval.jsonl")] == ["before", "after"]
    assert (out / "final" / "config.json").exists() and (out / "report.md").exists()


def test_labels_column_is_refused(model_and_data, tmp_path, capsys):
    model, _ = model_and_data
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {i} even", "answer": "yes" if i % 2 == 0 else "no",
                                        "labels": ["yes", "no"]}) + "\n" for i in range(4)))
    assert cli.main(_flags(model, data, tmp_path / "run", "--steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels column" in err[0], err
    assert not (tmp_path / "run").exists()
