"""Sampler tests on a tiny randomly initialised Llama (no download, seconds on CPU).

The reference for greedy decoding is transformers' own ``model.generate``. Where a test needs an
EOS token, it first decodes greedily without one and then picks a token the greedy rows produce,
so the expected cut points are known exactly whatever the random init.

The last section tests ``spine_ttrl.models.forward_hidden`` / ``output_head`` on the same tiny
models (the embedded-model versions are in tests/integration/test_models.py).
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from spine_ttrl.engine.models import forward_hidden, output_head, position_ids_from_mask  # noqa: E402
from spine_ttrl.sampling import Rollout, cache_frozen_casts, sample, select_cache_rows, top_p_filter  # noqa: E402

PAD = 0
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24, 25], [1, 40, 41]]  # lengths 4, 2, 7, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0, tie: bool = False, head_scale: float = 1.0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if head_scale != 1.0:  # sharpen the next-token distribution so frequency tests have teeth
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model




@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def greedy(model, prompts=PROMPTS, eos=(), **kw) -> Rollout:
    kw.setdefault("max_new_tokens", 16)
    return sample(model, prompts, num_samples=1, temperature=0.0, eos_token_ids=list(eos), pad_token_id=PAD, **kw)


def pick_eos(tokens: torch.Tensor) -> int:
    """A token that ends some rows early (not at step 0) but not all of them."""
    B = tokens.shape[0]
    for tok in tokens[:, 1:].unique().tolist():
        rows = (tokens == tok).any(-1)
        if 0 < int(rows.sum()) < B and not (tokens[:, 0] == tok).any():
            return tok
    raise AssertionError("random init gave no usable EOS candidate; change the seed")


def first_index(row: torch.Tensor, tok: int) -> int | None:
    hits = (row == tok).nonzero()
    return int(hits[0]) if hits.numel() else None


# --------------------------------------------------------------------------------------------
# Greedy decoding against model.generate
# --------------------------------------------------------------------------------------------


def test_greedy_matches_generate_with_left_padding(model):
    roll = greedy(model)
    # prompts of lengths 4, 2, 7, 3 -> left-padded to 7
    assert roll.prompt_ids.shape == (4, 7)
    assert roll.prompt_mask.sum(-1).tolist() == [4, 2, 7, 3]
    assert not roll.prompt_mask[1, :5].any() and (roll.prompt_ids[1, :5] == PAD).all()
    ref = model.generate(
        input_ids=roll.prompt_ids,
        attention_mask=roll.prompt_mask.long(),
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    assert torch.equal(roll.completion_ids, ref[:, roll.prompt_ids.shape[1] :])
    assert roll.truncated.all() and roll.completion_mask.all()


def test_greedy_with_eos_matches_generate_and_masks(model):
    free = greedy(model).completion_ids  # no EOS: 16 tokens per row
    eos = pick_eos(free)
    roll = greedy(model, eos=[eos])
    ref = model.generate(
        input_ids=roll.prompt_ids,
        attention_mask=roll.prompt_mask.long(),
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=PAD,
        eos_token_id=eos,
    )
    ref = ref[:, roll.prompt_ids.shape[1] :]
    assert torch.equal(roll.completion_ids, ref[:, : roll.completion_ids.shape[1]])
    assert (ref[:, roll.completion_ids.shape[1] :] == PAD).all()

    for i in range(len(PROMPTS)):
        cut = first_index(free[i], eos)
        n = 16 if cut is None else cut + 1  # the EOS itself is part of the completion
        assert roll.completion_mask[i].tolist() == [j < n for j in range(roll.completion_mask.shape[1])]
        assert torch.equal(roll.completion_ids[i, :n], free[i, :n])
        assert (roll.completion_ids[i, n:] == PAD).all()
        assert bool(roll.truncated[i]) == (cut is None)
        if cut is not None:
            assert int(roll.completion_ids[i, cut]) == eos
    assert roll.truncated.any() and not roll.truncated.all()
    assert torch.equal(roll.completion_lengths, roll.completion_mask.sum(-1))


def test_greedy_independent_of_batch_size_chunking(model):
    eos = pick_eos(greedy(model).completion_ids)
    prompts = PROMPTS * 2
    full = greedy(model, prompts, eos=[eos])
    for bs in (1, 3, 5):
        chunked = greedy(model, prompts, eos=[eos], batch_size=bs)
        assert torch.equal(chunked.completion_ids, full.completion_ids)
        assert torch.equal(chunked.completion_mask, full.completion_mask)
        assert torch.equal(chunked.truncated, full.truncated)
        assert torch.equal(chunked.prompt_ids, full.prompt_ids)


def test_finished_rows_are_pruned_from_the_batch(model):
    eos = pick_eos(greedy(model).completion_ids)
    seen: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        roll = greedy(model, eos=[eos])
    finally:
        hook.remove()
    n_done = int((~roll.truncated).sum())
    assert seen[0] == 4
    assert seen == sorted(seen, reverse=True)  # never grows
    assert seen[-1] == 4 - n_done  # finished rows were dropped
    assert len(seen) == roll.completion_ids.shape[1]  # one forward per generated position


def test_select_cache_rows_keeps_the_right_rows(model):
    from transformers import DynamicCache

    from spine_ttrl.engine.models import cache_kwarg, output_cache

    ids = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10]])
    cache = output_cache(model(input_ids=ids, use_cache=True, **{cache_kwarg(model): DynamicCache()}))
    keys_before = [layer.keys.clone() for layer in cache.layers]
    cache = select_cache_rows(cache, torch.tensor([0, 2]))
    for before, layer in zip(keys_before, cache.layers):
        assert torch.equal(layer.keys, before[[0, 2]])


# --------------------------------------------------------------------------------------------
# Randomness: explicit generator, grouping, distribution
# --------------------------------------------------------------------------------------------


def sampled(model, seed, **kw):
    kw.setdefault("max_new_tokens", 12)
    return sample(
        model,
        PROMPTS,
        num_samples=3,
        temperature=1.0,
        eos_token_ids=[2],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def test_same_seed_same_ids_different_seed_differs_global_rng_untouched(model):
    state = torch.get_rng_state()
    a, b, c = sampled(model, 7), sampled(model, 7), sampled(model, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert not torch.equal(a.completion_ids[:, :5], c.completion_ids[:, :5])


def test_rows_are_grouped_consecutively_by_prompt(model):
    G = 3
    roll = sampled(model, 0)
    assert roll.group_size == G and roll.completion_ids.shape[0] == len(PROMPTS) * G
    for i, p in enumerate(PROMPTS):
        for j in range(G):
            row = i * G + j
            assert roll.prompt_ids[row][roll.prompt_mask[row]].tolist() == p
    # greedy: the G copies of a prompt are identical, and different prompts differ
    g = sample(model, PROMPTS, num_samples=G, max_new_tokens=8, temperature=0, eos_token_ids=[], pad_token_id=PAD)
    groups = g.completion_ids.view(len(PROMPTS), G, -1)
    assert (groups == groups[:, :1]).all()
    assert not torch.equal(groups[0, 0], groups[1, 0])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom (cells with expected count > 5 plus one pooled tail cell, minus 1)."""
    expected = probs * counts.sum()
    keep = expected > 5  # pool the rare tail into one cell
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    exp = exp.clamp(min=1e-9)
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum())


