"""Config: presets, TOML files, CLI generation and validation."""

import argparse

import pytest

from spine_ttrl.config import PRESETS, add_config_arguments, make_config, overrides_from_args, to_toml, load_toml


def test_presets_set_the_method():
    ttrl = make_config("ttrl")
    assert (ttrl.spine.selection, ttrl.spine.band) == ("all", "none")
    v1 = make_config("spine")
    assert (v1.spine.selection, v1.spine.rho, v1.spine.scope, v1.spine.band) == ("top", 0.2, "batch", "quantile")
    assert (v1.spine.band_low_q, v1.spine.band_high_q) == (0.1, 0.5)
    # the paper's objective with its masked KL to the initial model on; the others keep no reference
    assert (v1.spine.kl_coef, v1.spine.kl_tokens) == (0.1, "selected")
    v2 = make_config("spine-v2")
    assert (v2.spine.selection, v2.spine.band) == ("otsu", "mad")
    assert ttrl.spine.kl_coef == 0.0 and v2.spine.kl_coef == 0.0
    assert make_config("none").optim.steps == 0
    assert set(PRESETS) == {"ttrl", "spine", "spine-v2", "ttrv", "evol-rl", "ettrl", "siren", "none"}


def test_precedence_default_preset_file_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "ttrl"\n[optim]\nlr = 3e-6\nsteps = 7\n[sampling]\nnum_votes = 4\nnum_train_samples = 2\n')
    cfg = make_config(config_file=str(f), overrides={"optim": {"steps": 9}})
    assert cfg.preset == "ttrl" and cfg.spine.selection == "all"
    assert cfg.optim.lr == 3e-6 and cfg.optim.steps == 9 and cfg.sampling.num_votes == 4


def test_toml_round_trip(tmp_path):
    cfg = make_config("spine-v2", overrides={"data": {"data": 'a "quoted" \\ path.jsonl'}, "optim": {"lr": 1e-4}})
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    again = make_config(config_file=str(f))
    assert again == cfg


