"""ETTRL's entropy-fork tree rollout (ETMR) behind the :class:`~spine_ttrl.engine.Sampler` seam.

For each question: M full completions are sampled; at each of the N highest-entropy positions t
of every one of them, B continuations are sampled from its prefix y_<t (each re-draws the token
at t and goes on until EOS or the leaf's ``max_new_tokens``). The leaves are the M full
completions and the M·N·B branches, L = M·(1 + N·B) per question; the loop votes over all of
them, exactly as over flat samples (``num_votes`` = L), and trains a random ``num_train_samples``
subset of them, as with flat sampling. A branch is a whole completion to the loss: its prefix
tokens (sampled by its parent) and its own.

Prompts with images work as text ones: a branch's prompt is the question's prompt (its pixels
kept) followed by the prefix, and the vision sampler's per-prompt budgets bound the leaf.

What the tree saves: a branch decodes only its continuation; its prefix is prefilled once per
branch point and shared by the point's B branches (the sampler runs identical prompts once), not
decoded again. ``Rollout.sampled_tokens`` counts the decoded tokens; flat sampling of the same
leaves would decode Σ leaf lengths (``completion/tree_token_ratio`` in docs/metrics.md).

Our choices where ETTRL leaves room: positions ranked by the sampler's entropy of each token,
ties to the earlier position; a completion shorter than N tokens branches at its positions in
turn (so every question has exactly L leaves); the leaves are ordered question by question:
the M full completions, then for each of them its N points (by rank) × B branches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import SamplingParams
from .sampling import Rollout, _left_pad


def branch_points(entropies: torch.Tensor, lengths: torch.Tensor, n: int) -> list[list[int]]:
    """For each row, the ``n`` positions of highest entropy among its first ``lengths[i]``
    (stable: ties to the earlier position), best first; a row shorter than ``n`` repeats its
    ranking in turn. Example: entropies (0.1, 0.9, 0.5), length 3, n = 2 → [1, 2]; length 1,
    n = 2 → [0, 0]. Shapes: entropies (R, T), lengths (R,) ≥ 1 → R lists of n ints.
    """
    out = []
    for row, length in zip(entropies, lengths.tolist()):
        order = torch.sort(row[:length].float(), descending=True, stable=True).indices.tolist()
        out.append([order[k % length] for k in range(n)])
    return out


def extend_prompt(prompt, tokens: list[int]):
    """``prompt`` followed by ``tokens``, of the prompt's own type: a prompt with images
    (:class:`spine_ttrl.vision.ImagePrompt`) keeps its pixels, so a branch is drawn seeing the
    question's images (its prefix's positions follow the image, as in the full completion)."""
    ids = list(prompt) + list(tokens)
    pixels = getattr(prompt, "pixels", None)
    return type(prompt)(ids, pixels) if pixels is not None else ids


@dataclass
class TreeSampler:
    """A :class:`~spine_ttrl.engine.Sampler` drawing each question's votes as an ETMR tree over
    ``base`` (the built-in sampler: it returns entropies and honours per-prompt budgets).

    ``generate`` returns ``samples × (1 + branch_points × branches)`` leaves per prompt, which must
    equal ``params.num_samples``.
    """

    base: object
    samples: int
    branch_points: int
    branches: int

    @property
    def leaves(self) -> int:
        return self.samples * (1 + self.branch_points * self.branches)

    def generate(self, prompt_ids, params: SamplingParams, *, generator=None, progress=None) -> Rollout:
        if params.num_samples != self.leaves:
            raise ValueError(f"a tree of {self.samples} x (1 + {self.branch_points} x {self.branches}) has "
                             f"{self.leaves} leaves per question, asked for {params.num_samples}")
        M, N, B = self.samples, self.branch_points, self.branches
        full = self.base.generate(prompt_ids, replace(params, num_samples=M, return_entropy=True),
                                  generator=generator, progress=progress)
        lengths = full.completion_lengths
        points = branch_points(full.entropies, lengths, N)
        prefixes = [(r, t) for r in range(len(points)) for t in points[r]]  # full row, branch position
        ids = [full.completion_ids[r, :t].tolist() for r, t in prefixes]
        cont = self.base.generate(
            [extend_prompt(prompt_ids[r // M], p) for (r, _), p in zip(prefixes, ids)],
            replace(params, num_samples=B, return_entropy=True,
                    max_new_tokens_per_prompt=tuple(params.max_new_tokens - t for _, t in prefixes)),
            generator=generator, progress=progress)
        leaves, ents, truncated = [], [], []
        for q in range(len(prompt_ids)):
            rows = range(q * M, (q + 1) * M)
            for r in rows:  # the full completions, then their branches
                n = int(lengths[r])
                leaves.append(full.completion_ids[r, :n].tolist())
                ents.append(full.entropies[r, :n])
                truncated.append(bool(full.truncated[r]))
            for r in rows:
                for k in range(N):
                    i = r * N + k  # the prefix index
                    t = prefixes[i][1]
                    for b in range(i * B, (i + 1) * B):
                        n = int(cont.completion_lengths[b])
                        leaves.append(ids[i] + cont.completion_ids[b, :n].tolist())
                        ents.append(torch.cat([full.entropies[prefixes[i][0], :t], cont.entropies[b, :n]]))
                        truncated.append(bool(cont.truncated[b]))
        return self._rollout(prompt_ids, leaves, ents, truncated,
                             int(lengths.sum()) + int(cont.completion_lengths.sum()), params)

    def _rollout(self, prompt_ids, leaves, ents, truncated, sampled: int, params) -> Rollout:
        """Pack the leaves as a flat sampler's Rollout (rows ``q·L .. q·L + L − 1`` answer prompt q)."""
        L, pad = self.leaves, self.base.pad_token_id
        T = max(len(x) for x in leaves)
        completion = torch.full((len(leaves), T), pad, dtype=torch.long)
        entropies = torch.zeros((len(leaves), T), dtype=torch.float32)
        mask = torch.zeros((len(leaves), T), dtype=torch.bool)
        for i, (x, e) in enumerate(zip(leaves, ents)):
            completion[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            entropies[i, :len(x)] = e.float()
            mask[i, :len(x)] = True
        prompts, prompt_mask = _left_pad([list(map(int, p)) for p in prompt_ids for _ in range(L)], pad)
        texts = []
        if getattr(self.base, "tokenizer", None) is not None:
            texts = self.base.tokenizer.batch_decode(leaves, skip_special_tokens=True)
        return Rollout(prompt_ids=prompts, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=mask,
                       truncated=torch.tensor(truncated), texts=texts, group_size=L,
                       entropies=entropies if params.return_entropy else None, sampled_tokens=sampled)

    @property
    def pad_token_id(self) -> int:
        return self.base.pad_token_id
