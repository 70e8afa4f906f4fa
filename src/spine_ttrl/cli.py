"""Command line: ``spine-ttrl adapt`` and ``spine-ttrl eval``, generated from the config dataclasses.

A thin shell over :func:`spine_ttrl.loop.adapt`. Bad input (data, config, flags) prints one
``error: ...`` line and exits with status 2, never a traceback (set ``SPINE_TTRL_DEBUG=1`` to
see the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import EVAL_SETTINGS, add_config_arguments, make_config, overrides_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spine-ttrl",
        description="Label-free test-time RL of language models: SPINE and TTRL in one loop.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{adapt,eval}")
    p_adapt = sub.add_parser(
        "adapt",
        help="adapt a model on unlabeled questions, evaluating before and after",
        description="Adapt a model on unlabeled questions (majority-vote pseudo-labels, GRPO), "
        "evaluating before and after. With no arguments: the embedded SmolLM2-135M-Instruct on "
        "built-in arithmetic word problems, a short demo budget.",
    )
    add_config_arguments(p_adapt)
    p_eval = sub.add_parser(
        "eval",
        help="evaluate a model on questions (no training)",
        description="Evaluate a model (an HF id, a directory such as RUN/final, or the embedded "
        "default) on questions: greedy pass@1, avg@k, maj@k, pass@k with standard errors.",
    )
    add_config_arguments(p_eval, only=EVAL_SETTINGS)
    return parser


def config_from_args(args: argparse.Namespace):
    """The validated Config for parsed arguments (raises ValueError with a one-line message).

    ``eval`` is the ``none`` preset with zero steps, whatever a ``--config`` file says;
    ``--resume RUN`` without ``--config`` reads ``RUN/config.toml`` (flags still override it).
    """
    overrides = overrides_from_args(args)
    if args.command == "eval":
        overrides["preset"] = "none"
        overrides.setdefault("optim", {})["steps"] = 0
    config_file = args.config
    resume = overrides.get("run", {}).get("resume")
    if resume and not config_file:
        config_file = str(Path(resume) / "config.toml")
        if not Path(config_file).exists():
            raise ValueError(f"{resume}: not a run directory (no config.toml) - nothing to resume")
    return make_config(config_file=config_file, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .data import DataError

    try:
        if cfg.run.engine == "trl":
            from .integrations.trl_adapt import adapt_trl, end_distributed

            adapt_trl(cfg)
            end_distributed()
        else:
            from .loop import adapt

            adapt(cfg)
    except (DataError, ValueError, FileNotFoundError, OSError, ImportError) as exc:
        if os.environ.get("SPINE_TTRL_DEBUG"):
            raise
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
