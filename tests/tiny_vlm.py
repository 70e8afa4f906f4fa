"""Tiny randomly initialised vision-language models, built from configs (no hub, no weights).

:func:`save_tiny_vlm` writes a model and its processor into a directory with ``save_pretrained``,
so the CLI loads it with ``--model DIR`` exactly as it would a hub model:

- ``qwen2_vl``: ``Qwen2VLForConditionalGeneration`` (M-RoPE, 3-D positions) with a
  ``Qwen2VLProcessor`` (PIL image processor, 28 x 28 patches merged 2 x 2);
- ``llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama text model, 1-D
  positions) with a ``LlavaProcessor``;
- ``idefics3``: ``Idefics3ForConditionalGeneration`` (SmolVLM's architecture: SigLIP tower, pixel
  shuffle, the language model at ``model.text_model``; pixel inputs (1, images, 3, H, W) per prompt)
  with an ``Idefics3Processor``.

All share a byte-level tokenizer built in memory (256 byte tokens, no merges) with the special
tokens each family's chat template and processor need.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spine_ttrl.vision import _optional_processor_parts, save_processor

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<image>", "<|endoftext|>"]

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def byte_tokenizer():
    """A fast tokenizer over the 256 bytes (no merges) plus :data:`SPECIALS`; EOS ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    return fast


def _text_sizes(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512)


def tiny_qwen2_vl(tokenizer, seed: int = 0):
    """A Qwen2-VL with a 32-wide, 2-layer text model and a 1-block vision tower."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(_text_sizes(len(tokenizer)), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(
        text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                             patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<pad>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def qwen2_vl_processor(tokenizer):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    with _optional_processor_parts():  # no torchvision here: build it without its video processor
        return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                chat_template=QWEN_TEMPLATE)


def tiny_llava(tokenizer, seed: int = 0):
    """A LLaVA with a 1-layer CLIP vision tower (28 x 28 images, 4 patches) and a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(**_text_sizes(len(tokenizer)), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<pad>"))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def llava_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)


IDEFICS3_TOKENS = (["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                   + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)])

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def idefics3_tokenizer():
    """The byte tokenizer plus Idefics3's image tokens (its processor looks them up)."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    return tok


def tiny_idefics3(tokenizer, seed: int = 0):
    """An Idefics3 (SmolVLM's architecture): a 1-layer SigLIP tower on 32 x 32 images (16 patches, pixel
    shuffle 2 -> 4 image tokens), a 2-layer Llama as ``model.text_model``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

    ids = tokenizer.convert_tokens_to_ids
    text = LlamaConfig(**_text_sizes(len(tokenizer)), eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids("<pad>"))
    config = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=8),
                            text_config=text.to_dict(), scale_factor=2, image_token_id=ids("<image>"),
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(config).eval()


def idefics3_processor(tokenizer):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 32})
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                             chat_template=IDEFICS3_TEMPLATE)


FAMILIES = {"qwen2_vl": (tiny_qwen2_vl, qwen2_vl_processor), "llava": (tiny_llava, llava_processor),
            "idefics3": (tiny_idefics3, idefics3_processor)}
TOKENIZERS = {"idefics3": idefics3_tokenizer}


def build_tiny_vlm(family: str, seed: int = 0):
    """``(model, processor)`` of one tiny family (see :data:`FAMILIES`)."""
    make_model, make_processor = FAMILIES[family]
    tokenizer = TOKENIZERS.get(family, byte_tokenizer)()
    return make_model(tokenizer, seed), make_processor(tokenizer)


def save_tiny_vlm(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` model and its processor into ``out`` (loadable with ``--model out``)."""
    model, processor = build_tiny_vlm(family, seed)
    out = Path(out)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
