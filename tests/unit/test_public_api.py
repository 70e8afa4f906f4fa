"""Names other code imports from spine_ttrl stay importable at their documented paths."""

import importlib

import pytest

PUBLIC = {
    "spine_ttrl": ["adapt", "make_config", "Config", "PRESETS", "evaluate_model", "RunResult"],
    "spine_ttrl.answers": ["extract_answer", "is_equivalent", "majority_vote", "cluster_answers", "winning_cluster",
                           "Vote", "shutdown_worker"],
    "spine_ttrl.rewards": ["majority_rewards", "frequency_rewards", "REWARDS"],
    "spine_ttrl.tokens": ["token_entropy", "token_logprobs", "logprobs_and_entropy", "top_entropy_mask",
                          "entropy_threshold", "otsu_mask"],
    "spine_ttrl.selection": ["top_entropy_mask", "entropy_threshold", "otsu_mask", "SELECTIONS", "select_tokens"],
    "spine_ttrl.losses": ["group_advantages", "policy_loss", "band_edges", "pooled_band_edges", "band_penalty",
                          "kl_penalty", "quantile_linear", "BANDS"],
    "spine_ttrl.evaluate": ["pass_at_k", "maj_at_k", "avg_at_k", "mean_and_stderr"],
    "spine_ttrl.data": ["load_examples", "resolve_task", "Example", "DataError", "generate_arith", "parse_arith_spec",
                        "build_messages", "limit_prompt_length"],
    "spine_ttrl.config": ["Config", "make_config", "PRESETS", "to_toml", "load_toml", "apply_overrides"],
    "spine_ttrl.models": ["load_model_and_tokenizer", "forward_hidden", "output_head", "embedded_gguf_path"],
    "spine_ttrl.sampling": ["sample", "Rollout", "top_p_filter", "autocast_context"],
    "spine_ttrl.assessment": ["evaluate_model", "evaluate_prompts", "EvalResult", "eos_token_ids"],
    "spine_ttrl.loop": ["adapt", "RunResult", "build_training_batch", "score_batch", "score_completions",
                        "update_on_batch", "make_optimizer", "autocast_dtype_for", "bf16_supported", "save_final_model"],
    "spine_ttrl.engine": ["Sampler", "SamplingParams", "BuiltinSampler", "Rollout"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_importable(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_moved_functions_are_the_same_objects_at_both_paths():
    from spine_ttrl import selection, tokens
    from spine_ttrl.engine import models as engine_models
    from spine_ttrl.engine import sampling as engine_sampling

    assert tokens.otsu_mask is selection.otsu_mask
    assert importlib.import_module("spine_ttrl.models").load_model_and_tokenizer is engine_models.load_model_and_tokenizer
    assert importlib.import_module("spine_ttrl.sampling").sample is engine_sampling.sample
