"""On a bare machine: with trl and vllm unimportable, ``import spine_ttrl`` works, the built-in engine
trains and evaluates, and asking for TRL or vLLM fails in one line that names the extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HIDE = "import sys\nfor name in ('trl', 'vllm'):\n    sys.modules[name] = None\n"


def _tiny_model_dir(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [str(i) for i in range(10)] + "what is plus the answer".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}the answer is "
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, timeout=600)


def test_import_and_builtin_engine_without_trl_and_vllm(tmp_path):
    model = _tiny_model_dir(tmp_path)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} plus {b}", "answer": str(a + b)}) + "\n"
                            for a, b in [(1, 2), (3, 4)]))
    flags = ["adapt", "--model", str(model), "--data", str(data), "--steps", "1", "--questions-per-step", "2",
             "--num-votes", "4", "--num-train-samples", "4", "--max-new-tokens", "6", "--eval-samples", "0",
             "--threads", "1", "--no-progress", "--lr", "1e-3"]
    out = tmp_path / "run"
    proc = _run("import spine_ttrl\nfrom spine_ttrl import cli\n"
                f"sys.exit(cli.main({flags + ['--out', str(out)]!r}))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "final" / "config.json").exists()
    for extra, message in ((["--engine", "trl"], "spine-ttrl[trl]"), (["--sampler", "vllm"], "spine-ttrl[vllm]")):
        proc = _run(f"from spine_ttrl import cli\nsys.exit(cli.main({flags + extra + ['--out', str(tmp_path / 'x')]!r}))")
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error:") and message in last, proc.stderr[-2000:]
        assert not (tmp_path / "x").exists()
