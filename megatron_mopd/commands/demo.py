"""`mopd demo`: the CPU demo (`make demo`): toy teachers, a weak student, MOPD, a table."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mopd demo`."""
    parser.add_argument("--run-dir", default="runs/demo", help="where everything is written")
    parser.add_argument(
        "--nproc", type=int, default=1, help="training processes (torchrun when > 1)"
    )
    parser.add_argument(
        "--sglang",
        action="store_true",
        help="rollouts and teachers on real SGLang servers started here (needs `make sglang`)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of examples/toy/mopd.yaml"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from megatron_mopd.toy.demo import run_demo

    run_demo(args.run_dir, args.nproc, args.overrides, sglang=args.sglang)
    return 0  # the table and summary.json say whether the student reached its teachers
