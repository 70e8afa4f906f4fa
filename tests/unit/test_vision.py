"""Vision-language models on tiny random Qwen2-VL (3-D M-RoPE positions) and LLaVA (1-D positions).

The prompt-sharing equivalence of tests/unit/test_sampling.py, with image inputs: scoring the G
samples of a question on one shared prefill of its image and prompt gives the log-probs,
entropies and gradients of the plain pass that runs every row's image and prompt; and the
sampler (prefill hook, decode positions after the image) agrees with the scorer's full pass.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from spine_ttrl.data import build_messages, load_examples  # noqa: E402
from spine_ttrl.engine.builtin import builtin_sampler  # noqa: E402
from spine_ttrl.engine.models import output_head  # noqa: E402
from spine_ttrl.engine.scoring import build_training_batch, score_completions  # noqa: E402
from spine_ttrl.engine import SamplingParams  # noqa: E402
from spine_ttrl.vision import ImagePrompt, VisionBatch, VisionSampler, encode_image_prompt  # noqa: E402
from tests.tiny_vlm import build_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["qwen2_vl", "llava", "idefics3"]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    model, processor = build_tiny_vlm(request.param, seed=1)
    examples = load_examples("shapes:3:0")
    prompts = [encode_image_prompt(processor, build_messages(ex, "choice"), ex.images) for ex in examples]
    return model, processor, prompts


def _sampler(model, processor):
    base = builtin_sampler(model, processor.tokenizer)
    return VisionSampler(base.model, base.tokenizer, base.eos_token_ids, base.pad_token_id)


def test_prompts_carry_their_pixels(vlm):
    model, processor, prompts = vlm
    assert all(isinstance(p, ImagePrompt) and "pixel_values" in p.pixels for p in prompts)
    image_token = model.config.image_token_id
    assert all(image_token in p for p in prompts)


@pytest.mark.parametrize("G", [1, 3])
def test_shared_prefill_equals_the_plain_pass_values_and_gradients(vlm, G):
    model, processor, prompts = vlm
    g = torch.Generator().manual_seed(0)
    rows = [prompts[i] for i in range(len(prompts)) for _ in range(G)]
    completions = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (len(rows),), generator=g)]
    batch = build_training_batch(rows, completions, pad_id=0)
    assert isinstance(batch, VisionBatch)
    params = [p for p in model.parameters()]
    out = {}
    for share in (True, False):
        model.zero_grad()
        lp, ent, T = score_completions(model, batch, list(range(len(rows))), temperature=1.0, chunk_size=4,
                                       share_prompts=share)
        ((lp * batch[4][:, :T]).sum() + (ent * batch[4][:, :T]).sum()).backward()
        out[share] = (lp.detach(), ent.detach(), [p.grad.clone() if p.grad is not None else None for p in params])
    (lp1, e1, g1), (lp0, e0, g0) = out[True], out[False]
    mask = batch[4][:, :lp1.shape[1]]
    torch.testing.assert_close(lp1[mask], lp0[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1[mask], e0[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    vision_grads = [p.grad for n, p in model.named_parameters() if any(w in n for w in ("visual", "vision_tower", "vision_model"))]
    assert any(v is not None and v.abs().sum() > 0 for v in vision_grads)  # the image really flowed in


def test_greedy_samples_are_the_argmax_of_the_scoring_pass(vlm):
    """The sampler's prefill (pixels, 3-D positions) and decode positions (n + t + rope delta) are
    the scorer's full-pass positions: each greedy token is the argmax of the scored logits."""
    model, processor, prompts = vlm
    roll = _sampler(model, processor).generate(prompts, SamplingParams(num_samples=2, max_new_tokens=6, temperature=0.0))
    rows = [prompts[i // 2] for i in range(len(prompts) * 2)]
    completions = [r[m].tolist() for r, m in zip(roll.completion_ids, roll.completion_mask)]
    batch = build_training_batch(rows, completions, pad_id=0)
    with torch.no_grad():
        h, _ = batch.hidden(model, list(range(len(rows))), 0, batch[3].shape[1], share=False)
        logits = h @ output_head(model)[0].T
    mask = batch[4]
    assert torch.equal(logits.argmax(-1)[mask], batch[3][mask])


def test_rows_with_equal_tokens_but_different_images_do_not_share_a_prefill(vlm):
    model, processor, prompts = vlm
    same_ids = ImagePrompt(list(prompts[0]), {k: -v if v.dtype.is_floating_point else v
                                               for k, v in prompts[0].pixels.items()})
    sampler = _sampler(model, processor)
    params = SamplingParams(num_samples=2, max_new_tokens=4, temperature=0.0)
    together = sampler.generate([prompts[0], same_ids], params)
    alone = sampler.generate([same_ids], params)
    assert torch.equal(together.completion_ids[2:, :alone.completion_ids.shape[1]], alone.completion_ids)


def test_tree_rollout_branches_see_the_image(vlm):
    """ETTRL's tree on prompts with images: every leaf, a branch's re-drawn continuation included,
    was sampled from the distribution the scorer computes with the question's image (the
    sampler's entropy at each token equals the scoring pass's), and a branch keeps its parent's
    prefix."""
    from spine_ttrl.engine.tree import TreeSampler

    model, processor, prompts = vlm
    M, N, B, T = 2, 1, 2, 6
    L = M * (1 + N * B)
    roll = TreeSampler(_sampler(model, processor), M, N, B).generate(
        prompts[:2], SamplingParams(num_samples=L, max_new_tokens=T, temperature=1.0, return_entropy=True),
        generator=torch.Generator().manual_seed(3))
    assert roll.completion_ids.shape[0] == 2 * L and roll.completion_lengths.max() <= T
    rows = [prompts[i // L] for i in range(2 * L)]
    completions = [r[m].tolist() for r, m in zip(roll.completion_ids, roll.completion_mask)]
    batch = build_training_batch(rows, completions, pad_id=0)
    with torch.no_grad():
        _, ent, width = score_completions(model, batch, list(range(2 * L)), temperature=1.0, chunk_size=4)
    mask = roll.completion_mask[:, :width]
    assert (roll.entropies[:, :width][mask] - ent[mask]).abs().max() < 1e-5
    # with another image, the same tokens have other entropies (by 5e-5 to 1e-4 on these random
    # models, against < 2e-6 above): the check above tells whether the branches saw the pixels
    other = [ImagePrompt(list(p), {k: -v if v.dtype.is_floating_point else v for k, v in p.pixels.items()})
             for p in rows]
    with torch.no_grad():
        _, ent_other, _ = score_completions(model, build_training_batch(other, completions, pad_id=0),
                                            list(range(2 * L)), temperature=1.0, chunk_size=4)
    assert (ent_other[mask] - ent[mask]).abs().max() > 2e-5


def test_idefics3_prompts_with_different_image_counts_batch_as_alone():
    """Idefics3/SmolVLM: a prompt with two images and one with one share a batch (its (1, images, 3,
    H, W) blocks zero-padded to two) and sample as each does alone; scoring them in one pass
    gives each row's log-probs of its own pass."""
    model, processor = build_tiny_vlm("idefics3", seed=2)
    examples = load_examples("shapes:2:3")
    one = encode_image_prompt(processor, build_messages(examples[0], "choice"), examples[0].images)
    two = encode_image_prompt(processor, build_messages(examples[1], "choice"), examples[0].images + examples[1].images)
    assert one.pixels["pixel_values"].shape[1] == 1 and two.pixels["pixel_values"].shape[1] == 2
    sampler = _sampler(model, processor)
    params = SamplingParams(num_samples=2, max_new_tokens=5, temperature=0.0)
    together = sampler.generate([one, two], params)
    for i, p in enumerate((one, two)):
        alone = sampler.generate([p], params)
        width = alone.completion_ids.shape[1]
        assert torch.equal(together.completion_ids[2 * i:2 * i + 2, :width], alone.completion_ids)
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 256, (4,), generator=g).tolist() for _ in range(2)]
    with torch.no_grad():
        both, _, _ = score_completions(model, build_training_batch([one, two], completions, pad_id=0), [0, 1],
                                       temperature=1.0, chunk_size=4)
        for i, p in enumerate((one, two)):
            own, _, _ = score_completions(model, build_training_batch([p], [completions[i]], pad_id=0), [0],
                                          temperature=1.0, chunk_size=4)
            torch.testing.assert_close(both[i, :4], own[0, :4], atol=1e-5, rtol=1e-5)
