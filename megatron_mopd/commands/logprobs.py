"""`mopd logprobs`: per-token log-probs of token sequences on the Megatron student.

    torchrun --nproc-per-node N -m megatron_mopd logprobs --hf HF_DIR \\
        --input in.jsonl --output out.jsonl [--tp T] [--pp P] [--ep E] [--etp X] \\
        [--micro-batch-size M]

Each input line is `{"input_ids": [...]}` (lengths may differ; blank lines are skipped).
Each output line, in the same order, is `{"logprobs": [...]}` with `len(input_ids) - 1`
floats: entry i-1 is log p(token i | tokens < i), for i = 1..n-1 (the project's log-prob
convention without the undefined first position). A 1-token sequence gives `[]`; a
0-token sequence is an error. The log-probs are computed vocabulary-parallel through
Megatron's forward-only schedule, at any TP/PP/EP/ETP layout (DP is what is left).

Every user error (a missing file, a line that is not JSON, a missing or malformed
`input_ids`, a token id outside the vocabulary, a sequence longer than the model's
`max_position_embeddings`, a layout that does not fit the world size or the model) is
reported as one line naming the file and line, before any process group exists; every
rank validates the same input the same way, so no rank waits for another that gave up.
The output is written by global rank 0 to a temporary file, then renamed.

`--mcore DIR` scores with a Megatron checkpoint (written by `mopd convert hf-to-mcore`)
instead of an HF folder; both go through `student.load` (`resolve_model_config`, then
`build_student`), which reads the architecture from the folder.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from megatron_mopd.commands.jsonl import read_field, token_ids_problem
from megatron_mopd.errors import ConfigError, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mopd logprobs` (no heavy imports here)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="HF_DIR", help="a Hugging Face model folder")
    src.add_argument(
        "--mcore", metavar="DIR", help="a Megatron checkpoint folder (mopd convert hf-to-mcore)"
    )
    parser.add_argument("--input", required=True, help='JSONL, one {"input_ids": [...]} a line')
    parser.add_argument("--output", required=True, help='JSONL, one {"logprobs": [...]} a line')
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument(
        "--etp", type=int, default=None, help="expert-tensor-parallel size (default: TP)"
    )
    parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="parameter dtype"
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this times TP (Megatron's; padding gets "
        "no probability)",
    )
    parser.add_argument(
        "--logits-chunk-tokens",
        type=int,
        default=512,
        help="output layer and log-softmax over chunks of this many tokens (0: whole logits)",
    )


def read_sequences(path: str) -> list[tuple[int, list[int]]]:
    """Read the input JSONL into (line number, token ids) pairs, checking its structure;
    `UserError` naming `path:line` on the first bad record. Blank lines are skipped.
    (Token ranges need the model's vocabulary: see `check_token_ranges`.)"""
    return read_field(path, "input_ids", token_ids_problem)


def check_token_ranges(
    path: str, records: list[tuple[int, list[int]]], vocab_size: int, max_length: int
) -> None:
    """`UserError` naming `path:line` for a token id >= `vocab_size` or a sequence longer
    than `max_length` (the model's `max_position_embeddings`)."""
    for lineno, ids in records:
        top = max(ids)
        if top >= vocab_size:
            j = ids.index(top)
            raise UserError(
                f'{path}:{lineno}: "input_ids"[{j}]={top} is outside the model\'s '
                f"vocabulary [0, {vocab_size})"
            )
        if len(ids) > max_length:
            raise UserError(
                f"{path}:{lineno}: {len(ids)} tokens exceed the model's "
                f"max_position_embeddings={max_length}"
            )


def _check_output(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"--output {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise UserError(f"--output {path}: is a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output {path}: directory {parent} is not writable")


def write_jsonl_atomic(path: str, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as JSONL to `path` via a temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Validate everything, then build the student at the layout and score the input."""
    try:
        model_cfg, parallel, sequences, rank = _validate(args)
    except UserError as e:
        # identical on every rank (nothing distributed has happened yet): a ConfigError is
        # reported once under torchrun (see cli.main)
        raise ConfigError(str(e)) from None
    if not sequences:
        if rank == 0:
            write_jsonl_atomic(args.output, [])
        return 0
    return _score(args, model_cfg, parallel, sequences)


def _validate(args: argparse.Namespace) -> tuple[Any, Any, list[list[int]], int]:
    """Every check before any process group exists: (model config, layout, sequences, rank)."""
    from megatron_mopd.config import ModelConfig, ParallelConfig, check_world_size

    if args.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size={args.micro_batch_size} must be a positive integer")
    records = read_sequences(args.input)
    _check_output(args.output)
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp,
    )
    parallel.validate("parallel")
    from megatron_mopd.distributed import torchrun_env

    rank, world_size, _ = torchrun_env()
    check_world_size(parallel, world_size)

    from megatron_mopd.student.load import resolve_model_config

    model_cfg = ModelConfig(
        hf_path=args.hf,
        mcore_path=args.mcore,
        params_dtype=args.dtype,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        logits_chunk_tokens=args.logits_chunk_tokens,
    )
    try:
        model_cfg.validate("model")
    except ConfigError as e:  # name the flag, not the config key
        flag = str(e).split("=")[0].removeprefix("model.").replace("_", "-")
        raise UserError(f"--{flag}: {e}") from None
    model_cfg = resolve_model_config(model_cfg, parallel)  # reads the folder's JSON only
    check_token_ranges(args.input, records, model_cfg.vocab_size, model_cfg.max_position_embeddings)
    return model_cfg, parallel, [ids for _, ids in records], rank


def _score(
    args: argparse.Namespace, model_cfg: Any, parallel: Any, sequences: list[list[int]]
) -> int:
    """Build the student at the layout (collective), score, write from rank 0."""
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.load import build_student

    layout = init_distributed(parallel, model_cfg, seed=model_cfg.seed)
    try:
        chunks, model_cfg = build_student(model_cfg, parallel)
        rows = score_data_parallel(chunks, sequences, args.micro_batch_size, layout)
        if layout.rank == 0:
            write_jsonl_atomic(args.output, [{"logprobs": r} for r in rows])
    finally:
        destroy()
    return 0


def score_data_parallel(
    chunks: list[Any], sequences: list[list[int]], micro_batch_size: int, layout: Any
) -> list[list[float]]:
    """Log-probs of `sequences`, split over the data-parallel ranks; returned on rank 0
    (in input order; `[]` elsewhere).

    DP rank d scores sequences d, d + dp, ...; shares are padded to equal length with
    1-token sequences so that every rank runs the same number of micro-batches (expert
    parallelism exchanges tokens across DP ranks in every forward pass).
    """
    import torch.distributed as dist

    from megatron_mopd.student.logprobs import forward_logprobs

    dp, d = layout.dp, layout.dp_rank
    index = list(range(d, len(sequences), dp))
    per_rank = -(-len(sequences) // dp)
    share = [sequences[i] for i in index] + [[0]] * (per_rank - len(index))
    for chunk in chunks:
        chunk.eval()
    logprobs = forward_logprobs(chunks, share, micro_batch_size)
    mine = [(i, lp.tolist()) for i, lp in zip(index, logprobs)]
    if layout.world_size == 1:
        gathered = [mine]
    else:
        gathered = [None] * layout.world_size if layout.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    if layout.rank != 0:
        return []
    rows: list[list[float] | None] = [None] * len(sequences)
    for part in gathered:
        for i, lp in part:
            rows[i] = lp
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"logprobs: no rank scored sequences {missing[:5]}")
    return rows
