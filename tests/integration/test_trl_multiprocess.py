"""SpineGRPOTrainer in two real CPU processes (torch.distributed, gloo backend): a group of
completions straddles the processes, the vote sees it whole, the forking mask is selected over the
pool of both processes, and the weights stay identical across processes after two steps."""

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
print("RESULT " + json.dumps(result), flush=True)
'''


@pytest.mark.slow
def test_two_cpu_processes(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(worker), str(tmp_path / "out"), str(ROOT / "tests" / "unit")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["world"] == 2
        assert r["rewards"] and all(r["rewards"]), r
        assert r["selected"] and all(r["selected"]), r
        assert r["same_weights"], r
        for name in ("vote/majority_ratio", "reward/mean", "tokens/selected_fraction", "loss/policy", "loss/band",
                     "loss/kl"):
            assert name in r["metrics"], (name, r["metrics"])
