"""The `mopd` command line: argument parsing and dispatch only.

Each verb lives in `megatron_mopd/commands/<verb>.py` and exposes
`add_arguments(parser)` and `run(args) -> int | None`. Modules are imported only when
their verb runs, so `mopd --help` stays fast (megatron-core costs ~5 s to import).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megatron_mopd.errors import ConfigError, RunStopped, UserError

# verb -> (module under megatron_mopd.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("train", "run MOPD training from a YAML recipe"),
    "check": ("check", "validate a recipe and reach its teachers and rollout servers"),
    "convert": ("convert", "convert checkpoints between Hugging Face and Megatron"),
    "logprobs": ("logprobs", "per-token log-probs of token sequences on the Megatron student"),
    "score": ("score", "per-token log-probs of token sequences from an SGLang server"),
    "mismatch": ("mismatch", "train/inference mismatch of two log-prob files (logprobs vs score)"),
    "serve": ("serve", "serve a Hugging Face model on CPU behind SGLang's HTTP API"),
    "demo": ("demo", "the CPU demo: toy teachers, a weak student, MOPD, a table"),
    "ablation": ("ablation", "ORM-only RL vs MOPD (and dense vs sampled) on the CPU toy"),
}


def _available_verbs() -> dict[str, tuple[str, str]]:
    return {
        verb: spec
        for verb, spec in VERBS.items()
        if importlib.util.find_spec(f"megatron_mopd.commands.{spec[0]}") is not None
    }


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per available verb."""
    parser = argparse.ArgumentParser(prog="mopd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    sub.required = True
    for verb, (module, help_text) in _available_verbs().items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # add_arguments must not import heavy dependencies
        importlib.import_module(f"megatron_mopd.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `mopd` and `python -m megatron_mopd`."""
    args = build_parser().parse_args(argv)
    try:
        module = importlib.import_module(f"megatron_mopd.commands.{args._module}")
        code = module.run(args)
    except UserError as e:
        # under torchrun every rank usually hits the same user error: say it once
        rank = os.environ.get("RANK", "0")
        if isinstance(e, RunStopped) and e.reported:
            pass  # said by rank 0 before any rank exited
        elif rank == "0" or not isinstance(e, ConfigError | RunStopped):
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"{prefix}mopd {args.verb}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"mopd {args.verb}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