def test_one_step_frequencies_match_softmax_over_temperature():
    model = tiny_llama(head_scale=8.0)
    prompt, T, N = [1, 5, 9], 0.7, 20000
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    p_T, p_1 = (logits / T).softmax(-1), logits.softmax(-1)
    roll = sample(
        model, [prompt], num_samples=N, max_new_tokens=1, temperature=T,
        eos_token_ids=[], pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(roll.completion_ids[:, 0], minlength=64).double()
    stat, df = chi_square(counts, p_T)
    # 99.9% quantile of chi2(df) is about df + 3.1*sqrt(2 df) + 7 for df ~ 10..60
    assert stat < df + 3.1 * math.sqrt(2 * df) + 7, (stat, df)
    wrong, _ = chi_square(counts, p_1)  # the test can tell temperature 0.7 from 1.0
    assert wrong > 10 * stat


# --------------------------------------------------------------------------------------------
# Top-p
# --------------------------------------------------------------------------------------------


def test_top_p_filter_hand_numbers():
    # probabilities 0.15, 0.5, 0.05, 0.3 -> sorted 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2)
    # mass above each in sorted order: 0, 0.5, 0.8, 0.95; drop where mass above >= top_p
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()

    def kept(p):
        return torch.isfinite(top_p_filter(logits, p)).nonzero().squeeze(-1).tolist()

    assert kept(0.4) == [1]  # 0.5 alone reaches 0.4
    assert kept(0.7) == [1, 3]  # 0.5 < 0.7, 0.8 >= 0.7
    assert kept(0.9) == [0, 1, 3]  # 0.8 < 0.9, 0.95 >= 0.9
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-6) == [1]  # the most likely token always survives
    kept_vals = top_p_filter(logits, 0.7)
    assert torch.equal(kept_vals[[1, 3]], logits[[1, 3]])  # survivors are not renormalised here
    # batched rows are filtered independently
    batch = torch.stack([logits, logits.flip(0)])
    out = top_p_filter(batch, 0.7)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, True, False]]
    with pytest.raises(ValueError):
        top_p_filter(logits, 0.0)


