"""Per-GPU memory of a recipe's train step, from the config alone (`student.memory`).

    python tools/memory_model.py examples/qwen3_30b_a3b/mopd.yaml --world-size 16
    python tools/memory_model.py RECIPE --world-size 16 model.recompute_granularity=full ...

Prints, for the worst pipeline stage, the bytes of the weights, the fp32 gradients, the
Adam state (sharded by the distributed optimizer: dense over DP, experts over expert-DP),
the activations (with the recomputation and micro-batch settings of the recipe, times the
micro-batches the 1F1B schedule keeps in flight) and the logits, then every stage's total
and the headroom against `--gpu-memory-gb` (80). `--compare` also prints the total with
each memory feature switched off, one at a time. What the estimate leaves out is in
`megatron_mopd/student/memory.py`.

The keys `model.recompute_*`, `model.logits_chunk_tokens`, `model.make_vocab_size_
divisible_by` and `train.max_tokens_per_microbatch` are read even where this checkout's
config does not define them yet (they are taken out of the recipe before it is validated
and set afterwards).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_recipe(path: str, overrides: list[str]):
    """The recipe's config tree (`config.load_config`)."""
    from megatron_mopd.config import load_config

    return load_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    from megatron_mopd.errors import ConfigError
    from megatron_mopd.student.memory import GIB, estimate_memory, format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--world-size", type=int, default=None, metavar="N")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, metavar="GB")
    parser.add_argument("--compare", action="store_true", help="each feature off, one at a time")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        p = cfg.parallel
        world = args.world_size or p.tp * p.pp
        est = estimate_memory(cfg, world)
        print(f"{args.recipe} at world size {world}")
        print(format_table(est, args.gpu_memory_gb))
        if args.compare:
            print("\nwith one feature off:")
            for name, section, key, value in (
                ("no recomputation", "model", "recompute_granularity", None),
                ("whole logits", "model", "logits_chunk_tokens", 0),
                ("no token budget", "train", "max_tokens_per_microbatch", 0),
            ):
                other = copy.deepcopy(cfg)
                object.__setattr__(getattr(other, section), key, value)
                total = estimate_memory(other, world).total_bytes
                print(f"  {name:<24} {total / GIB:9.2f} GiB")
            other = copy.deepcopy(cfg)
            other.parallel.use_distributed_optimizer = False
            total = estimate_memory(other, world).total_bytes
            print(f"  {'no distributed optimizer':<24} {total / GIB:9.2f} GiB")
    except (ConfigError, OSError) as e:
        print(f"memory_model: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
