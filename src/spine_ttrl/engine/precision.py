"""Precision and devices: when bf16 pays, autocast contexts, and the frozen-weight cast cache.

The weights stay fp32 (master weights); matmuls run under autocast in bf16 where the hardware
has native bf16 (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX). The log-prob,
entropy and loss arithmetic is always fp32 (see :mod:`spine_ttrl.tokens`).
"""

from __future__ import annotations

import contextlib
import platform
import re

import torch


def device_of(model) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a ``--device`` setting: ``auto`` = the first CUDA GPU when one is
    visible, else the CPU; ``cpu``; ``cuda`` / ``cuda:N``. Asking for a GPU that is not there
    raises ValueError with a one-line reason (never a silent fall-back to the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name or "")
    if m is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return torch.device("cuda", index)


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True when bf16 matmuls are native on ``device``: a CUDA GPU that supports bf16 (Ampere and
    newer), or a CPU with AVX512-BF16 or AMX."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")


def _cpu_has(check: str) -> bool:
    """The answer of ``torch.cpu.<check>()`` (e.g. ``_is_amx_tile_supported``); False where this
    torch has no such check."""
    fn = getattr(getattr(torch, "cpu", None), check, None)
    return bool(fn and fn())


def autocast_dtype_for(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype for a precision setting on ``device``: ``fp32`` → None (plain fp32),
    ``bf16`` → bfloat16, ``auto`` → bfloat16 where :func:`bf16_supported` on that device, else None.

    The weights stay fp32 in every case (master weights): AdamW steps at test-time learning
    rates (1e-6 … 1e-4) are below bf16's resolution for many weights and would be lost."""
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        return torch.bfloat16
    return None


def compute_name(device: torch.device | str, autocast_dtype: torch.dtype | None) -> str:
    """How a run computes, as recorded in its evaluations and checkpoints: the device type and
    ``bf16`` (bf16 autocast, fp32 weights) or ``fp32``, e.g. ``"cpu bf16"``. ``precision = auto``
    resolves differently on different machines, and the two sample different tokens."""
    return f"{torch.device(device).type} {'bf16' if autocast_dtype is torch.bfloat16 else 'fp32'}"


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name: the first ``model name`` line of ``cpuinfo`` (Linux), else
    ``platform.processor()``, else ``platform.machine()``, else ``"unknown CPU"``."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_name(device: torch.device | str = "cpu") -> str:
    """Which hardware a run computes on, recorded beside :func:`compute_name`: on CUDA the GPU's
    name; on a CPU its model name and the native bf16 instructions its kernels use — ``amx``
    (checked first: a CPU with AMX also has AVX512-BF16), ``avx512_bf16`` or ``no native bf16`` —
    e.g. ``"AMD EPYC (avx512_bf16)"``. Two machines that compute the same way (one
    ``compute_name``) can still run different kernels and so sample different tokens from the
    same seed; this names the machine, it does not decide anything."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = ("amx" if _cpu_has("_is_amx_tile_supported") else
           "avx512_bf16" if _cpu_has("_is_avx512_bf16_supported") else "no native bf16")
    return f"{cpu_model_name()} ({isa})"


@contextlib.contextmanager
def autocast_context(dtype: torch.dtype | None, model=None, enabled: bool = True):
    """Autocast to ``dtype`` on the model's device type (a null context if ``dtype`` is None).

    Shared by sampling, scoring and the update. Entered under ``no_grad`` with a model, it also
    lets autocast cache the low-precision copies of the model's frozen weights
    (:func:`cache_frozen_casts`; a no-op in grad mode, so the update is unaffected).
    ``enabled=False`` inside an enabled context switches autocast off while keeping its cast
    cache (the cache lives until the outermost autocast context exits).
    """
    if dtype is None:
        yield
        return
    device_type = device_of(model).type if model is not None else "cpu"
    cache = cache_frozen_casts(model, dtype) if enabled and model is not None else contextlib.nullcontext()
    with torch.autocast(device_type, dtype=dtype, enabled=enabled), cache:
        yield


@contextlib.contextmanager
def cache_frozen_casts(model, dtype: torch.dtype | None):
    """Let autocast keep one low-precision copy of each frozen weight (under ``no_grad``).

    Entered by :func:`autocast_context`, inside its autocast context.

    Autocast caches the cast of a weight only if the weight is a leaf that requires grad; a
    frozen fp32 weight (the base model under LoRA) is cast again at every forward, i.e. at every
    decoding step: 1 GB of extra memory traffic per token for a 0.5B model. Inside ``no_grad``
    no graph is built, so marking the frozen floating-point weights ``requires_grad`` for the
    duration only switches the cache on (measured: Qwen2.5-0.5B + LoRA, 64 rows, bf16: 160 → 230
    tokens/s). The flags are restored on exit, also on error; the cached copies live until the
    outermost autocast context exits. A no-op without autocast (``dtype`` None) or under grad mode.
    """
    if dtype is None or torch.is_grad_enabled():
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
