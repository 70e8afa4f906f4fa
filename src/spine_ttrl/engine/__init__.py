"""Engines: what the training loop needs from a model runtime, and the built-in one.

The loop talks to two small seams, so another runtime (vLLM for the votes, say) can replace a
part without touching the method's math:

- a **sampler** (:class:`Sampler`): prompts + :class:`SamplingParams` → a
  :class:`~spine_ttrl.engine.sampling.Rollout` (token ids, texts, and the per-token entropy of the
  sampled distribution when asked for);
- **scoring** (:mod:`spine_ttrl.engine.scoring`): log-probs and entropies of given completions
  under the trained model, with or without gradient.

The built-in engine is transformers on CPU (or one GPU): :mod:`.models` loads models (GGUF,
HF ids, directories; LoRA through PEFT), :mod:`.sampling` is a KV-cache sampler with explicit
random generators, :mod:`.scoring` the chunked log-prob / entropy pass, :mod:`.precision` the
bf16/autocast policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .precision import device_of
from .sampling import Rollout, sample


@dataclass(frozen=True)
class SamplingParams:
    """How to draw completions (one record instead of a repeated keyword list).

    ``num_samples`` completions per prompt, at most ``max_new_tokens`` each; ``temperature`` 0 is
    greedy; ``top_p`` the nucleus mass; ``batch_size`` rows decoded at once (None = all);
    ``return_entropy`` also returns the entropy of softmax(logits / temperature) at each
    sampled token (the selection signal of the loop). ``max_new_tokens_per_prompt``: an optional
    smaller budget per prompt (tree rollouts: a prefix's continuation keeps the leaf within
    ``max_new_tokens``); the built-in sampler honours it, which is why rollout=tree needs it.
    """

    num_samples: int
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    batch_size: int | None = None
    return_entropy: bool = False
    max_new_tokens_per_prompt: tuple[int, ...] | None = None


class Sampler(Protocol):
    """Draws completions for prompts; rows ``i*G .. i*G+G-1`` of the result answer prompt i."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
                 generator: torch.Generator | None = None,
                 progress: Callable[[int], object] | None = None) -> Rollout: ...


@dataclass
class BuiltinSampler:
    """The built-in sampler: :func:`~spine_ttrl.engine.sampling.sample` on a transformers model."""

    model: object
    tokenizer: object
    eos_token_ids: set[int]
    pad_token_id: int
    autocast_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's draws happen (a generator passed to :meth:`generate` must live there)."""
        return device_of(self.model)

    def generate(self, prompt_ids, params: SamplingParams, *, generator=None, progress=None) -> Rollout:
        return sample(self.model, [list(p) for p in prompt_ids], num_samples=params.num_samples,
                      max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                      top_p=params.top_p, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                      generator=generator, batch_size=params.batch_size, progress=progress,
                      tokenizer=self.tokenizer, autocast_dtype=self.autocast_dtype,
                      return_entropy=params.return_entropy,
                      max_new_tokens_per_prompt=params.max_new_tokens_per_prompt)


__all__ = ["BuiltinSampler", "Rollout", "Sampler", "SamplingParams", "sample"]
