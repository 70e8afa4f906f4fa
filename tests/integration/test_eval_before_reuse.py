"""--before-from: a run reuses another run's evaluation before adaptation instead of computing it."""

import json

from spine_ttrl.cli import main
from spine_ttrl.rundir import before_eval_mismatch

ARGS = ["--data", "arith:1:4:3", "--steps", "1", "--questions-per-step", "2", "--num-votes", "2",
        "--num-train-samples", "2", "--max-new-tokens", "8", "--micro-batch-size", "2", "--eval-samples", "2",
        "--eval-limit", "2", "--eval-max-new-tokens", "6", "--threads", "1", "--seed", "3", "--no-progress"]


def _before(run, name):
    rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "eval/time_s"} for r in rows if r["tag"] == "before"]


def _hashes(run):
    return [json.loads(line)["completion_ids_sha256"] for line in (run / "samples.jsonl").read_text().splitlines()]


def test_a_run_reuses_the_evaluation_it_would_have_made(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["adapt", *ARGS, "--preset", "ttrl", "--out", str(a)]) == 0
    assert main(["adapt", *ARGS, "--preset", "spine", "--out", str(b)]) == 0  # computes its own
    assert main(["adapt", *ARGS, "--preset", "spine", "--before-from", str(a), "--out", str(c)]) == 0
    assert "reused from" in capsys.readouterr().out
    # another preset computes the same evaluation before adaptation: that is what is reused
    assert _before(b, "eval.jsonl") == _before(a, "eval.jsonl")
    assert _before(b, "eval_records.jsonl") == _before(a, "eval_records.jsonl")
    assert _before(c, "eval_records.jsonl") == _before(a, "eval_records.jsonl")
    assert _before(c, "eval.jsonl") == _before(a, "eval.jsonl") and len(_before(c, "eval.jsonl")) == 1
    # and the run itself is unchanged: the same samples as the run that evaluated on its own
    assert _hashes(c) == _hashes(b)
    assert [json.loads(x)["tag"] for x in (c / "eval.jsonl").read_text().splitlines()] == ["before", "after"]


def test_other_settings_or_no_evaluation_are_refused_before_anything_is_written(tmp_path, capsys):
    a = tmp_path / "a"
    assert main(["adapt", *ARGS, "--steps", "0", "--out", str(a)]) == 0
    d = tmp_path / "d"
    assert main(["adapt", *ARGS, "--seed", "4", "--before-from", str(a), "--out", str(d)]) == 2
    assert "run.seed: 3 there, 4 here" in capsys.readouterr().err and not d.exists()
    assert main(["adapt", *ARGS, "--eval-samples", "4", "--before-from", str(a), "--out", str(d)]) == 2
    assert "eval.eval_samples" in capsys.readouterr().err and not d.exists()
    e = tmp_path / "e"
    assert main(["adapt", *ARGS, "--steps", "0", "--skip-eval-before", "--out", str(e)]) == 0
    assert main(["adapt", *ARGS, "--before-from", str(e), "--out", str(d)]) == 2
    assert "no evaluation before adaptation" in capsys.readouterr().err and not d.exists()
    assert main(["adapt", *ARGS, "--before-from", str(tmp_path / "nowhere"), "--out", str(d)]) == 2
    # made on a machine that computes otherwise (precision = auto is bf16 on one CPU, fp32 on another)
    lines = [json.loads(x) for x in (a / "eval.jsonl").read_text().splitlines()]
    assert {r["compute"] for r in lines} <= {"cpu fp32", "cpu bf16"}
    for other in ("cuda bf16", None):
        for r in lines:
            r["compute"] = other
        (a / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        assert main(["adapt", *ARGS, "--before-from", str(a), "--out", str(d)]) == 2
        err = capsys.readouterr().err
        assert f"computed in {other or 'an unrecorded precision'}, this run computes in cpu " in err and not d.exists()
    assert main(["adapt", *ARGS, "--skip-eval-before", "--before-from", str(a), "--out", str(d)]) == 2
    assert "exclude each other" in capsys.readouterr().err and not d.exists()


def test_before_eval_mismatch_names_the_first_setting_that_differs():
    base = {"model": {"model": "m", "lora_r": 16}, "data": {"data": "x"}, "run": {"seed": 0, "threads": 1},
            "eval": {"eval_samples": 8, "eval_every": 8}, "sampling": {"max_new_tokens": 384, "temperature": 0.8},
            "spine": {"selection": "top"}}
    other = json.loads(json.dumps(base))
    other["eval"]["eval_every"], other["sampling"]["temperature"], other["spine"]["selection"] = 4, 1.0, "all"
    assert before_eval_mismatch(base, other) is None  # training-only settings do not matter
    other["model"]["lora_r"] = 0
    assert before_eval_mismatch(base, other) == "model.lora_r: 16 there, 0 here"


def test_a_resume_on_a_machine_that_computes_otherwise_says_so(tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    assert main(["adapt", *ARGS, "--skip-eval-before", "--save-every", "1", "--out", str(run)]) == 0
    here = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["compute"]
    state_file = run / "checkpoints" / "step-000001" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["compute"] == here
    state["compute"] = "cuda bf16"  # as if the first step had run on a GPU
    torch.save(state, state_file)
    capsys.readouterr()
    assert main(["adapt", "--resume", str(run), "--steps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"the run so far computed in cuda bf16, this machine computes in {here}" in out
    state = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert state["compute"] == here  # the newest checkpoint records the machine that made it


def test_a_resume_on_other_hardware_that_computes_the_same_way_notes_it(tmp_path, capsys):
    import torch

    from spine_ttrl.engine.precision import machine_name

    run = tmp_path / "run"
    assert main(["adapt", *ARGS, "--skip-eval-before", "--save-every", "1", "--out", str(run)]) == 0
    here = machine_name("cpu")
    assert [json.loads(x)["machine"] for x in (run / "eval.jsonl").read_text().splitlines()] == [here]
    state_file = run / "checkpoints" / "step-000001" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["machine"] == here
    state["machine"] = "Another CPU (amx)"  # same precision, other kernels
    torch.save(state, state_file)
    capsys.readouterr()
    assert main(["adapt", "--resume", str(run), "--steps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"note: the run so far ran on Another CPU (amx), this machine is {here}" in out
    assert "warning: the run so far computed in" not in out  # it computes the same way
    assert torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=False)["machine"] == here
    # a checkpoint from before machines were recorded resumes without a note
    state = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    del state["machine"]
    torch.save(state, run / "checkpoints" / "step-000002" / "state.pt")
    capsys.readouterr()
    assert main(["adapt", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    assert "note: the run so far ran on" not in capsys.readouterr().out
