"""spine-ttrl: label-free test-time reinforcement learning of language models (SPINE and TTRL).

The method's math lives in small pure modules (tensors and strings in, tensors and numbers out):

- :mod:`spine_ttrl.answers`   -- answer extraction, equivalence (math-verify), majority vote
- :mod:`spine_ttrl.rewards`   -- label-free rewards over a question's votes (``REWARDS``, ``EMBEDDING_REWARDS``)
- :mod:`spine_ttrl.tokens`    -- chunked token log-probs and entropies, window and nucleus entropy
- :mod:`spine_ttrl.selection` -- forking-token selection (``SELECTIONS`` table)
- :mod:`spine_ttrl.losses`    -- GRPO advantages, clipped surrogate, entropy band (``BANDS``), KL,
  and the neighbours' pieces (``ADVANTAGE_NORMS``, ``ADVANTAGE_SHAPINGS``, ``TOKEN_WEIGHTS``,
  ``ENTROPY_REGULARIZERS``)
- :mod:`spine_ttrl.evaluate`  -- pass@k, maj@k and friends

The loop (:mod:`spine_ttrl.loop`) drives an engine (:mod:`spine_ttrl.engine`: model loading,
sampling, scoring, the tree rollout); :mod:`spine_ttrl.embeddings` is the sentence-embedding
adapter of the novelty reward. ``import spine_ttrl`` imports none of them; transformers and PEFT
load only when a model does.
"""

__version__ = "0.1.0"

# The public API, imported lazily so that ``import spine_ttrl`` stays light (no transformers).
_LAZY = {
    "adapt": ("spine_ttrl.loop", "adapt"),
    "RunResult": ("spine_ttrl.loop", "RunResult"),
    "Config": ("spine_ttrl.config", "Config"),
    "make_config": ("spine_ttrl.config", "make_config"),
    "PRESETS": ("spine_ttrl.config", "PRESETS"),
    "evaluate_model": ("spine_ttrl.assessment", "evaluate_model"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'spine_ttrl' has no attribute {name!r}")