def test_top_p_sampling_never_leaves_the_nucleus():
    model = tiny_llama(head_scale=8.0)
    prompt, T, top_p = [1, 5, 9], 1.0, 0.6
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    nucleus = set(torch.isfinite(top_p_filter(logits, top_p)).nonzero().squeeze(-1).tolist())
    assert 1 < len(nucleus) < 64
    roll = sample(
        model, [prompt], num_samples=4000, max_new_tokens=1, temperature=T, top_p=top_p,
        eos_token_ids=[], pad_token_id=PAD, generator=torch.Generator().manual_seed(1),
    )
    drawn = set(roll.completion_ids[:, 0].tolist())
    assert drawn <= nucleus
    assert len(drawn) > 1


# --------------------------------------------------------------------------------------------
# Odds and ends
# --------------------------------------------------------------------------------------------


def test_progress_counts_every_generated_token_and_mode_is_restored(model):
    total = []
    model.train()
    try:
        roll = sampled(model, 3, progress=total.append)
        assert model.training  # put back in train mode after sampling
    finally:
        model.eval()
    assert sum(total) == int(roll.completion_mask.sum())


def test_texts_are_decoded_with_a_tokenizer(model):
    class ByteTok:  # the smallest thing with batch_decode
        def batch_decode(self, rows, skip_special_tokens):
            assert skip_special_tokens
            return [" ".join(map(str, r)) for r in rows]

    roll = sample(model, PROMPTS[:2], num_samples=2, max_new_tokens=4, temperature=0,
                  eos_token_ids=[], pad_token_id=PAD, tokenizer=ByteTok())
    assert roll.texts == [" ".join(map(str, r.tolist())) for r in roll.completion_ids]


def test_bf16_autocast_runs_and_mostly_agrees(model):
    ref = greedy(model, max_new_tokens=4)
    roll = greedy(model, max_new_tokens=4, autocast_dtype=torch.bfloat16)
    assert roll.completion_ids.dtype == torch.long and roll.completion_ids.shape == ref.completion_ids.shape
    assert torch.equal(roll.completion_ids[:, 0], ref.completion_ids[:, 0])


def test_bad_arguments_are_rejected(model):
    kw = dict(num_samples=1, max_new_tokens=2, temperature=1.0, eos_token_ids=[2], pad_token_id=PAD)
    with pytest.raises(ValueError):
        sample(model, [], **kw)
    with pytest.raises(ValueError):
        sample(model, [[]], **kw)
    with pytest.raises(ValueError):
        sample(model, [[1]], **{**kw, "temperature": -1.0})
    with pytest.raises(ValueError):
        sample(model, [[1]], **{**kw, "max_new_tokens": 0})


