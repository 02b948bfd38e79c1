"""``mmalign train CONFIG [--set KEY=VALUE ...] [--resume]``: :func:`mmalign.training.train`.

Several processes: ``accelerate launch -m mmalign train CONFIG``; only rank 0 prints the
summary.

Example:
    >>> from mmalign.cli.main import main
    >>> main(["train", "run.yaml", "--set", "train.steps=20"])  # doctest: +SKIP
    trained 20 steps on 1 process(es); model: runs/digits/model
    0
"""

from __future__ import annotations

import argparse
import sys

from mmalign.cli.common import first_process

HELP = "train a model from a config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config path, ``--set`` overrides and ``--resume``."""
    parser.add_argument(
        "config", help="run config (YAML), e.g. mmalign/demo/configs/demo_digits.yaml"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (YAML value), e.g. --set train.steps=200; repeatable",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in train.output (fresh start when none)",
    )


def run(args: argparse.Namespace) -> int:
    """Train, then print the steps, processes, model directory and validation metrics.

    Status ``128 + signal`` (143, 130) when SIGTERM/SIGINT stopped the run after saving."""
    from mmalign.config.loading import precheck_config

    precheck_config(args.config, args.set)  # a typo is reported before torch loads
    from mmalign.training import TrainingInterrupted, train

    try:
        result = train(args.config, overrides=args.set, resume=args.resume)
    except TrainingInterrupted as interrupted:
        print(f"mmalign train: {interrupted}", file=sys.stderr)
        return interrupted.exit_status
    if not first_process():  # one summary from a multi-process launch
        return 0
    if result.already_finished:
        print(
            f"nothing to do: {result.output_dir} already finished its {result.steps} steps; "
            f"model: {result.model_dir} (raise train.steps to train on, or set train.output "
            "to a new directory)"
        )
        return 0
    print(
        f"trained {result.steps} steps on {result.world_size} process(es); "
        f"model: {result.model_dir}"
    )
    if result.metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if "/mean" in k)
        loss = result.metrics.get("val/loss", float("nan"))
        print(f"validation: val/loss {loss:.4g}, {shown}")
    return 0
