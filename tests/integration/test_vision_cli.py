"""Vision-language models end to end through the CLI: tiny random Qwen2-VL and LLaVA saved with
``save_pretrained`` and loaded with ``--model DIR`` as a hub model would be (no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from tests.tiny_vlm import save_tiny_vlm  # noqa: E402

SMALL = ["--data", "shapes:4:0", "--questions-per-step", "2", "--num-votes", "4", "--num-train-samples", "4",
         "--max-new-tokens", "12", "--eval-samples", "2", "--micro-batch-size", "4", "--threads", "1", "--no-progress"]


def _cli(*args, timeout=600):
    res = subprocess.run([sys.executable, "-m", "spine_ttrl", *args], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {f: save_tiny_vlm(f, root / f) for f in ("qwen2_vl", "llava", "idefics3")}


@pytest.mark.slow
@pytest.mark.parametrize("family, extra", [
    ("qwen2_vl", ["--preset", "spine", "--lora-r", "4", "--kl-coef", "0.05"]),
    ("llava", ["--preset", "ttrl", "--lr", "1e-3"]),
    ("idefics3", ["--preset", "spine", "--lora-r", "4"]),
])
def test_adapt_two_steps_then_reload_final(models, tmp_path, family, extra):
    out = tmp_path / "run"
    _cli("adapt", "--model", str(models[family]), "--steps", "2", "--out", str(out), *SMALL, *extra)
    steps = _lines(out / "metrics.jsonl")
    assert len(steps) == 2 and any(s.get("tokens/trained", 0) > 0 for s in steps)  # a random model may parse nothing once
    from transformers import AutoModelForImageTextToText

    from spine_ttrl.vision import load_processor

    AutoModelForImageTextToText.from_pretrained(out / "final")
    assert load_processor(str(out / "final")).image_processor is not None
    _cli("eval", "--model", str(out / "final"), "--data", "shapes:2:1", "--max-new-tokens", "4", "--eval-samples", "0",
         "--no-progress", "--out", str(tmp_path / "eval"))
    assert _lines(tmp_path / "eval" / "eval.jsonl")[-1]["eval/questions"] == 2


@pytest.mark.slow
def test_full_fine_tuning_keeps_the_vision_tower_fixed(models):
    from spine_ttrl.vision import load_vision_model

    model, _ = load_vision_model(str(models["qwen2_vl"]), lora=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("visual" in n for n in trainable)
    model, _ = load_vision_model(str(models["qwen2_vl"]), lora=None, freeze_vision=False)
    assert any("visual" in n for n, p in model.named_parameters() if p.requires_grad)
    model, _ = load_vision_model(str(models["llava"]), lora={"r": 2})
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("language_model" in n and "lora_" in n for n in lora)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(models, tmp_path):
    args = ["--model", str(models["qwen2_vl"]), "--lr", "1e-3", "--save-every", "1", *SMALL]
    _cli("adapt", "--steps", "2", "--out", str(tmp_path / "full"), *args)
    _cli("adapt", "--steps", "1", "--out", str(tmp_path / "cut"), *args)
    _cli("adapt", "--resume", str(tmp_path / "cut"), "--steps", "2")
    full, cut = _lines(tmp_path / "full" / "samples.jsonl"), _lines(tmp_path / "cut" / "samples.jsonl")
    assert [s["completion_ids_sha256"] for s in full] == [s["completion_ids_sha256"] for s in cut]
    drop = ("time/", "memory/", "tokens/per_second")
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(drop)}  # noqa: E731
    assert [strip(m) for m in _lines(tmp_path / "full" / "metrics.jsonl")] == \
        [strip(m) for m in _lines(tmp_path / "cut" / "metrics.jsonl")]


def test_image_data_with_a_text_model_is_refused_in_one_line(tmp_path):
    from spine_ttrl.data import load_examples
    from spine_ttrl.prompting import encode_examples

    class TextTokenizer:
        chat_template = None

    with pytest.raises(ValueError, match="questions have images .* text-only model"):
        encode_examples(TextTokenizer(), load_examples("shapes:2"), "choice", max_prompt_tokens=None)


@pytest.mark.slow
def test_every_preset_runs_on_images(models, tmp_path):
    """Each preset, one step on images (in-process): trained presets train, ettrl samples its tree
    over the image prompts, evol-rl embeds the answers, none only evaluates."""
    from spine_ttrl import cli
    from spine_ttrl.config import PRESETS

    for preset in PRESETS:
        out = tmp_path / preset
        steps = [] if preset == "none" else ["--steps", "1"]  # none: evaluation only (0 steps)
        assert cli.main(["adapt", "--model", str(models["qwen2_vl"]), "--preset", preset, *steps,
                         "--out", str(out), *SMALL]) == 0, preset
        evals = _lines(out / "eval.jsonl")
        assert evals and evals[-1]["eval/questions"] == 4, preset
        if preset == "none":
            assert not (out / "metrics.jsonl").exists() or not _lines(out / "metrics.jsonl")
            continue
        (step,) = _lines(out / "metrics.jsonl")
        assert step["tokens/trained"] > 0, preset
        assert ("completion/tree_token_ratio" in step) == (preset == "ettrl"), preset


@pytest.mark.slow
def test_a_user_data_file_with_image_paths(models, tmp_path):
    """The user's path: a JSONL file whose rows name PNG/JPEG files next to it (one row with two
    images, one with none), adapted and evaluated through the CLI; a missing image fails in one
    line, exit status 2, before the model loads."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), "red").save(tmp_path / "img" / "red.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "img" / "blue.jpg", format="JPEG")
    rows = [{"prompt": "What colour is the image?", "image": "img/red.png", "answer": "red"},
            {"prompt": "What colour is this one?", "image": "img/blue.jpg", "answer": "blue"},
            {"prompt": "Which two colours are shown?", "image": ["img/red.png", "img/blue.jpg"], "answer": "red"},
            {"prompt": "Name a colour.", "answer": "red"}]
    for r in rows:
        r["labels"] = ["red", "blue", "green"]
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    flags = [str(data) if f == "shapes:4:0" else f for f in SMALL]
    _cli("adapt", "--model", str(models["qwen2_vl"]), "--steps", "2", "--out", str(out), "--task", "label",
         "--lr", "1e-3", *flags)
    assert len(_lines(out / "metrics.jsonl")) == 2
    assert _lines(out / "eval.jsonl")[-1]["eval/questions"] == 4
    rows[1]["image"] = "img/missing.png"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = subprocess.run([sys.executable, "-m", "spine_ttrl", "adapt", "--model", str(models["qwen2_vl"]),
                          "--out", str(tmp_path / "bad"), *flags], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "images.jsonl:2: field 'image': img/missing.png: no such image file" in res.stderr
    assert not (tmp_path / "bad" / "config.toml").exists()
