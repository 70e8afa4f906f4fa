"""Vision-language models: loading, prompts with images, and the pixel inputs of sampling and scoring.

Any Hugging Face image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``)
runs through the same loop as a text model; tested here on tiny randomly initialised Qwen2-VL
(M-RoPE: 3-D positions) and LLaVA (1-D positions) models. What changes:

- **Prompts** (:func:`encode_image_examples`): the processor's chat template renders a user turn
  holding the question's images and its text; the processor expands each image into its
  placeholder tokens and returns the pixel inputs. The result is an :class:`ImagePrompt`: the
  prompt's token ids (a list, so everything that handles token ids still does) with its
  ``pixels`` (``pixel_values``, ``image_grid_thw``, ... as the processor returned them).
- **Sampling** (:class:`VisionSampler`): the built-in KV-cache sampler with a prefill hook
  (:class:`RowImages`): the distinct prompts of a chunk -- one per question, its G samples share
  it -- run once with their pixel inputs (and, for M-RoPE models, their 3-D positions); the
  decoded tokens are text, at position ``len + rope_delta``.
- **Scoring** (:class:`VisionBatch`): ``build_training_batch``'s tuple plus each row's prompt.
  Its :meth:`VisionBatch.hidden` runs the multimodal backbone: each distinct prompt once with its
  pixels, its KV cache expanded to the rows, the completions on top (or, with
  ``share_prompts=False``, one plain pass over prompt and completion with every row's pixels).
  Log-probs, entropies, forking-token selection, band and loss then act on completion tokens,
  which are text tokens only, exactly as for a text model.
- **Training**: ``freeze_vision`` (default) keeps every weight outside the language model and the
  LM head fixed; LoRA targets the language model's linear layers only.

transformers and PIL are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from .data import build_messages, limit_prompt_length
from .engine import BuiltinSampler
from .engine.models import _dtype_kwarg, _wrap_lora, cache_kwarg, output_cache, unwrap_model
from .engine.sampling import sample, select_cache_rows
from .example import DataError
from .images import load_image

# Processor outputs that are not pixel inputs: the token ids are the prompt, the rest we rebuild.
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------


def is_image_text_model(name: str | None) -> bool:
    """True when ``name`` (a local directory or hub id) is an image-text-to-text model.

    GGUF files and the embedded model are text models; a directory or id is read with
    ``AutoConfig`` (no weights) and counts when its config has a ``vision_config`` and its type is
    in transformers' image-text-to-text mapping.
    """
    if not name or name in ("embedded", "embedded:smollm2-135m-instruct") or str(name).lower().endswith(".gguf"):
        return False
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return False  # not loadable as a config here: the text loader reports the problem
    return getattr(config, "vision_config", None) is not None and \
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


@contextlib.contextmanager
def _optional_processor_parts():
    """Let a processor be built without its optional parts (``video_processor=None``).

    transformers 5 checks every part's class, ``None`` included, and the video processor's
    class cannot be looked up without torchvision: Qwen2-VL's processor then fails to build
    although images never need it.
    """
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, argument):
        return None if argument is None else original(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)``; where that fails for want of a video processor
    (no torchvision), the model type's processor class built from its image processor and
    tokenizer (the tokenizer's chat template is the processor's)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, TypeError, ValueError, OSError):
        cls_name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
        if cls_name is None:
            raise
    cls = getattr(transformers, cls_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    parts = {"image_processor": AutoImageProcessor.from_pretrained(path), "tokenizer": tokenizer}
    parts.update({name: None for name in cls.get_attributes() if name not in parts})
    with _optional_processor_parts():
        return cls(**parts, chat_template=tokenizer.chat_template)


def save_processor(processor, out) -> None:
    """``processor.save_pretrained(out)``, else (a processor without its video part) its image
    processor and its tokenizer with the chat template, which :func:`load_processor` reads."""
    try:
        processor.save_pretrained(out)
    except AttributeError:
        processor.image_processor.save_pretrained(out)
        if getattr(processor, "chat_template", None):
            processor.tokenizer.chat_template = processor.chat_template
        processor.tokenizer.save_pretrained(out)


def language_model_name(model) -> str:
    """The qualified module name of an image-text model's language model (its ``get_decoder()``:
    ``model.language_model`` in Qwen2-VL and LLaVA, ``model.text_model`` in Idefics3/SmolVLM)."""
    m = unwrap_model(model)
    decoder = m.get_decoder() if hasattr(m, "get_decoder") else None
    names = [n for n, mod in m.named_modules() if mod is decoder and n]
    names += [n for n, _ in m.named_modules() if n.rsplit(".", 1)[-1] in ("language_model", "text_model")]
    if not names:
        raise ValueError(f"cannot find the language model inside {type(m).__name__} (no get_decoder())")
    return names[0]


def language_model_linears(model, targets: str | list[str]) -> list[str]:
    """Full names of the language model's ``nn.Linear`` modules matching ``targets`` ("all-linear" or
    module-name suffixes): LoRA goes on the language model only, never on the vision tower or head."""
    names = []
    prefix = language_model_name(model) + "."
    for name, module in unwrap_model(model).named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(prefix):
            continue
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer of the language model matches lora_target={targets!r}")
    return names


def freeze_outside_language_model(model) -> int:
    """Fix every parameter outside the language model and the LM head (vision tower, projector);
    returns how many parameters were frozen."""
    frozen = 0
    prefix = language_model_name(model) + "."
    for name, p in unwrap_model(model).named_parameters():
        if not name.startswith(prefix) and name.split(".")[0] != "lm_head":
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def load_vision_model(name: str, *, lora: dict | None, freeze_vision: bool = True, device="cpu",
                      dtype: torch.dtype = torch.float32):
    """``(model, processor)`` of an image-text-to-text model, ready to sample and train.

    fp32 weights (as for text models), ``use_cache`` on, the tokenizer padding on the left with a
    pad token. With ``freeze_vision`` the vision tower and projector are frozen; ``lora``
    (PEFT settings as in :func:`spine_ttrl.engine.models.load_model_and_tokenizer`) targets the
    language model's linear layers when ``freeze_vision`` is on, every linear layer otherwise.
    """
    from transformers import AutoModelForImageTextToText

    processor = load_processor(name)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(name, **_dtype_kwarg(dtype))
    model.config.use_cache = True
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if freeze_vision:
        freeze_outside_language_model(model)
    if lora is not None:
        lora = dict(lora)
        if freeze_vision:
            lora["target_modules"] = language_model_linears(model, lora.get("target_modules", "all-linear"))
        model = _wrap_lora(model, lora)
    return model.eval(), processor


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


class ImagePrompt(list):
    """A prompt's token ids (image placeholders expanded) with ``pixels``: the processor's pixel
    inputs for this prompt (a dict of tensors; empty for a question without images)."""

    def __init__(self, ids, pixels: dict | None = None):
        super().__init__(ids)
        self.pixels = pixels or {}


def image_messages(messages: list[dict], n_images: int) -> list[dict]:
    """``messages`` with the last user turn's text preceded by ``n_images`` image parts."""
    out = [dict(m) for m in messages]
    user = out[-1]
    user["content"] = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": user["content"]}]
    for m in out[:-1]:
        m["content"] = [{"type": "text", "text": m["content"]}]
    return out


