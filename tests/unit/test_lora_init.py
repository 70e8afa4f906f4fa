"""LoRA adapters start from the same weights in every run (a fixed seed on a forked RNG), whatever the
global RNG state, and wrapping does not move the caller's global RNG."""

import pytest
import torch

pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from spine_ttrl.engine.models import _wrap_lora  # noqa: E402


def _lora_weights(global_seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(123)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    torch.manual_seed(global_seed)
    wrapped = _wrap_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    after = torch.rand(1)  # the global stream continues as if no adapter had been drawn
    return [p.detach().clone() for n, p in wrapped.named_parameters() if "lora_A" in n], after


def test_lora_init_is_reproducible_and_leaves_the_global_rng_alone():
    a, after_a = _lora_weights(1)
    b, after_b = _lora_weights(2)
    assert a and all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(x.abs().sum() > 0 for x in a)
    torch.manual_seed(1)
    assert torch.equal(after_a, torch.rand(1))
    assert not torch.equal(after_a, after_b)
