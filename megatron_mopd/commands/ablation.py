"""`mopd ablation`: ORM-only RL vs MOPD (alpha = 0, alpha > 0) and dense vs sampled, on the
CPU toy (`make ablation`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mopd ablation`."""
    from megatron_mopd.toy.ablation import ARM_GROUPS, ARM_NAMES, DEFAULT_ARMS

    parser.add_argument("--run-dir", default="runs/ablation", help="where the arms are written")
    parser.add_argument(
        "--toy-dir", default="runs/demo", help="the toy to reuse or build (the demo's by default)"
    )
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma-separated arms to run (default: {', '.join(DEFAULT_ARMS)}; also "
        f"{', '.join(n for n in ARM_NAMES if n not in DEFAULT_ARMS)}, and 'corrections' = "
        f"{', '.join(ARM_GROUPS['corrections'])})",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (recipe default)")
    parser.add_argument(
        "--mistake-rate",
        type=float,
        default=None,
        help="how often the weak student was taught the systematic mistake (toy default 0.7; "
        "higher: a weaker student, rarer rewards; use its own --toy-dir)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated train.seed values: every arm runs each (default: the recipe's)",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="training processes (torchrun when > 1)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of examples/toy/mopd.yaml"
    )


def run(args: argparse.Namespace) -> int:
    """Run the ablation."""
    from megatron_mopd.errors import UserError
    from megatron_mopd.toy.ablation import run_ablation

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise UserError(f"--seeds {args.seeds}: give comma-separated integers") from None
    run_ablation(
        args.run_dir,
        args.toy_dir,
        arms,
        args.steps,
        args.nproc,
        args.overrides,
        args.mistake_rate,
        seeds,
    )
    return 0
