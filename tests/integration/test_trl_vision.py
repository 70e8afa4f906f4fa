"""``spine-ttrl adapt --engine trl`` with vision-language models: tiny random Qwen2-VL and LLaVA saved
like hub models (no download), trained by SpineGRPOTrainer on ``shapes:`` questions.

The images must reach TRL's generation and loss, not only our evaluation: TRL's prompt for a
question is the built-in engine's (same token ids, image placeholders expanded), and with the vision
tower trainable its weights move, which they can only do through pixel inputs in the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from spine_ttrl import cli  # noqa: E402
from tests.tiny_vlm import save_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--engine", "trl", "--data", "shapes:4:0", "--questions-per-step", "2", "--num-votes", "4",
         "--num-train-samples", "4", "--micro-batch-size", "4", "--max-new-tokens", "10", "--eval-samples", "2",
         "--threads", "1", "--no-progress", "--lr", "1e-2", "--steps", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-vlm")
    return {f: save_tiny_vlm(f, root / f) for f in ("qwen2_vl", "llava", "idefics3")}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(path, prefix_words):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(w in n for w in prefix_words)}


VISION = ("visual", "vision_tower", "multi_modal_projector", "vision_model", "connector")


@pytest.mark.slow
@pytest.mark.parametrize("family, extra, vision_moves", [
    ("qwen2_vl", ["--preset", "spine", "--lora-r", "4"], False),
    ("llava", ["--preset", "ttrl", "--no-freeze-vision"], True),
    ("idefics3", ["--preset", "spine", "--lora-r", "4"], False),
])
def test_trl_engine_adapts_a_vision_language_model(models, tmp_path, family, extra, vision_moves):
    out = tmp_path / "run"
    assert cli.main(["adapt", "--model", str(models[family]), "--out", str(out), *SMALL, *extra]) == 0
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all("reward/mean" in m for m in metrics)
    assert [e["tag"] for e in _jsonl(out / "eval.jsonl")] == ["before", "after"]
    from spine_ttrl.vision import load_processor

    assert load_processor(str(out / "final")).image_processor is not None
    start, end = _weights(models[family], VISION), _weights(out / "final", VISION)
    assert start and start.keys() == end.keys()
    moved = any(not torch.equal(start[n], end[n]) for n in start)
    assert moved == vision_moves  # frozen by default; trainable, it learns through the pixels in TRL's loss
    language = ("language_model", "text_model", "lm_head")
    a, b = _weights(models[family], language), _weights(out / "final", language)
    assert any(not torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_trl_prompts_are_the_built_in_engines(models):
    """TRL tokenises the chat messages and images itself: the token ids must be the ones the built-in
    engine samples and evaluates with (image placeholders expanded identically)."""
    from datasets import Dataset

    from spine_ttrl.data import load_examples
    from spine_ttrl.integrations.trl import SpineGRPOConfig, SpineGRPOTrainer
    from spine_ttrl.integrations.trl_adapt import trl_dataset_columns
    from spine_ttrl.prompting import encode_examples
    from spine_ttrl.vision import load_vision_model

    model, processor = load_vision_model(str(models["qwen2_vl"]), lora=None)
    examples = load_examples("shapes:3:5")
    _, ours, _ = encode_examples(processor, examples, "choice", max_prompt_tokens=None)
    columns = trl_dataset_columns(processor, examples, "choice")
    assert set(columns) == {"prompt", "images", "answer"} and all(len(x) == 1 for x in columns["images"])
    args = SpineGRPOConfig(output_dir="/tmp/unused", use_cpu=True, num_generations=2, per_device_train_batch_size=2,
                           max_completion_length=4, report_to="none", task="choice")
    trainer = SpineGRPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                               processing_class=processor)
    from trl.data_utils import prepare_multimodal_messages

    prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(columns["prompt"], columns["images"])]
    ids, images, fields = trainer._tokenize_prompts(prompts)
    assert [list(map(int, x)) for x in ids] == [list(p) for p in ours]
    torch.testing.assert_close(torch.as_tensor(fields["pixel_values"]), torch.cat([p.pixels["pixel_values"] for p in ours]))


def test_trl_engine_refuses_more_votes_than_samples_for_a_vlm(models, tmp_path):
    from spine_ttrl.config import make_config
    from spine_ttrl.integrations.trl_adapt import check_trl_config

    cfg = make_config("ttrl", overrides={"model": {"model": str(models["qwen2_vl"])}, "data": {"data": "shapes:4"},
                                         "sampling": {"num_votes": 8, "num_train_samples": 4}}).validate()
    with pytest.raises(ValueError, match="vision-language model needs num_votes = num_train_samples"):
        check_trl_config(cfg)


@pytest.mark.slow
def test_trl_engine_with_images_on_two_processes(models, tmp_path):
    """torchrun, 2 CPU processes (gloo): each process generates and trains its share of the image
    prompts; rank 0 writes one run directory; 2 steps of 2 questions are one pass over 4."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "spine_ttrl", "adapt", "--model", str(models["qwen2_vl"]),
           "--out", str(out), "--preset", "spine", "--lora-r", "4", *SMALL,
           "--micro-batch-size", "2"]  # the last value wins: 2 processes x 2 rows x 2 accumulation steps
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes=2" in proc.stdout + proc.stderr
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["data/epoch"] == 1.0
    assert [e["tag"] for e in _jsonl(out / "eval.jsonl")] == ["before", "after"]
    from spine_ttrl.vision import load_processor

    assert load_processor(str(out / "final")).image_processor is not None