@pytest.mark.parametrize("content, fragment", [
    ("[optim]\nlr = 'fast'\n", "optim.lr"),
    ("[optim]\nlearning_rate = 1\n", "optim.learning_rate"),
    ("[nonsense]\nx = 1\n", "nonsense"),
    ("[optim\n", "invalid TOML"),
])
def test_bad_config_files_give_one_line_errors(tmp_path, content, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(ValueError) as exc:
        make_config(config_file=str(f))
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_validation():
    with pytest.raises(ValueError, match="num_train_samples"):
        make_config(overrides={"sampling": {"num_votes": 4, "num_train_samples": 8}})
    with pytest.raises(ValueError, match="rho"):
        make_config(overrides={"spine": {"rho": 1.5}})
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("grpo")
    # choices hold for config files and the API too, not only for CLI flags
    with pytest.raises(ValueError, match="spine.band_anchor must be one of none, first, got 'last'"):
        make_config("spine", overrides={"spine": {"band_anchor": "last"}})
    with pytest.raises(ValueError, match="spine.band must be one of"):
        make_config("spine", overrides={"spine": {"band": "bogus"}})
    with pytest.raises(ValueError, match="band_rows=contested needs a band"):
        make_config("ttrl", overrides={"spine": {"band_rows": "contested"}})
    with pytest.raises(ValueError, match="band_anchor=first needs a band"):
        make_config("ttrl", overrides={"spine": {"band_anchor": "first"}})
    assert make_config("spine-v2", overrides={"spine": {"band_anchor": "first"}}).spine.band_anchor == "first"
    with pytest.raises(ValueError):
        load_toml("/nonexistent/file.toml")


@pytest.mark.parametrize("section,field,value,fragment", [
    ("spine", "beta_low", -0.1, "beta_low, beta_up and kl_coef must be >= 0"),
    ("spine", "beta_up", -1.0, "beta_low, beta_up and kl_coef must be >= 0"),
    ("spine", "kl_coef", -0.01, "beta_low, beta_up and kl_coef must be >= 0"),
    ("spine", "entropy_target", -0.2, "entropy_target must be >= 0"),
    ("optim", "weight_decay", -0.1, "weight_decay must be >= 0"),
    ("optim", "adam_beta1", 1.0, "adam_beta1 and adam_beta2 must be in [0, 1)"),
    ("optim", "adam_beta2", -0.5, "adam_beta1 and adam_beta2 must be in [0, 1)"),
    ("optim", "warmup_steps", -1, "warmup_steps must be >= 0"),
    ("optim", "clip_eps", -0.2, "clip_eps must be >= 0"),
    ("optim", "max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
    ("optim", "logit_chunk_size", 0, "logit_chunk_size must be >= 1"),
    ("sampling", "sample_batch_size", 0, "sample_batch_size must be >= 1"),
    ("data", "limit", -1, "limit must be >= 0"),
    ("data", "max_prompt_tokens", 0, "max_prompt_tokens must be >= 1"),
    ("eval", "eval_every", -1, "eval_every, eval_limit and eval_max_new_tokens must be >= 0"),
    ("eval", "eval_limit", -2, "eval_every, eval_limit and eval_max_new_tokens must be >= 0"),
    ("eval", "eval_temperature", -0.6, "eval_temperature must be >= 0"),
    ("eval", "eval_top_p", 0.0, "eval_top_p must be in (0, 1]"),
    ("run", "threads", -1, "threads and save_every must be >= 0"),
    ("run", "save_every", -3, "threads and save_every must be >= 0"),
    ("model", "lora_alpha", 0.0, "lora_alpha must be > 0"),
    ("model", "lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
])
def test_numeric_ranges_are_validated(section, field, value, fragment):
    with pytest.raises(ValueError) as exc:
        make_config("spine", overrides={section: {field: value}})
    assert str(exc.value).startswith(fragment)
    # the boundary just inside the range is accepted
    ok = {"adam_beta1": 0.0, "adam_beta2": 0.0, "eval_top_p": 1.0, "lora_dropout": 0.0, "logit_chunk_size": 1,
          "sample_batch_size": 1, "max_prompt_tokens": 1, "lora_alpha": 1.0}.get(field, 0)
    assert getattr(getattr(make_config("spine", overrides={section: {field: ok}}), section), field) == ok


def test_cli_flags_generated_with_help():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    text = p.format_help()
    for flag in ["--model", "--data", "--task", "--preset", "--steps", "--num-votes", "--num-train-samples",
                 "--max-new-tokens", "--temperature", "--lr", "--seed", "--out", "--resume", "--config",
                 "--updates-per-batch", "--rho", "--band"]:
        assert flag in text
    ns = p.parse_args(["--lr", "1e-5", "--steps", "3", "--preset", "ttrl", "--no-progress"])
    ov = overrides_from_args(ns)
    assert ov == {"optim": {"lr": 1e-5, "steps": 3}, "run": {"progress": False}, "preset": "ttrl"}
    cfg = make_config(overrides=ov)
    assert cfg.optim.lr == 1e-5 and cfg.preset == "ttrl" and cfg.optim.micro_batch_size == 8


def test_cli_help_shows_each_built_in_default_once():
    import re

    from spine_ttrl.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("adapt", "eval"):
        text = " ".join(sub.choices[name].format_help().split())  # undo line wrapping
        assert not re.search(r"\(default: [^)]*\) \(default:", text)  # argparse adding its own None
        assert "Evaluate every N steps" not in text or name == "adapt"
        if name == "adapt":
            assert "chunk x vocabulary floats). (default: 128)" in text
            assert text.count("(default: 128)") == 1
        assert "Samples per question for avg@k, maj@k and pass@k (0 = greedy only). (default: 4)" in text


def test_configuration_doc_is_generated_from_the_dataclasses():
    from pathlib import Path

    from spine_ttrl.config import configuration_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown(), (
        "docs/configuration.md is stale: run `python scripts/write_config_docs.py`")
    assert "`--kl-coef`" in doc.read_text() and "| `spine-v2` |" in doc.read_text()


def test_config_choices_are_the_name_to_function_tables():
    # A new method is one entry in a name -> function table and one documented config value.
    import dataclasses

    from spine_ttrl.answers import TASKS
    from spine_ttrl.config import SpineConfig
    from spine_ttrl.losses import ADVANTAGE_NORMS, ADVANTAGE_SHAPINGS, BANDS, ENTROPY_REGULARIZERS, TOKEN_WEIGHTS
    from spine_ttrl.rewards import EMBEDDING_REWARDS, REWARDS
    from spine_ttrl.selection import SELECTIONS
    from spine_ttrl.tokens import SELECTION_SIGNALS

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(SpineConfig)}
    assert set(choices["reward"]) == set(REWARDS) | set(EMBEDDING_REWARDS) == {
        "majority", "frequency", "ttrv", "leave-one-out", "novelty"}
    assert not set(REWARDS) & set(EMBEDDING_REWARDS)
    assert set(choices["band"]) == set(BANDS) == {"none", "quantile", "mad"}
    assert set(choices["selection"]) == set(SELECTIONS) == {"all", "top", "otsu"}
    assert set(choices["advantage_norm"]) == set(ADVANTAGE_NORMS) == {"group", "batch"}
    assert set(choices["advantage_shaping"]) == set(ADVANTAGE_SHAPINGS) == {"none", "ear"}
    assert set(choices["token_weights"]) == set(TOKEN_WEIGHTS) == {"none", "steer"}
    assert set(choices["entropy_reg"]) == set(ENTROPY_REGULARIZERS) == {"none", "anchored", "adaptive"}
    assert set(choices["selection_signal"]) == set(SELECTION_SIGNALS) == {"token", "window"}
    from spine_ttrl.config import DataConfig

    task = next(f for f in dataclasses.fields(DataConfig) if f.name == "task")
    assert set(task.metadata["choices"]) == set(TASKS) | {"auto"}


def test_neighbour_presets_are_ttrl_plus_their_switches():
    from spine_ttrl.config import Config

    preset = next(f for f in __import__("dataclasses").fields(Config) if f.name == "preset")
    assert set(preset.metadata["choices"]) == set(PRESETS)
    for name in ("ttrv", "evol-rl", "ettrl", "siren"):
        sp = make_config(name).spine
        assert (sp.selection, sp.band, sp.kl_tokens) == ("all", "none", "all"), name
    ttrv = make_config("ttrv").spine
    assert (ttrv.reward, ttrv.advantage_norm) == ("ttrv", "batch")
    assert make_config("evol-rl").spine.reward == "novelty"
    ettrl = make_config("ettrl")
    assert (ettrl.sampling.rollout, ettrl.spine.advantage_shaping) == ("tree", "ear")
    assert ettrl.sampling.tree_shape() == (2, 1, 3)  # 8 votes = 2 x (1 + 1 x 3) leaves
    assert make_config("ettrl", overrides={"sampling": {"num_votes": 32}}).sampling.tree_shape() == (8, 1, 3)
    siren = make_config("siren").spine
    assert (siren.entropy_reg, siren.entropy_reg_quantile, siren.entropy_reg_top_p) == ("anchored", 0.8, 0.95)
    # the other switches stay at their defaults in every preset of the paper's methods
    for name in ("ttrl", "spine", "spine-v2"):
        sp, s = make_config(name).spine, make_config(name).sampling
        assert (sp.reward, sp.advantage_norm, sp.advantage_shaping, sp.token_weights, sp.entropy_reg,
                sp.selection_signal, s.rollout) == ("majority", "group", "none", "none", "none", "token", "flat")


@pytest.mark.parametrize("overrides, fragment", [
    ({"sampling": {"rollout": "tree", "num_votes": 6, "num_train_samples": 4}}, "a multiple of 4"),
    ({"sampling": {"rollout": "tree", "tree_samples": 3}}, "= 12"),
    ({"sampling": {"rollout": "tree", "sampler": "vllm"}}, "rollout=tree needs sampler=builtin"),
    ({"spine": {"window_size": 0}}, "window_size"),
    ({"spine": {"entropy_reg_quantile": 1.0}}, "entropy_reg_quantile"),
    ({"spine": {"entropy_reg_top_p": 0.0}}, "entropy_reg_top_p"),
    ({"spine": {"entropy_coef_delta": -1.0}}, "entropy_coef_delta"),
    ({"spine": {"token_weights": "bogus"}}, "spine.token_weights must be one of none, steer"),
])
def test_neighbour_switches_are_validated(overrides, fragment):
    with pytest.raises(ValueError) as exc:
        make_config("ttrl", overrides=overrides)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_eval_help_lists_evaluation_settings_only(capsys):
    import pytest

    from spine_ttrl.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--eval-samples", "--data", "--model", "--eval-temperature", "--seed"):
        assert flag in text
    for flag in ("--lr", "--rho", "--kl-coef", "--steps", "--preset", "--num-votes", "--lora-r", "--resume"):
        assert flag + " " not in text and flag + "\n" not in text, flag
    with pytest.raises(SystemExit):  # and a training flag is refused there
        build_parser().parse_args(["eval", "--lr", "1e-3"])


def test_eval_with_a_training_config_file_does_not_train(tmp_path):
    from spine_ttrl.cli import build_parser, config_from_args

    path = tmp_path / "c.toml"
    path.write_text('preset = "spine"\n[optim]\nsteps = 5\n')
    cfg = config_from_args(build_parser().parse_args(["eval", "--config", str(path)]))
    assert cfg.preset == "none" and cfg.optim.steps == 0
    cfg = config_from_args(build_parser().parse_args(["adapt", "--config", str(path)]))
    assert cfg.preset == "spine" and cfg.optim.steps == 5
