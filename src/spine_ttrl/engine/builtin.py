"""The built-in engine: one transformers model that samples, scores and trains in one process."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from . import BuiltinSampler
from .models import load_model_and_tokenizer
from .precision import autocast_dtype_for, resolve_device
from .scoring import score_batch


@dataclass
class BuiltinEngine:
    """The model being adapted, its tokenizer, its sampler, and the frozen reference for the KL.

    ``reference`` is None when no KL term is used; with LoRA it is the model itself, run with
    its adapter disabled (no copy), otherwise a frozen deep copy of the initial model.
    """

    model: object
    tokenizer: object
    sampler: object
    autocast_dtype: torch.dtype | None
    lora: bool
    reference: object = None
    device: torch.device = torch.device("cpu")

    def generator(self, seed: int) -> torch.Generator:
        """A random generator on the engine's device, seeded (draws never touch the global RNG)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def reference_logprobs(self, batch, micro_batch_size: int, *, temperature: float, chunk_size: int):
        """No-grad log-probs (B, T) of the batch's completions under the initial model."""
        with (self.model.disable_adapter() if self.lora else contextlib.nullcontext()):
            return score_batch(self.reference, batch, micro_batch_size, temperature=temperature,
                               chunk_size=chunk_size, amp=self.autocast_dtype)[0]


def lora_settings(model_cfg) -> dict | None:
    """PEFT LoRA settings from a ModelConfig (None when ``lora_r`` is 0: full fine-tuning)."""
    if not model_cfg.lora_r:
        return None
    targets = model_cfg.lora_target
    return {"r": model_cfg.lora_r, "alpha": model_cfg.lora_alpha, "dropout": model_cfg.lora_dropout,
            "target_modules": targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]}


def load_builtin_engine(model_cfg, *, need_reference: bool, sampling_cfg=None, seed: int = 0) -> BuiltinEngine:
    """Load the model named by ``model_cfg`` on its device (LoRA-wrapped if asked), with its sampler
    (``sampling_cfg.sampler``: the built-in one, or vLLM colocated) and, when ``need_reference``,
    the frozen reference for the KL term."""
    device = resolve_device(model_cfg.device)
    lora = lora_settings(model_cfg)
    from ..vision import is_image_text_model

    vision = is_image_text_model(model_cfg.model)
    if vision and sampling_cfg is not None and sampling_cfg.sampler == "vllm":
        raise ValueError("--sampler vllm is not supported for vision-language models: use the built-in sampler")
    if vision:  # the engine's "tokenizer" is the processor (prompts with images, saved with final/)
        from ..vision import load_vision_model

        model, tokenizer = load_vision_model(model_cfg.model, lora=lora, device=device,
                                             freeze_vision=getattr(model_cfg, "freeze_vision", True))
    else:
        model, tokenizer = load_model_and_tokenizer(model_cfg.model, lora=lora, device=device)
    amp = autocast_dtype_for(model_cfg.precision, device)
    reference = None
    if need_reference:
        reference = model if lora is not None else copy.deepcopy(model).eval().requires_grad_(False)
    eng = BuiltinEngine(model, tokenizer, sampler_for(model, tokenizer, amp, vision), amp, lora is not None,
                        reference, device)
    if sampling_cfg is not None and sampling_cfg.sampler == "vllm":
        from .models import resolve_model_path
        from .vllm import load_vllm_sampler

        eng.sampler = load_vllm_sampler(eng, resolve_model_path(model_cfg.model),
                                        gpu_memory_utilization=sampling_cfg.vllm_gpu_memory_utilization,
                                        max_model_len=None, seed=seed)
    return eng


def sampler_for(model, tokenizer, amp=None, vision: bool = False):
    """The built-in sampler; for a vision-language model (``tokenizer`` is its processor) the one
    that carries pixel inputs."""
    if not vision:
        return builtin_sampler(model, tokenizer, amp)
    from ..vision import VisionSampler

    base = builtin_sampler(model, tokenizer.tokenizer, amp)
    return VisionSampler(base.model, base.tokenizer, base.eos_token_ids, base.pad_token_id, amp)


def check_sampler(sampler: str, device: torch.device) -> None:
    """Refuse ``--sampler vllm`` where it cannot run (no vLLM installed, or not a CUDA device), in
    one line, before anything is loaded or written."""
    if sampler != "vllm":
        return
    import importlib.util

    from .vllm import VLLM_MISSING

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(VLLM_MISSING)
    if device.type != "cuda":
        raise ValueError(f"--sampler vllm needs a CUDA device (device is {device})")


def eos_token_ids(model, tokenizer) -> set[int]:
    """All token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if not ids:
        raise ValueError("the tokenizer defines no EOS token: cannot tell where a completion ends")
    return ids


def builtin_sampler(model, tokenizer, autocast_dtype=None) -> BuiltinSampler:
    """The built-in sampler for a loaded model: EOS from the tokenizer and generation config, the
    tokenizer's pad token (else the smallest EOS id)."""
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return BuiltinSampler(model, tokenizer, eos, pad, autocast_dtype)
