"""ETTRL's entropy-fork tree rollout (spine_ttrl.engine.tree) and the sampler's per-prompt budgets,
on a tiny random Llama (no download, seconds on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spine_ttrl.engine import SamplingParams
from spine_ttrl.engine.builtin import builtin_sampler
from spine_ttrl.engine.tree import TreeSampler, branch_points

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_text import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sampler():
    tok = tiny_tokenizer()
    return builtin_sampler(tiny_model().eval(), tok), tok


def _prompts(tok):
    return [tok("what is 1 plus 2 the answer is")["input_ids"], tok("what is 3 times 4")["input_ids"]]


def test_branch_points_hand():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.0, 0.0], [0.4, 0.7, 0.0, 0.0]])
    # row 0: 0.9 at 1 and 3 tie -> the earlier first; row 1 has 2 tokens; row 2 one token, repeated
    assert branch_points(ent, torch.tensor([4, 2, 1]), 2) == [[1, 3], [0, 1], [0, 0]]
    assert branch_points(ent, torch.tensor([3, 2, 1]), 3) == [[1, 2, 0], [0, 1, 0], [0, 0, 0]]


def test_per_prompt_budgets_stop_rows_truncated(sampler):
    s, tok = sampler
    base = SamplingParams(num_samples=3, max_new_tokens=8, temperature=1.0, return_entropy=True)
    plain = s.generate(_prompts(tok), base, generator=torch.Generator().manual_seed(1))
    # budgets equal to max_new_tokens change nothing (same draws, same rows)
    same = s.generate(_prompts(tok), SamplingParams(**{**base.__dict__, "max_new_tokens_per_prompt": (8, 8)}),
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(same.completion_ids, plain.completion_ids) and same.texts == plain.texts
    cut = s.generate(_prompts(tok), SamplingParams(**{**base.__dict__, "max_new_tokens_per_prompt": (2, 8)}),
                     generator=torch.Generator().manual_seed(1))
    lengths = cut.completion_lengths
    assert (lengths[:3] <= 2).all() and lengths[3:].max() > 2
    # a row stopped by its budget without EOS is truncated, as one stopped by max_new_tokens
    eos_end = torch.tensor([int(cut.completion_ids[i, n - 1]) == 2 for i, n in enumerate(lengths.tolist())])
    assert torch.equal(cut.truncated, ~eos_end)


def test_tree_leaves_are_full_samples_then_branches_from_their_peak_entropy_prefixes(sampler):
    s, tok = sampler
    M, N, B, T = 2, 2, 2, 8
    L = M * (1 + N * B)
    tree = TreeSampler(s, M, N, B)
    params = SamplingParams(num_samples=L, max_new_tokens=T, temperature=1.0, return_entropy=True)
    roll = tree.generate(_prompts(tok), params, generator=torch.Generator().manual_seed(0))
    full = s.generate(_prompts(tok), SamplingParams(num_samples=M, max_new_tokens=T, temperature=1.0,
                                                    return_entropy=True), generator=torch.Generator().manual_seed(0))
    assert roll.completion_ids.shape[0] == 2 * L and roll.group_size == L and len(roll.texts) == 2 * L
    lengths = roll.completion_lengths
    assert lengths.max() <= T
    decoded = 0
    for q in range(2):
        for m in range(M):
            r = q * M + m
            n = int(full.completion_lengths[r])
            leaf = q * L + m  # the full completions come first
            assert roll.completion_ids[leaf, :n].tolist() == full.completion_ids[r, :n].tolist()
            torch.testing.assert_close(roll.entropies[leaf, :n], full.entropies[r, :n])
            decoded += n
            points = branch_points(full.entropies[r:r + 1], full.completion_lengths[r:r + 1], N)[0]
            for k, t in enumerate(points):
                for b in range(B):
                    i = q * L + M + (m * N + k) * B + b
                    # a branch keeps its parent's prefix (tokens and entropies) and re-draws from t on
                    assert roll.completion_ids[i, :t].tolist() == full.completion_ids[r, :t].tolist()
                    torch.testing.assert_close(roll.entropies[i, :t], full.entropies[r, :t])
                    assert lengths[i] > t
                    decoded += int(lengths[i]) - t
    assert roll.sampled_tokens == decoded < int(lengths.sum())
    assert roll.texts == tok.batch_decode([roll.completion_ids[i, :n].tolist() for i, n in enumerate(lengths.tolist())],
                                          skip_special_tokens=True)


def test_tree_refuses_a_leaf_count_other_than_num_votes(sampler):
    s, tok = sampler
    with pytest.raises(ValueError, match="has 6 leaves per question, asked for 8"):
        TreeSampler(s, 2, 1, 2).generate(_prompts(tok), SamplingParams(num_samples=8, max_new_tokens=4,
                                                                       temperature=1.0, return_entropy=True))
