"""SpineGRPOTrainer in two real CPU processes (torch.distributed, gloo backend): a group of
completions straddles the processes, the vote sees it whole, the forking mask is selected over the
pool of both processes, and the weights stay identical across processes after two steps; and, with
the completions fixed, two processes train exactly as one process does (rewards, selected tokens,
band edges, loss and the parameters after one SGD step)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]

WORKER = r'''
import json, math, sys
import torch
from accelerate.utils import gather_object
sys.path.insert(0, sys.argv[2])
from test_trl_engine import PROMPTS, tiny_model, tiny_tokenizer
from datasets import Dataset
from spine_ttrl.answers import extract_answer
from spine_ttrl.integrations.trl import SpineGRPOConfig, SpineGRPOTrainer, vote_groups

torch.set_num_threads(1)
checks = {"rewards": [], "selected": []}


class Checked(SpineGRPOTrainer):
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        every = gather_object([extract_answer(c) for c in completions])
        checks["rewards"].append(out[:, 0].tolist() == vote_groups(every, self.num_generations)[0]
                                 and len(every) == out.shape[0] == 2 * len(completions))
        return out

    def _attach_selection(self, out, mode):
        super()._attach_selection(out, mode)
        mask = self._loss_mask(out)
        counts = self.accelerator.gather(torch.stack([out["spine_fork_mask"].sum(), mask.sum()]).view(1, 2)).sum(0)
        checks["selected"].append(int(counts[0]) == math.ceil(self.args.rho * int(counts[1]) - 1e-9))


args = SpineGRPOConfig(output_dir=sys.argv[1], num_generations=4, per_device_train_batch_size=6,
                       gradient_accumulation_steps=1, max_completion_length=8, max_steps=2, use_cpu=True,
                       bf16=False, logging_steps=1, report_to="none", save_strategy="no", learning_rate=1e-3,
                       gradient_checkpointing=False, kl_coef=0.01, seed=0)
ds = Dataset.from_dict({"prompt": PROMPTS * 3})
trainer = Checked(model=tiny_model(), args=args, train_dataset=ds, processing_class=tiny_tokenizer())
trainer.train()
flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
same = bool(torch.equal(trainer.accelerator.gather(flat.unsqueeze(0))[0], trainer.accelerator.gather(flat.unsqueeze(0))[1]))
logs = [h for h in trainer.state.log_history if "loss" in h]
result = {"rank": trainer.accelerator.process_index, "world": trainer.accelerator.num_processes,
          "rewards": checks["rewards"], "selected": checks["selected"], "same_weights": same,
          "metrics": sorted(k for k in logs[0] if "/" in k) if logs else []}
# One file per rank (stdout lines of two processes can interleave), then a clean exit: the process
# group is torn down before the interpreter, whose shutdown could otherwise abort a gloo thread.
import os
from pathlib import Path
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
Path(sys.argv[1], f"result-{result['rank']}.json").write_text(json.dumps(result))
from spine_ttrl.integrations.trl_adapt import end_distributed
end_distributed()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


def launch(tmp_path: Path, code: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in ``nproc`` CPU processes (torch.distributed.run, gloo); argv: out dir, tests/unit, args."""
    worker = tmp_path / f"worker_{nproc}.py"
    worker.write_text(code)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(worker), str(tmp_path / "out"), str(ROOT / "tests" / "unit"), *args],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_cpu_processes(tmp_path):
    proc = launch(tmp_path, WORKER, 2)
    results = [json.loads(f.read_text()) for f in sorted((tmp_path / "out").glob("result-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["world"] == 2
        assert r["rewards"] and all(r["rewards"]), r
        assert r["selected"] and all(r["selected"]), r
        assert r["same_weights"], r
        for name in ("vote/majority_ratio", "reward/mean", "tokens/selected_fraction", "loss/policy", "loss/band",
                     "loss/kl"):
            assert name in r["metrics"], (name, r["metrics"])


# ---------------------------------------------------------------------------------------------
# Two processes = one process, with the completions fixed
# ---------------------------------------------------------------------------------------------

# Each config's fixed answers: group g's vote at position v (TRL's row order; with num_votes >
# num_generations, the vote positions of VotePlan). Two processes hold rows 0..B-1 and B..2B-1, so
# group 1 straddles them in every config, and one process's local majority differs from the group's.
EXACT_CONFIGS = {
    # G=4, rows 4,5 | 6,7: "7 7" | "2 2": a tie, the group's first cluster (7) wins; rank 1's local vote says 2.
    "dapo_band_kl": dict(
        args=dict(num_generations=4, loss_type="dapo", selection="top", rho=0.3, scope="batch", band="quantile",
                  kl_coef=0.05, kl_tokens="selected", reward="majority"),
        per_device=(12, 6), accum=1,
        answers=[["3", "3", "3", "5"], ["7", "7", "2", "2"], ["4", "6", "6", "1"]],
        rewards=[1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0]),
    # G=8 with two accumulation steps, rows 8..11 | 12..15: "7 7 7 2" | "2 2 2 2": rank 0's local majority is 7,
    # the group's is 2 (frequency reward: 7 -> 3/8, 2 -> 5/8); the anchored band is pooled over both processes.
    "grpo_accum_anchor": dict(
        args=dict(num_generations=8, loss_type="grpo", selection="top", rho=0.25, scope="group", band="mad",
                  band_anchor="first", kl_coef=0.0, reward="frequency"),
        per_device=(12, 6), accum=2,
        answers=[["1", "1", "2", "1", "3", "1", "1", "0"], ["7", "7", "7", "2", "2", "2", "2", "2"],
                 ["5", "6", "5", "6", "6", "9", "6", "5"]],
        rewards=[5, 5, 1, 5, 1, 5, 5, 1, 3, 3, 3, 5, 5, 5, 5, 5, 3, 4, 3, 4, 4, 1, 4, 3]),
    # votes != samples: G=4 trained of V=10 votes (blocks of 3, 3, 2, 2 votes per row); group 1's votes 0..5 are
    # generated on rank 0 ("7 7 7 7 2 2", local majority 7), 6..9 on rank 1; the group's majority is 2 (6 of 10)
    "votes_dr_grpo_otsu": dict(
        args=dict(num_generations=4, num_votes=10, loss_type="dr_grpo", selection="otsu", band="mad",
                  kl_coef=0.02, kl_tokens="all", reward="majority", seed=1),  # seed 1: group 1 keeps votes
        # 0, 2, 4, 9 ("7 7 2 2": the kept rows' own majority is 7); vote 4, generated on rank 0, trains on rank 1
        per_device=(12, 6), accum=1,
        answers=[["3"] * 4 + ["5"] * 3 + ["8"] * 3, ["7"] * 4 + ["2"] * 6, list("1234567890")],
        majority=["3", "2", "1"]),
}

# Reference answers of the prompts (label diagnostics only), chosen among the fixed answers so that
# some groups' majorities and votes are right and others are not.
LABELS = {"what is 1 plus 2": "3", "what is 3 times 4": "2", "what is 5 plus 6": "6", "what is 7 times 8": "7"}

EXACT_WORKER = r'''
import json, os, sys
import torch
from accelerate.utils import gather_object
sys.path.insert(0, sys.argv[2])
from test_trl_engine import PROMPTS, tiny_model, tiny_tokenizer
from datasets import Dataset
from trl import GRPOTrainer
from spine_ttrl.answers import extract_answer
from spine_ttrl.integrations.trl import SpineGRPOConfig, SpineGRPOTrainer, VotePlan

torch.set_num_threads(1)
CONFIGS = json.loads(sys.argv[3])
LABELS = json.loads(sys.argv[4])
world = int(os.environ["WORLD_SIZE"])
rec = {}


def completion(tok, answer, length):
    """`length` tokens, the last one EOS: "plus ... plus answer is <answer> </s>"."""
    return tok(" ".join(["plus"] * (length - 4) + ["answer", "is", answer]), add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def fixed_generation(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """TRL's generation replaced: global row r's votes (VotePlan's blocks) get the config's fixed answers."""
    G, V = self.num_generations, self._num_votes
    B = self.args.per_device_train_batch_size * self.args.steps_per_generation
    p = self.accelerator.process_index
    where = [(r, v) for r in range(p * B, (p + 1) * B) for v in VotePlan(G, V, ()).block(r % G)]
    assert len(where) == len(prompt_ids) and num_generations == V
    rec["prompts"] = sorted(set(gather_object([(r // G, self.processing_class.decode(ids))
                                               for (r, _), ids in zip(where, prompt_ids)])))
    # lengths 4..8 tokens; position 0 of every group has 8, so each process pads to the same length
    return [completion(self.processing_class, self.answers[r // G][v], 8 if v == 0 else 4 + (3 * r + v) % 5)
            for r, v in where], None


GRPOTrainer._generate_single_turn = fixed_generation


class Recorded(SpineGRPOTrainer):
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rec["rewards"] = out[:, 0].tolist()
        rec["kept_answers"] = gather_object([extract_answer(c) for c in completions])
        rec["label"] = {k: self._metrics["train"][k][-1] for k in ("vote/label_accuracy", "vote/sample_accuracy",
                                                                   "reward/accuracy") if self._metrics["train"].get(k)}
        return out

    def _route_kept(self, plan, where, ids, logprobs, rows):
        sent = sum(plan.target_row(r // plan.group_size, v) not in (None, *rows) for r, v in where)
        rec["transfers"] = sum(gather_object([sent]))
        return super()._route_kept(plan, where, ids, logprobs, rows)

    def _attach_selection(self, out, mode):
        super()._attach_selection(out, mode)
        mask = self._loss_mask(out)
        rec["selected"] = self.accelerator.gather(
            torch.stack([out["spine_fork_mask"].sum(), mask.sum()]).view(1, 2)).sum(0).tolist()
        if "spine_band_low" in out:
            rec["low"] = self.accelerator.gather(out["spine_band_low"]).tolist()
            rec["high"] = self.accelerator.gather(out["spine_band_high"]).tolist()

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        # this micro-batch's loss, averaged over processes (DDP averages their gradients)
        rec.setdefault("loss", []).append(self.accelerator.gather(loss.detach().reshape(1)).mean().item())
        return loss


results = {}
for name, cfg in CONFIGS.items():
    rec = {}
    args = SpineGRPOConfig(output_dir=os.path.join(sys.argv[1], name), per_device_train_batch_size=cfg["per_device"][world - 1],
                           gradient_accumulation_steps=cfg["accum"], max_completion_length=8, max_steps=1,
                           use_cpu=True, bf16=False, logging_steps=1, report_to="none", save_strategy="no",
                           optim="sgd", learning_rate=0.1, max_grad_norm=0.0, gradient_checkpointing=False,
                           **{"seed": 0, **cfg["args"]})
    data = Dataset.from_dict({"prompt": PROMPTS * 3, "answer": [LABELS[p] for p in PROMPTS] * 3})
    trainer = Recorded(model=tiny_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.answers = cfg["answers"]
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    trainer.train()
    rec["params"] = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    rec["moved"] = (rec["params"] - before).abs().max().item()
    results[name] = rec
if int(os.environ["RANK"]) == 0:
    torch.save(results, os.path.join(sys.argv[1], f"exact_{world}.pt"))
# the process group torn down before the interpreter, whose shutdown could otherwise abort a gloo thread
from spine_ttrl.integrations.trl_adapt import end_distributed
end_distributed()
'''


@pytest.mark.slow
def test_two_processes_train_exactly_as_one(tmp_path):
    import torch

    from spine_ttrl.integrations.trl import label_metrics

    configs = json.dumps(EXACT_CONFIGS)
    launch(tmp_path, EXACT_WORKER, 1, configs, json.dumps(LABELS))
    launch(tmp_path, EXACT_WORKER, 2, configs, json.dumps(LABELS))
    one, two = (torch.load(tmp_path / "out" / f"exact_{n}.pt") for n in (1, 2))
    for name, cfg in EXACT_CONFIGS.items():
        a, b = one[name], two[name]
        assert a["prompts"] == b["prompts"] and len(a["prompts"]) == 3, name  # the same groups, same prompts
        assert a["rewards"] == b["rewards"], name
        if "rewards" in cfg:  # the vote of each whole group, by hand (frequency rewards in eighths)
            scale = 8 if cfg["args"]["reward"] == "frequency" else 1
            assert [r * scale for r in a["rewards"]] == pytest.approx(cfg["rewards"]), name
        else:  # votes != samples: the kept answer's reward in its whole group's vote of 10
            G = cfg["args"]["num_generations"]
            assert a["kept_answers"] == b["kept_answers"], name
            assert a["rewards"] == [float(ans == cfg["majority"][r // G]) for r, ans in enumerate(a["kept_answers"])]
            assert a["kept_answers"][4:8] == ["7", "7", "2", "2"] and a["rewards"][4:8] == [0, 0, 1, 1]
            assert two[name]["transfers"] > 0  # a kept vote generated on one process trains on the other
        # label diagnostics over each whole group's votes, with the group's reference answer (its prompt's)
        labels = [next(v for q, v in LABELS.items() if q in text) for _, text in a["prompts"]]
        expected = label_metrics(cfg["answers"], labels, cfg["args"]["reward"])
        assert "vote/sample_accuracy" in expected and "vote/label_accuracy" in expected
        assert a["label"] == pytest.approx(expected) and b["label"] == pytest.approx(expected), name
        assert a["selected"] == b["selected"] and 0 < a["selected"][0] < a["selected"][1], name
        if "low" in a:
            for key in ("low", "high"):
                torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-6, rtol=0,
                                           equal_nan=True, msg=f"{name} {key}")
        assert len(a["loss"]) == len(b["loss"]) == cfg["accum"], name
        assert sum(a["loss"]) == pytest.approx(sum(b["loss"]), abs=1e-6, rel=0), name
        assert a["moved"] > 1e-3, name  # one SGD step moved the weights
        torch.testing.assert_close(a["params"], b["params"], atol=1e-6, rtol=0, msg=name)
    anchored = one["grpo_accum_anchor"]
    assert len({x for x in anchored["low"] if x == x}) == 1  # one pooled band for every response
