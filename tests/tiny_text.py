"""A tiny random Llama with a word-level tokenizer and a chat template, built in memory (no hub):
end-to-end runs of the CLI in seconds. Its words include digits (math answers), option letters
and yes / no / maybe (label answers), so random completions still parse and vote."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (["<pad>", "<s>", "</s>", "<unk>"] + [str(i) for i in range(10)]
         + "what is plus times the answer yes no maybe good bad A B C".split())


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the answer is {% endif %}")
    return tok


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 2
    return model


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Save the model and tokenizer as a hub-style directory ``path``; returns it."""
    tiny_model(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