def encode_image_prompt(processor, messages: list[dict], images: tuple) -> ImagePrompt:
    """Token ids and pixel inputs of one question: chat template with its images, then the processor."""
    text = processor.apply_chat_template(image_messages(messages, len(images)), add_generation_prompt=True,
                                         tokenize=False)
    kwargs = {"images": [load_image(s) for s in images]} if images else {}
    out = processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)
    pixels = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
    return ImagePrompt(out["input_ids"][0].tolist(), pixels)


def encode_image_examples(processor, examples, task: str, *, max_prompt_tokens, long_prompts: str = "skip",
                          system_prompt: str = ""):
    """:func:`spine_ttrl.prompting.encode_examples` for a processor: returns (kept examples, their
    :class:`ImagePrompt`, a one-line report). A prompt with images is never truncated (that
    would cut its image tokens): ``long_prompts=truncate`` skips it instead."""
    prompts = [encode_image_prompt(processor, build_messages(ex, task, system_prompt=system_prompt or None), ex.images)
               for ex in examples]
    policy = long_prompts
    if long_prompts == "truncate" and any(ex.images for ex in examples):
        policy = "skip"
    decision = limit_prompt_length(examples, [len(p) for p in prompts], max_prompt_tokens, policy)
    cut = set(decision.truncated)
    kept = [ImagePrompt(prompts[i][-max_prompt_tokens:], prompts[i].pixels) if i in cut else prompts[i]
            for i in decision.kept]
    note = " (prompts with images are skipped, not truncated)" if policy != long_prompts else ""
    return decision.examples, kept, decision.report + note


