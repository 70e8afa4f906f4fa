"""spine-ttrl: label-free test-time reinforcement learning (SPINE, TTRL and neighbours).

The math lives in small pure modules that import only torch and the standard library:

- :mod:`spine_ttrl.answers`  -- answer extraction, equivalence (math-verify), majority vote
- :mod:`spine_ttrl.rewards`  -- label-free rewards over whole groups of completions
- :mod:`spine_ttrl.tokens`   -- token entropy / log-probs (chunked), forking-token selection
- :mod:`spine_ttrl.losses`   -- GRPO advantages, clipped surrogate, entropy band, KL
- :mod:`spine_ttrl.evaluate` -- pass@k, maj@k and friends

Heavy optional libraries (vLLM, TRL, PEFT) are imported only inside their adapters, so
``import spine_ttrl`` works on a bare CPU machine.
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
