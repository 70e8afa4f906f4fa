"""The vLLM sampler adapter against a fake engine with vLLM's calls (no GPU, no vllm package).

What this covers: prompt and sampling-parameter translation, the rollout's shapes and masks, EOS
handling (vLLM may leave the stop token out), seeding from the loop's generator, the LoRA weight
names pushed after an update, and that the update then scores the kept completions itself (the
rollout has no entropies). What it cannot cover here: a real ``vllm.LLM`` on a GPU
(``scripts/gpu_check.sh``).
"""

from types import SimpleNamespace

import pytest
import torch

from spine_ttrl.engine import SamplingParams
from spine_ttrl.engine.vllm import VLLMSampler, vllm_weights

EOS, PAD = 2, 0


class FakeParams(SimpleNamespace):
    """Stands in for vllm.SamplingParams: keeps the keyword arguments."""


class FakeLLM:
    """``generate`` returns, per prompt, n completions of prompt-derived tokens; the second
    completion of each prompt hits EOS (left out of token_ids, as vLLM may), the others run out."""

    def __init__(self):
        self.calls, self.loaded = [], []
        model = SimpleNamespace(load_weights=lambda weights: self.loaded.append(dict(weights)))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model))))

    def generate(self, prompts, sp, use_tqdm=True):
        self.calls.append((prompts, sp))
        out = []
        for p in prompts:
            comps = []
            for j in range(sp.n):
                if j == 1:
                    comps.append(SimpleNamespace(token_ids=[p["prompt_token_ids"][0] + 10], finish_reason="stop",
                                                 stop_reason=EOS))
                else:
                    comps.append(SimpleNamespace(token_ids=[5 + j] * sp.max_tokens, finish_reason="length",
                                                 stop_reason=None))
            out.append(SimpleNamespace(outputs=comps))
        return out


class ByteTok:
    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(t) for t in r if t != EOS) for r in rows]


def _sampler(model=None):
    model = model if model is not None else torch.nn.Linear(2, 2)
    return VLLMSampler(FakeLLM(), model, ByteTok(), {EOS}, PAD, FakeParams)


def test_rollout_shapes_masks_and_eos():
    s = _sampler()
    roll = s.generate([[11, 12, 13], [21]], SamplingParams(num_samples=3, max_new_tokens=4, temperature=0.8,
                                                           top_p=0.9))
    prompts, sp = s.llm.calls[0]
    assert prompts == [{"prompt_token_ids": [11, 12, 13]}, {"prompt_token_ids": [21]}]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.stop_token_ids) == (3, 0.8, 0.9, 4, [EOS])
    assert sp.seed is None  # no generator given
    assert roll.group_size == 3 and roll.completion_ids.shape == (6, 4) and roll.entropies is None
    # rows 1 and 4 stopped: their EOS is put back, as the built-in sampler keeps it
    assert roll.completion_ids[1].tolist() == [21, EOS, PAD, PAD] and roll.completion_mask[1].tolist() == [
        True, True, False, False]
    assert roll.completion_ids[4, :2].tolist() == [31, EOS]
    assert roll.truncated.tolist() == [True, False, True, True, False, True]
    assert roll.prompt_ids[0].tolist() == [11, 12, 13] and roll.prompt_ids[3].tolist() == [PAD, PAD, 21]
    assert roll.texts[1] == "21"


def test_seed_comes_from_the_loops_generator_and_greedy_has_no_nucleus():
    s = _sampler()
    params = SamplingParams(num_samples=2, max_new_tokens=2, temperature=0.0, top_p=0.5)
    s.generate([[3]], params, generator=torch.Generator().manual_seed(1))
    s.generate([[3]], params, generator=torch.Generator().manual_seed(1))
    s.generate([[3]], params, generator=torch.Generator().manual_seed(2))
    seeds = [c[1].seed for c in s.llm.calls]
    assert seeds[0] == seeds[1] != seeds[2]
    assert s.llm.calls[0][1].top_p == 1.0


def test_lora_weights_are_pushed_under_the_base_models_names():
    state = {"base_model.model.layers.0.q_proj.base_layer.weight": torch.ones(1),
             "base_model.model.layers.0.q_proj.lora_A.default.weight": torch.ones(1),
             "base_model.model.lm_head.modules_to_save.default.weight": torch.ones(1),
             "base_model.model.lm_head.original_module.weight": torch.ones(1)}
    assert [n for n, _ in vllm_weights(state, peft=True)] == ["layers.0.q_proj.weight", "lm_head.weight"]
    assert [n for n, _ in vllm_weights({"a.weight": torch.ones(1)}, peft=False)] == ["a.weight"]


def test_sync_weights_merges_pushes_and_unmerges_a_lora_model():
    from tests.unit.test_sampling import tiny_llama
    from spine_ttrl.engine.models import _wrap_lora

    model = _wrap_lora(tiny_llama(seed=0), {"r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    with torch.no_grad():  # a non-zero adapter, so merged weights differ from the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    s = _sampler(model)
    s.sync_weights()
    pushed = s.llm.loaded[0]
    assert "model.layers.0.self_attn.q_proj.weight" in pushed and not any("lora" in k for k in pushed)
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"], base_q)  # merged
    after = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(after, base_q)  # unmerged again: training continues on the adapter


def test_the_update_scores_kept_rows_when_the_sampler_gives_no_entropies():
    # update_on_batch without behaviour entropies runs its own no-grad pass (micro-batched case)
    # and selects from it: the same result as handing it the entropies of that pass.
    from spine_ttrl.config import make_config
    from spine_ttrl.engine.scoring import build_training_batch, score_batch
    from spine_ttrl.losses import group_advantages
    from spine_ttrl.update import update_on_batch
    from tests.unit.test_sampling import tiny_llama

    batch = build_training_batch([[5, 6], [5, 6], [7], [7]], [[8, 9, 10], [11, EOS], [12, 13, 14, 15], [16]], PAD)
    cfg = make_config("spine", overrides={"optim": {"micro_batch_size": 2}})
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    ent = score_batch(tiny_llama(seed=1).float(), batch, 2, temperature=0.8, chunk_size=64)[1]
    res = []
    for be in (None, ent):
        model = tiny_llama(seed=1).float()
        res.append(update_on_batch(model, torch.optim.SGD(list(model.parameters()), lr=1e-2), batch, adv,
                                   cfg.spine, cfg.optim, temperature=0.8, group_size=2, behaviour_entropy=be))
    assert torch.equal(res[0].selection.fork_mask, res[1].selection.fork_mask)
    assert res[0].metrics["loss/band"] == pytest.approx(res[1].metrics["loss/band"], abs=1e-7)


def test_vllm_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    import importlib.util

    from spine_ttrl.engine.builtin import check_sampler

    check_sampler("builtin", torch.device("cpu"))  # nothing to check
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'spine-ttrl\[vllm\]'"):
        check_sampler("vllm", torch.device("cuda"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_sampler("vllm", torch.device("cpu"))
