"""Model loading and the hidden-state forward; lives in :mod:`spine_ttrl.engine.models`.

Kept so that ``from spine_ttrl.models import load_model_and_tokenizer`` keeps working.
"""

from .engine.models import (  # noqa: F401
    EMBEDDED_MODEL,
    cache_kwarg,
    cache_root,
    dequantized_plain_model,
    embedded_gguf_path,
    ensure_plain_copy,
    forward_hidden,
    load_gguf_model,
    load_model_and_tokenizer,
    output_cache,
    output_head,
    plain_copy_dir,
    plain_model_from,
    position_ids_from_mask,
    resolve_model_path,
    unwrap_model,
)