# --------------------------------------------------------------------------------------------
# spine_ttrl.models on tiny models: hidden @ W.T + b == logits, without building logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_forward_hidden_times_head_equals_logits(tie):
    model = tiny_llama(tie=tie)
    ids, mask = torch.tensor([[PAD, PAD, 1, 5, 9], [1, 7, 8, 3, 4]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    W, b = output_head(model)
    assert W.shape == (64, 32) and b is None
    if tie:
        assert W is model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        hidden = forward_hidden(model, ids, mask)
    assert hidden.shape == (2, 5, 32)
    torch.testing.assert_close(hidden @ W.T, logits, atol=1e-5, rtol=0)


def test_forward_hidden_through_lora_and_gradients_flow():
    peft = pytest.importorskip("peft")
    from spine_ttrl.engine.models import _wrap_lora

    model = _wrap_lora(tiny_llama(), {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    assert isinstance(model, peft.PeftModel)
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, mask = torch.tensor([[1, 5, 9, 13]]), torch.ones(1, 4, dtype=torch.long)
    W, b = output_head(model)
    hidden = forward_hidden(model, ids, mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hidden.detach() @ W.T, logits, atol=1e-5, rtol=0)
    hidden.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_sampling_a_lora_wrapped_model():
    peft = pytest.importorskip("peft")
    from spine_ttrl.engine.models import _wrap_lora

    base = tiny_llama()
    ref = greedy(base, max_new_tokens=8)
    wrapped = _wrap_lora(tiny_llama(), {"r": 4, "target_modules": "all-linear"})
    assert isinstance(wrapped, peft.PeftModel)
    # LoRA's B starts at zero, so the wrapped model decodes exactly like the base model
    assert torch.equal(greedy(wrapped, max_new_tokens=8).completion_ids, ref.completion_ids)


def _weight_casts(module, x, calls: int, cache: bool) -> int:
    """Number of aten::_to_copy ops in ``calls`` no-grad bf16-autocast forwards of ``module``."""
    import contextlib

    from torch.profiler import profile

    ctx = cache_frozen_casts(module, torch.bfloat16) if cache else contextlib.nullcontext()
    with profile() as prof:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), ctx:
            for _ in range(calls):
                module(x)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_frozen_weight_is_cast_once_per_autocast_context_and_flags_restored():
    lin = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)
    x = torch.ones(2, 4)
    # 3 calls: 3 input casts + 3 weight casts plainly, 3 input casts + 1 weight cast with the cache
    assert _weight_casts(lin, x, 3, cache=False) == 6
    assert _weight_casts(lin, x, 3, cache=True) == 4
    assert not lin.weight.requires_grad


def test_cache_frozen_casts_only_touches_frozen_float_weights_and_restores_on_error():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), cache_frozen_casts(net, torch.bfloat16):
            assert all(p.requires_grad for p in net.parameters())
            raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    # no autocast dtype, or grad mode on (flags would make autograd train frozen weights): no-op
    with torch.no_grad(), cache_frozen_casts(net, None):
        assert not net[0].weight.requires_grad
    with cache_frozen_casts(net, torch.bfloat16):
        assert not net[0].weight.requires_grad


def test_bf16_sampling_of_a_lora_model_is_unchanged_by_the_cast_cache(monkeypatch):
    pytest.importorskip("peft")
    import contextlib

    import spine_ttrl.engine.precision as precision_mod
    from spine_ttrl.engine.models import _wrap_lora

    wrapped = _wrap_lora(tiny_llama(), {"r": 4, "target_modules": "all-linear"})
    with torch.no_grad():  # non-zero LoRA B, so the adapter takes part in the draws
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    flags = [p.requires_grad for p in wrapped.parameters()]

    def draw():
        return sample(wrapped, PROMPTS, num_samples=3, max_new_tokens=12, temperature=1.0, eos_token_ids=[],
                      pad_token_id=PAD, generator=torch.Generator().manual_seed(3), autocast_dtype=torch.bfloat16)

    cached = draw()
    assert [p.requires_grad for p in wrapped.parameters()] == flags
    monkeypatch.setattr(precision_mod, "cache_frozen_casts", lambda model, dtype: contextlib.nullcontext())
    plain = draw()
    assert torch.equal(cached.completion_ids, plain.completion_ids)


# --------------------------------------------------------------------------------------------
# Behaviour-policy entropies returned by the sampler
# --------------------------------------------------------------------------------------------


def test_sampler_entropies_equal_a_full_forward_over_the_completions(model):
    from spine_ttrl.engine.scoring import build_training_batch, score_batch

    kw = dict(num_samples=3, max_new_tokens=12, temperature=0.7, pad_token_id=PAD)
    free = sample(model, PROMPTS, eos_token_ids=[], generator=torch.Generator().manual_seed(3), **kw)
    eos = pick_eos(free.completion_ids)  # same seed again: the same draws up to the first EOS
    roll = sample(model, PROMPTS, eos_token_ids=[eos], generator=torch.Generator().manual_seed(3),
                  return_entropy=True, **kw)
    mask = roll.completion_mask
    assert roll.entropies.shape == mask.shape and roll.entropies.dtype == torch.float32
    assert (roll.entropies[~mask] == 0).all() and (roll.entropies[mask] > 0).all()
    assert not mask.all()  # some rows ended early: the padding case is exercised
    # The same entropies from one teacher-forced forward over prompt + completion (no KV cache).
    prompts = [p for p in PROMPTS for _ in range(3)]
    comps = [row[m].tolist() for row, m in zip(roll.completion_ids, mask)]
    batch = build_training_batch(prompts, comps, PAD)
    _, ent = score_batch(model, batch, 4, temperature=0.7, chunk_size=7)
    torch.testing.assert_close(roll.entropies[:, :ent.shape[1]] * batch[4], ent * batch[4], atol=1e-5, rtol=1e-5)


def test_sampler_entropies_only_on_request_and_not_for_greedy(model):
    assert greedy(model).entropies is None
    with pytest.raises(ValueError, match="temperature > 0"):
        greedy(model, return_entropy=True)


def test_autocast_context_follows_dtype_and_device():
    from spine_ttrl.sampling import autocast_context

    lin = torch.nn.Linear(2, 2)
    with autocast_context(None, lin):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(torch.bfloat16, lin):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert lin(torch.ones(1, 2)).dtype == torch.bfloat16
        with autocast_context(torch.bfloat16, lin, enabled=False):
            assert not torch.is_autocast_enabled("cpu")
            assert lin(torch.ones(1, 2)).dtype == torch.float32


def test_autocast_context_caches_frozen_casts_only_under_no_grad():
    from spine_ttrl.sampling import autocast_context

    lin = torch.nn.Linear(2, 2).requires_grad_(False)
    with torch.no_grad(), autocast_context(torch.bfloat16, lin):
        assert lin.weight.requires_grad  # the flag that switches autocast's cast cache on
        with autocast_context(torch.bfloat16, lin, enabled=False):
            assert lin(torch.ones(1, 2)).dtype == torch.float32
    assert not lin.weight.requires_grad
    with autocast_context(torch.bfloat16, lin):  # grad mode: autograd must not train frozen weights
        assert not lin.weight.requires_grad
    with torch.no_grad(), autocast_context(None, lin):
        assert not lin.weight.requires_grad


# --------------------------------------------------------------------------------------------
# Shared-prompt scoring: each distinct prompt runs once, the KV cache is expanded to its rows
# --------------------------------------------------------------------------------------------


def test_shared_rows_by_hand():
    from spine_ttrl.engine.sampling import shared_rows

    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9], [0, 0, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    keep, inverse = shared_rows(ids, mask)
    assert keep.tolist() == [0, 1, 4]  # first row of each distinct prompt, in order of appearance
    assert inverse.tolist() == [0, 1, 0, 1, 2]
    # a row whose ids match but whose mask differs is a different prompt (pad id used as a token)
    keep, inverse = shared_rows(torch.tensor([[0, 5], [0, 5]]), torch.tensor([[0, 1], [1, 1]]))
    assert keep.tolist() == [0, 1] and inverse.tolist() == [0, 1]


@pytest.mark.parametrize("G", [1, 3])
def test_shared_prompt_scoring_equals_the_plain_pass_values_and_gradients(G):
    """Log-probs, entropies and parameter gradients of the shared-prompt pass equal those of one
    teacher-forced (B, P + T) pass, for a micro-batch mixing rows of several prompts of different
    lengths (left padding) and completions of different lengths (right padding)."""
    from spine_ttrl.engine.scoring import build_training_batch, score_completions

    model = tiny_llama(seed=4).train()
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in PROMPTS for _ in range(G)]
    comps = [torch.randint(3, 64, (int(n),), generator=g).tolist()
             for n in torch.randint(1, 9, (len(prompts),), generator=g)]
    batch = build_training_batch(prompts, comps, PAD)
    mask = batch[4]
    rows = list(range(1, len(prompts)))  # a micro-batch that starts mid-group
    weights = torch.randn(len(rows), mask.shape[1], generator=g)
    out = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        lp, en, T = score_completions(model, batch, rows, temperature=0.7, chunk_size=5, share_prompts=share)
        m = mask[rows, :T].float()
        ((lp * weights[:, :T] + 0.3 * en) * m).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[share] = (lp.detach() * m, en.detach() * m, grads)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
    for n, g_plain in out[False][2].items():
        torch.testing.assert_close(out[True][2][n], g_plain, atol=1e-5, rtol=1e-4, msg=n)
    assert any(v.abs().sum() > 0 for k, v in out[True][2].items() if "layers.0" in k)


