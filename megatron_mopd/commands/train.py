"""`mopd train RECIPE.yaml [key=value ...]`: run MOPD training (under torchrun for N ranks).

    torchrun --nproc-per-node 2 -m megatron_mopd train examples/toy/mopd.yaml train.max_steps=50

A run resumes by itself from the newest valid checkpoint in `RUN_DIR/checkpoints`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mopd train`."""
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.max_steps=10"
    )


def run(args: argparse.Namespace) -> int:
    """Load and validate the recipe, then train."""
    from megatron_mopd.config import load_config
    from megatron_mopd.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    train(cfg)
    return 0
