"""Convert a Hugging Face model folder into a Megatron checkpoint (megatron-core torch_dist).

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out MCORE_DIR [--dtype bf16]
    torchrun --nproc-per-node 4 tools/convert_hf_to_mcore.py --hf HF_DIR --out MCORE_DIR \\
        --tp 2 --ep 2 --etp 1

The same as `mopd convert hf-to-mcore` (see `megatron_mopd.convert.mcore.hf_to_mcore`).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the conversion; a user error is one line on stderr."""
    from megatron_mopd.commands.convert import add_hf_to_mcore_arguments, parallel_from_args
    from megatron_mopd.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_hf_to_mcore_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from megatron_mopd.convert.mcore import hf_to_mcore

        out = hf_to_mcore(
            args.hf,
            args.out,
            parallel_from_args(args),
            params_dtype=args.dtype,
            tokenizer_dir=args.tokenizer,
            layer_spec=args.transformer_impl,
        )
    except UserError as e:  # raised alike on every rank: said once
        if os.environ.get("RANK", "0") == "0":
            print(f"convert_hf_to_mcore: error: {e}", file=sys.stderr, flush=True)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer starts processes: keep the guard
    sys.exit(main())
