"""`mopd score --url URL --input in.jsonl --output out.jsonl`: log-probs from an SGLang server.

Each input line is `{"input_ids": [...]}`; each output line is `{"logprobs": [...]}`
with `len(input_ids) - 1` floats, `logprobs[i - 1]` = log p(input_ids[i] | input_ids[:i])
(the convention of `mopd logprobs`, shifted by the first token, which has no context).
With `--top-k K` each line also has `top_ids` and `top_logprobs` (K per position).
Blank input lines are skipped; output line n answers the n-th record. The output is
written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mopd score` (no heavy imports here)."""
    parser.add_argument(
        "--url",
        action="append",
        required=True,
        help="server URL (SGLang, `mopd serve` or sglang-router); repeat for several",
    )
    parser.add_argument("--input", required=True, help='JSONL, one {"input_ids": [...]} per line')
    parser.add_argument("--output", required=True, help='JSONL, one {"logprobs": [...]} per line')
    parser.add_argument("--top-k", type=int, default=0, help="also return the top-k per position")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per request")
    parser.add_argument("--max-in-flight", type=int, default=8, help="concurrent requests")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=3, help="retries per request")
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the servers to be healthy"
    )


def run(args: argparse.Namespace) -> int:
    """Score every record and write the log-probs."""
    import os
    import sys

    import orjson
    from tqdm import tqdm

    from megatron_mopd.errors import UserError
    from megatron_mopd.sglang.client import SGLangClient

    if args.top_k < 0 or args.batch_size < 1 or args.max_in_flight < 1:
        raise UserError("--top-k must be >= 0, --batch-size and --max-in-flight >= 1")
    from megatron_mopd.commands.jsonl import read_field, token_ids_problem

    seqs = [ids for _, ids in read_field(args.input, "input_ids", token_ids_problem)]
    tmp = f"{args.output}.tmp{os.getpid()}"
    chunk = max(args.batch_size * args.max_in_flight * 4, 1024)
    with SGLangClient(
        args.url,
        timeout=args.timeout,
        max_retries=args.max_retries,
        max_in_flight=args.max_in_flight,
        name="mopd score",
    ) as client:
        if args.wait > 0:
            client.wait_healthy(args.wait)
        try:
            out = open(tmp, "wb")
        except OSError as e:
            raise UserError(f"{args.output}: cannot write: {e.strerror or e}") from None
        try:
            with (
                out,
                tqdm(
                    total=len(seqs), unit="seq", file=sys.stderr, disable=None, desc="scoring"
                ) as bar,
            ):
                for lo in range(0, len(seqs), chunk):
                    part = client.score(
                        seqs[lo : lo + chunk],
                        top_k=args.top_k,
                        batch_size=args.batch_size,
                        progress=bar.update,
                        index_offset=lo,
                    )
                    for s in part:
                        rec: dict = {"logprobs": s.logprobs}
                        if args.top_k:
                            rec["top_ids"] = s.top_ids.tolist()
                            rec["top_logprobs"] = s.top_logprobs.tolist()
                        out.write(orjson.dumps(rec) + b"\n")
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    print(f"mopd score: wrote {len(seqs)} records to {args.output}", file=sys.stderr)
    return 0