def check_text_model_data(examples) -> None:
    """Refuse questions with images for a text-only model (one line, naming the first such question)."""
    with_images = [ex for ex in examples if ex.images]
    if with_images:
        raise DataError(f"{len(with_images)} questions have images (first: {with_images[0].id!r}) but the model is "
                        "a text-only model: use an image-text-to-text model (AutoModelForImageTextToText)")


# ---------------------------------------------------------------------------------------------
# Pixel inputs and positions
# ---------------------------------------------------------------------------------------------


def _backbone(model):
    """The multimodal backbone (``model.model``: vision tower + language model, returns hidden states)."""
    return unwrap_model(model).model


def uses_mrope(model) -> bool:
    """True for Qwen2-VL-style models, whose positions are 3-D (temporal, height, width)."""
    return callable(getattr(_backbone(model), "get_rope_index", None))


def cat_pixels(prompts, device) -> dict:
    """The pixel inputs of ``prompts`` (one per row, in row order) concatenated along dim 0, as the
    models expect a batch's images (Qwen2-VL: patches and ``image_grid_thw``; LLaVA: images).

    Idefics3/SmolVLM give each prompt a (1, images, 3, H, W) block (and a (1, images, H, W) mask):
    prompts with fewer images are zero-padded along dim 1 first, as its processor pads a batch
    (the model drops all-zero images)."""
    keys = [k for p in prompts for k in p.pixels]
    out = {}
    for k in dict.fromkeys(keys):
        parts = [p.pixels[k] for p in prompts if k in p.pixels]
        if parts[0].dim() >= 3 and len({x.shape[1] for x in parts}) > 1:
            n = max(x.shape[1] for x in parts)
            parts = [torch.cat([x, x.new_zeros((x.shape[0], n - x.shape[1], *x.shape[2:]))], dim=1) for x in parts]
        out[k] = torch.cat(parts, dim=0).to(device)
    return out


def mrope_positions(model, input_ids, attention_mask, image_grid_thw):
    """3-D positions (3, B, L) and rope deltas (B,) of left-padded rows (``get_rope_index``).

    Text after the images sits at position ``index + delta`` in all three dimensions, so a
    completion token t of a row of n prompt tokens is at ``n + t + delta``.
    """
    backbone = _backbone(model)
    image_token = backbone.config.image_token_id
    kwargs = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask.long()}
    if "mm_token_type_ids" in inspect.signature(backbone.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == image_token).int()
    if image_grid_thw is None:  # no image in these rows: 1-D positions in all three dimensions
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1), torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    pos, delta = backbone.get_rope_index(input_ids, **kwargs)
    return pos, delta.view(-1).to(torch.long)


def prefill_inputs(model, prompts, ids, mask) -> tuple[dict, torch.Tensor]:
    """Forward kwargs to prefill left-padded prompt rows ``ids``/``mask`` (b, P) whose prompts are
    ``prompts``, and each row's position offset (b,) for the tokens that follow."""
    kwargs = cat_pixels(prompts, ids.device)
    if not uses_mrope(model):
        return kwargs, torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    pos, delta = mrope_positions(model, ids, mask, kwargs.get("image_grid_thw"))
    kwargs["position_ids"] = pos
    return kwargs, delta.to(ids.device)


