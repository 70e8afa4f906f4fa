"""The sampler; lives in :mod:`spine_ttrl.engine.sampling` (precision helpers in
:mod:`spine_ttrl.engine.precision`). Kept so that ``from spine_ttrl.sampling import sample`` keeps
working."""

from .engine.precision import autocast_context, cache_frozen_casts  # noqa: F401
from .engine.sampling import Rollout, next_tokens, sample, select_cache_rows, shared_rows, top_p_filter  # noqa: F401
