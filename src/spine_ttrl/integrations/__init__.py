"""Adapters that run spine-ttrl's pure functions inside other training frameworks.

Each adapter is a submodule that imports its framework on import, never this package:
``import spine_ttrl`` and ``import spine_ttrl.integrations`` stay free of TRL.

- :mod:`spine_ttrl.integrations.trl` -- ``SpineGRPOConfig`` / ``SpineGRPOTrainer`` for Hugging Face
  TRL (``pip install 'spine-ttrl[trl]'``): the scale-out path (``accelerate launch``, DeepSpeed,
  FSDP, vLLM rollouts).
"""