def test_shared_prompt_scoring_with_one_token_completions():
    from spine_ttrl.engine.scoring import build_training_batch, score_completions

    model = tiny_llama(seed=5)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    batch = build_training_batch(prompts, [[7], [8], [9], [10], [11]], PAD)
    rows = list(range(5))
    with torch.no_grad():
        a = score_completions(model, batch, rows, temperature=1.0, chunk_size=4, share_prompts=True)
        b = score_completions(model, batch, rows, temperature=1.0, chunk_size=4, share_prompts=False)
    assert a[2] == b[2] == 1
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_shared_prefill_draws_the_same_samples_as_one_prefill_per_row(model, monkeypatch):
    import spine_ttrl.engine.sampling as sampling_mod

    kw = dict(num_samples=4, max_new_tokens=10, temperature=0.9, pad_token_id=PAD, eos_token_ids=[],
              return_entropy=True)
    calls = []
    real = sampling_mod.shared_rows

    def spy(ids, mask):
        keep, inverse = real(ids, mask)
        calls.append(int(keep.numel()))
        return keep, inverse

    monkeypatch.setattr(sampling_mod, "shared_rows", spy)
    shared = sample(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    assert calls == [len(PROMPTS)]  # 16 rows, 4 distinct prompts: 4 rows prefilled
    monkeypatch.setattr(sampling_mod, "shared_rows",
                        lambda ids, mask: (torch.arange(ids.shape[0]), torch.arange(ids.shape[0])))
    plain = sample(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    torch.testing.assert_close(shared.entropies, plain.entropies, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_model_falls_back_to_the_plain_pass_once_decided(monkeypatch):
    """A sliding-window cache cannot be extended by the completions: the scores equal the plain
    pass, and the prompt-only forward is tried at the first micro-batch only."""
    from transformers import MistralConfig, MistralForCausalLM

    import spine_ttrl.engine.scoring as loop_mod
    from spine_ttrl.engine.scoring import build_training_batch, score_completions

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=3,
                                             max_position_embeddings=64))
    prompts = [PROMPTS[2]] * 3 + [PROMPTS[0]] * 3
    batch = build_training_batch(prompts, [[7, 8, 9, 10, 11]] * 6, PAD)
    calls = []
    real = loop_mod.forward_hidden
    monkeypatch.setattr(loop_mod, "forward_hidden", lambda *a, **kw: calls.append(kw.get("return_cache", False)) or real(*a, **kw))
    with torch.no_grad():
        shared = [score_completions(model, batch, rows, temperature=1.0, chunk_size=4) for rows in ([0, 1, 2], [3, 4, 5])]
        plain = [score_completions(model, batch, rows, temperature=1.0, chunk_size=4, share_prompts=False)
                 for rows in ([0, 1, 2], [3, 4, 5])]
    assert calls.count(True) == 1  # the cache was inspected once, then the model was remembered
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