@dataclass
class RowImages:
    """The sampler's prefill hook: rows ``i*G .. i*G+G-1`` answer ``prompts[i]``."""

    prompts: list
    group_size: int

    def key(self, rows: torch.Tensor) -> torch.Tensor:
        """The question of each row: rows with equal keys share one prefill."""
        return rows // self.group_size

    def prefill(self, model, rows: torch.Tensor, ids, mask) -> tuple[dict, torch.Tensor]:
        return prefill_inputs(model, [self.prompts[int(r) // self.group_size] for r in rows], ids, mask)


@dataclass
class VisionSampler(BuiltinSampler):
    """The built-in sampler for prompts with images (:class:`ImagePrompt`)."""

    def generate(self, prompt_ids, params, *, generator=None, progress=None):
        prompts = [p if isinstance(p, ImagePrompt) else ImagePrompt(p) for p in prompt_ids]
        return sample(self.model, [list(p) for p in prompts], num_samples=params.num_samples,
                      max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                      top_p=params.top_p, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                      generator=generator, batch_size=params.batch_size, progress=progress,
                      tokenizer=self.tokenizer, autocast_dtype=self.autocast_dtype,
                      return_entropy=params.return_entropy, prompt_inputs=RowImages(prompts, params.num_samples),
                      max_new_tokens_per_prompt=params.max_new_tokens_per_prompt)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def backbone_hidden(model, input_ids, attention_mask, position_ids, pixels: dict, *, past_key_values=None,
                    return_cache: bool = False):
    """Final hidden states (B, L, D) of the multimodal backbone (``(hidden, cache)`` with ``return_cache``)."""
    backbone = _backbone(model)
    kw = {cache_kwarg(model): past_key_values} if past_key_values is not None else {}
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=return_cache or past_key_values is not None, return_dict=True, **kw, **pixels)
    return (out.last_hidden_state, output_cache(out)) if return_cache else out.last_hidden_state


class VisionBatch(tuple):
    """:func:`~spine_ttrl.engine.scoring.build_training_batch`'s 6-tuple plus ``prompts``: the
    :class:`ImagePrompt` of each row (rows holding the same prompt object share its prefill)."""

    def __new__(cls, batch, prompts):
        obj = super().__new__(cls, batch)
        obj.prompts = list(prompts)
        obj._positions = None
        return obj

    def to(self, device) -> "VisionBatch":
        return VisionBatch(tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in self), self.prompts)

    def positions(self, model):
        """Positions of every column: (3, B, P + T) for M-RoPE models, else the batch's (B, P + T)."""
        if self._positions is None:
            input_ids, attn, pos = self[0], self[1], self[2]
            if uses_mrope(model):
                grid = cat_pixels(self.prompts, input_ids.device).get("image_grid_thw")
                pos = mrope_positions(model, input_ids, attn, grid)[0]
            self._positions = pos
        return self._positions

    def _cols(self, model, rows, start, stop):
        pos = self.positions(model)
        return pos[:, rows, start:stop] if pos.dim() == 3 else pos[rows, start:stop]

    def hidden(self, model, rows: list[int], first: int, T: int, share: bool = True):
        """Hidden states (B_mb, T, D) predicting the completion tokens of ``rows``, and the number of
        positions run. ``first``: the first column that is not padding in every row."""
        input_ids, attn, _, _, _, P = self
        a = attn[rows].long()
        if not share:
            pixels = cat_pixels([self.prompts[r] for r in rows], input_ids.device)
            h = backbone_hidden(model, input_ids[rows, first:P + T], a[:, first:P + T],
                                self._cols(model, rows, first, P + T), pixels)
            return h[:, P - first - 1:P - first - 1 + T], len(rows) * (P - first + T)
        index: dict[int, int] = {}
        inverse = torch.tensor([index.setdefault(id(self.prompts[r]), len(index)) for r in rows],
                               device=input_ids.device)
        return self._shared(model, rows, first, T, a, inverse)

    def _shared(self, model, rows, first, T, a, inverse):
        """Each distinct prompt once (with its pixels), its cache expanded to its rows (``inverse``:
        the distinct prompt of each row), the completions on top."""
        input_ids, attn, _, _, _, P = self
        firsts: dict[int, int] = {}
        for i, k in enumerate(inverse.tolist()):
            firsts.setdefault(k, rows[i])
        u = list(firsts.values())
        pixels = cat_pixels([self.prompts[r] for r in u], input_ids.device)
        hp, cache = backbone_hidden(model, input_ids[u, first:P], attn[u, first:P].long(),
                                    self._cols(model, u, first, P), pixels, return_cache=True)
        parts = [hp[inverse, -1:]]
        if T > 1:
            cache = select_cache_rows(cache, inverse)
            parts.append(backbone_hidden(model, input_ids[rows, P:P + T - 1], a[:, first:P + T - 1],
                                         self._cols(model, rows, P, P + T - 1), {}, past_key_values=cache))
        return torch.cat(parts, dim=1), len(u) * (P - first) + len(rows) * (T - 1)
