"""Kill -9 a run mid-step, resume it, and get exactly the uninterrupted run's samples and metrics."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ARGS = ["--data", "arith:1:4:3", "--preset", "spine", "--steps", "3", "--questions-per-step", "2",
        "--num-votes", "4", "--num-train-samples", "2", "--max-new-tokens", "12", "--micro-batch-size", "2",
        "--eval-samples", "0", "--eval-limit", "1", "--eval-max-new-tokens", "4", "--skip-eval-before",
        "--lr", "1e-4", "--threads", "1", "--seed", "7", "--no-progress", "--save-every", "1",
        "--band-anchor", "first"]  # the anchored band's edges are state: a resume must restore them


def _cli(*argv):
    return [sys.executable, "-m", "spine_ttrl", "adapt", *argv]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens/per_second", "memory/"))} for m in metrics]


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.run(_cli(*ARGS, "--out", str(full)), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(_cli(*ARGS, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait until step 2's checkpoint exists and step 3 has started, then kill -9 mid-step.
    deadline = time.time() + 600
    while time.time() < deadline and not (killed / "checkpoints" / "step-000002" / "state.pt").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (killed / "final").exists()

    res = subprocess.run(_cli("--resume", str(killed)), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed" in res.stdout + res.stderr

    # Same sampled token ids at every step...
    a, b = _records(full / "samples.jsonl"), _records(killed / "samples.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [r["completion_ids_sha256"] for r in a] == [r["completion_ids_sha256"] for r in b]
    # ...and the same metrics, within 1e-6.
    ma, mb = _comparable(_records(full / "metrics.jsonl")), _comparable(_records(killed / "metrics.jsonl"))
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and math.isnan(x[k]):
                assert math.isnan(y[k]), k
            else:
                assert y[k] == pytest.approx(x[k], abs=1e-6), (k, x[k], y[k])
    # the band stayed where step 1 put it (and the resumed run restored it, compared above)
    assert len({(m["band/anchor_low"], m["band/anchor_high"]) for m in ma}) == 1
    assert (killed / "final" / "config.json").exists()
    # keep_checkpoints = 2: only the newest two remain
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
