"""The command line: bad input gives one line and exit status 2; a real run through a subprocess."""

import json
import subprocess
import sys

import pytest

from spine_ttrl.cli import main


def _run_main(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


BAD_FILES = {
    "malformed.json": (b'[{"prompt": "a"},\n {"prompt": }]', "malformed.json"),
    "missing.jsonl": (b'{"prompt": "ok"}\n{"question_text": "x"}\n', "missing.jsonl:2"),
    "empty.jsonl": (b"", "empty.jsonl"),
    "types.jsonl": (b'{"prompt": 5}\n', "types.jsonl:1"),
    "bytes.jsonl": (b'{"prompt": "\xff\xfe"}\n', "bytes.jsonl"),
    "wrong.txt": (b"hello", "wrong.txt"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_one_line_error(tmp_path, capsys, name):
    content, fragment = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    code, err = _run_main(capsys, ["adapt", "--data", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not (tmp_path / "o").exists(), "nothing is written before the data is valid"


@pytest.mark.parametrize("argv, fragment", [
    (["--data", "/nonexistent/q.jsonl"], "q.jsonl"),
    (["--data", "arith:99"], "level"),
    (["--num-votes", "2", "--num-train-samples", "4"], "num_train_samples"),
    (["--rho", "2"], "rho"),
])
def test_bad_settings_one_line_error(tmp_path, capsys, argv, fragment):
    code, err = _run_main(capsys, ["adapt", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and err.startswith("error: ") and "\n" not in err and fragment in err, err


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlr = 'x'\n")
    code, err = _run_main(capsys, ["adapt", "--config", str(cfg)])
    assert code == 2 and "optim.lr" in err and "\n" not in err


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{")
    proc = subprocess.run([sys.executable, "-m", "spine_ttrl", "adapt", "--data", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_documents_flags():
    proc = subprocess.run([sys.executable, "-m", "spine_ttrl", "adapt", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ["--model", "--data", "--task", "--preset", "--steps", "--num-votes", "--num-train-samples",
                 "--max-new-tokens", "--temperature", "--lr", "--seed", "--out", "--resume", "--config"]:
        assert flag in proc.stdout


@pytest.mark.slow
def test_cli_smoke_real_run(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {a} + {b}?", "answer": a + b})
                              for a, b in [(2, 3), (10, 7)]) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "spine_ttrl", "adapt", "--data", str(data), "--preset", "spine", "--steps", "1",
         "--questions-per-step", "2", "--num-votes", "4", "--num-train-samples", "2", "--max-new-tokens", "16",
         "--eval-samples", "0", "--out", str(out), "--no-progress", "--threads", "2"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: spine, 1 steps" in proc.stdout + proc.stderr
    assert (out / "metrics.jsonl").exists() and (out / "eval.jsonl").exists()
    assert (out / "final" / "model.safetensors").exists()
    if sys.platform == "linux":  # the step's peak resident memory: at least the 135M model's fp32 weights
        (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert 0.5 < step["memory/peak_rss_gb"] < 24


def test_eval_breaks_down_by_source(tmp_path):
    """A file mixing two sets: eval.jsonl has metrics per source, each record its source, report.md the rows."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_text import save_tiny_model, write_jsonl

    model = save_tiny_model(tmp_path / "model")
    rows = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b), "source": s}
            for (a, b), s in zip([(1, 2), (3, 4), (5, 1), (2, 2), (1, 1)], ["gsm8k", "gsm8k", "gsm8k", "svamp", "svamp"])]
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--data", str(write_jsonl(tmp_path / "mixed.jsonl", rows)),
                 "--eval-samples", "2", "--eval-max-new-tokens", "4", "--no-progress", "--threads", "1",
                 "--out", str(out)]) == 0
    (ev,) = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    (rec,) = [json.loads(line) for line in (out / "eval_records.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rec["records"]] == [r["source"] for r in rows]
    assert ev["eval/source/gsm8k/questions"] == 3 and ev["eval/source/svamp/questions"] == 2
    for s in ("gsm8k", "svamp"):  # each equals the mean over that source's records
        mine = [r for r in rec["records"] if r["source"] == s]
        assert ev[f"eval/source/{s}/greedy_pass@1"] == pytest.approx(sum(r["greedy_correct"] for r in mine) / len(mine))
        assert ev[f"eval/source/{s}/avg@2"] == pytest.approx(sum(r["samples_correct"] for r in mine) / 2 / len(mine))
    assert "source/svamp/greedy_pass@1" in (out / "report.md").read_text()
