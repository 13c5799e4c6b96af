"""Convert a Megatron checkpoint (written by `mopd convert hf-to-mcore`, any layout) into a
Hugging Face folder that transformers and SGLang load.

    python tools/convert_mcore_to_hf.py --mcore MCORE_DIR --out HF_DIR [--dtype bf16]

The same as `mopd convert mcore-to-hf` (see `megatron_mopd.convert.mcore.mcore_to_hf`).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the conversion; a user error is one line on stderr."""
    from megatron_mopd.commands.convert import (
        add_mcore_to_hf_arguments,
        parallel_from_args,
        parse_size,
    )
    from megatron_mopd.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mcore_to_hf_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from megatron_mopd.convert.mcore import mcore_to_hf

        out = mcore_to_hf(
            args.mcore,
            args.out,
            dtype=args.dtype,
            parallel=parallel_from_args(args),
            tokenizer_dir=args.tokenizer,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    except UserError as e:  # raised alike on every rank: said once
        if os.environ.get("RANK", "0") == "0":
            print(f"convert_mcore_to_hf: error: {e}", file=sys.stderr, flush=True)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer starts processes: keep the guard
    sys.exit(main())
