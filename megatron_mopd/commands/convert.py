"""`mopd convert`: Hugging Face <-> Megatron checkpoints (thin wrappers over `convert.mcore`).

    mopd convert hf-to-mcore --hf HF_DIR --out MCORE_DIR [--dtype bf16]
    torchrun --nproc-per-node 4 -m megatron_mopd convert hf-to-mcore --hf HF_DIR \\
        --out MCORE_DIR --tp 2 --ep 2 --etp 1            # in parallel, for big models
    mopd convert mcore-to-hf --mcore MCORE_DIR --out HF_DIR [--dtype bf16]

`hf-to-mcore` writes a megatron-core dist_checkpointing folder (torch_dist) with the model's
architecture (`mopd_model.json`), HF config and tokenizer; it loads at any TP/PP/EP/ETP layout
(`mopd logprobs --mcore`, `model.mcore_path`). `mcore-to-hf` writes an HF folder
(`config.json`, safetensors with an index when sharded, tokenizer files) that
`transformers` and SGLang load, from a checkpoint saved at any layout. In one process the
model is handled whole; under torchrun, `--tp/--pp/--ep/--etp` split it (DP is what is left).
Supported architectures: Qwen2/Qwen2.5, Qwen3, Qwen3-MoE, Qwen2-MoE, Llama (no RoPE scaling).
"""

from __future__ import annotations

import argparse
import re

from megatron_mopd.errors import ConfigError, UserError

DTYPES = ("fp32", "bf16", "fp16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tp/--pp/--ep/--etp` (used under torchrun)."""
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (torchrun)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (torchrun)")
    parser.add_argument(
        "--etp", type=int, default=None, help="expert-tensor-parallel size (default: TP)"
    )


def add_hf_to_mcore_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `hf-to-mcore`."""
    parser.add_argument("--hf", required=True, metavar="HF_DIR", help="Hugging Face model folder")
    parser.add_argument("--out", required=True, metavar="MCORE_DIR", help="new checkpoint folder")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="stored dtype (default: the HF model's)"
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", default=None, help="tokenizer folder (default: HF_DIR)"
    )
    parser.add_argument(
        "--transformer-impl",
        choices=("local", "transformer_engine"),
        default=None,
        help="store the tensors under this layer spec's names (default: the spec built "
        "here, local on CPU); the checkpoint loads under both specs",
    )
    add_layout_arguments(parser)


def add_mcore_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mcore-to-hf`."""
    parser.add_argument("--mcore", required=True, metavar="MCORE_DIR", help="Megatron checkpoint")
    parser.add_argument("--out", required=True, metavar="HF_DIR", help="new HF folder")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="written dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", default=None, help="tokenizer folder (default: MCORE_DIR)"
    )
    parser.add_argument(
        "--max-shard-size",
        default="2GB",
        help="largest safetensors file, e.g. 2GB or 500MB (also the memory held while writing)",
    )
    add_layout_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mopd convert` (no heavy imports here)."""
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    sub.required = True
    add_hf_to_mcore_arguments(
        sub.add_parser("hf-to-mcore", help="Hugging Face folder -> Megatron checkpoint")
    )
    add_mcore_to_hf_arguments(
        sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> Hugging Face (SGLang) folder")
    )


def parse_size(text: str) -> int:
    """Bytes from `2GB`, `500MB`, `1.5GiB` or a plain number; `UserError` otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"--max-shard-size {text!r}: expected a size such as 2GB or 500MB")
    unit = (m.group(2) or "").lower()
    binary = "i" in unit
    base = unit[:1] if unit not in ("", "b") else unit
    factor = _UNITS[base] if not binary else 1024 ** ("kmgt".index(base) + 1)
    size = int(float(m.group(1)) * factor)
    if size < 1:
        raise UserError(f"--max-shard-size {text!r} must be positive")
    return size


def parallel_from_args(args: argparse.Namespace):
    """The `ParallelConfig` of `--tp/--pp/--ep/--etp`."""
    from megatron_mopd.config import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp,
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen conversion; prints where the result is (rank 0)."""
    try:
        out = _convert(args)
    except ConfigError:
        raise
    except UserError as e:
        # `convert.mcore` raises every user error on all ranks alike (checks before any
        # process group; later ones agreed collectively): under torchrun, say it once
        raise ConfigError(str(e)) from None
    from megatron_mopd.distributed import torchrun_env

    if torchrun_env()[0] == 0:
        print(f"mopd convert {args.direction}: wrote {out}", flush=True)
    return 0


def _convert(args: argparse.Namespace) -> str:
    from megatron_mopd.convert import mcore

    parallel = parallel_from_args(args)
    if args.direction == "hf-to-mcore":
        out = mcore.hf_to_mcore(
            args.hf,
            args.out,
            parallel,
            params_dtype=args.dtype,
            tokenizer_dir=args.tokenizer,
            layer_spec=args.transformer_impl,
        )
    else:
        out = mcore.mcore_to_hf(
            args.mcore,
            args.out,
            dtype=args.dtype,
            parallel=parallel,
            tokenizer_dir=args.tokenizer,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    return out
