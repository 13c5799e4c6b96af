"""`mopd mismatch TRAIN.jsonl INFERENCE.jsonl`: the train/inference mismatch of two runs.

TRAIN holds log pi (`mopd logprobs`: the Megatron student), INFERENCE log mu (`mopd
score`: an SGLang server) of the same input file: line n of each has the log-probs of the
same tokens. Over all tokens it prints

- d = log pi - log mu: mean (the bias), and |d| at its mean, median, 99th percentile, max;
- r = pi / mu, the importance ratio of the loss: mean |r - 1|, and the fractions of tokens
  IcePop would discard, r < eps_low and r > eps_high (defaults: `loss.eps_low`,
  `loss.eps_high`);
- the sequence with the largest |d| and where.

`--json` prints the same figures as one JSON object. The mismatch is worst for MoE
students, where a tiny difference flips an expert choice; this is how to measure it
before training.
"""

from __future__ import annotations

import argparse

from megatron_mopd.config import LossConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mopd mismatch` (no heavy imports here)."""
    parser.add_argument("train", help="JSONL of log pi (`mopd logprobs` output)")
    parser.add_argument("inference", help="JSONL of log mu (`mopd score` output)")
    parser.add_argument(
        "--eps-low", type=float, default=LossConfig.eps_low, help="IcePop lower bound"
    )
    parser.add_argument(
        "--eps-high", type=float, default=LossConfig.eps_high, help="IcePop upper bound"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def read_logprobs(path: str) -> list[list[float]]:
    """The `logprobs` of every record of a JSONL file; `UserError` names file and line."""
    from megatron_mopd.commands.jsonl import logprobs_problem, read_field

    return [lps for _, lps in read_field(path, "logprobs", logprobs_problem)]


def mismatch(
    train: list[list[float]], inference: list[list[float]], eps_low: float, eps_high: float
) -> dict:
    """The figures of the module doc for two lists of per-sequence log-probs of the same
    lengths (the caller checks them)."""
    import torch

    lengths = [len(x) for x in train]
    pi = torch.tensor([v for x in train for v in x], dtype=torch.float64)
    mu = torch.tensor([v for x in inference for v in x], dtype=torch.float64)
    d = pi - mu
    a = d.abs()
    r = d.exp()
    n = d.numel()
    out = {"sequences": len(train), "tokens": n}
    if n == 0:
        return out
    ranked = a.sort().values  # percentiles by nearest rank
    out.update(
        mean_diff=d.mean().item(),
        mean_abs_diff=a.mean().item(),
        p50_abs_diff=ranked[(n - 1) // 2].item(),
        p99_abs_diff=ranked[int(0.99 * (n - 1))].item(),
        max_abs_diff=a.max().item(),
        mean_abs_r_minus_1=(r - 1).abs().mean().item(),
        eps_low=eps_low,
        eps_high=eps_high,
        discard_low=(r < eps_low).double().mean().item(),
        discard_high=(r > eps_high).double().mean().item(),
    )
    worst = int(a.argmax())
    seq, offset = 0, worst
    while offset >= lengths[seq]:
        offset -= lengths[seq]
        seq += 1
    out.update(worst_sequence=seq, worst_token=offset + 1)  # token i has logprobs[i - 1]
    return out


def run(args: argparse.Namespace) -> int:
    """Read both files, check that they line up, print the figures."""
    import json

    from megatron_mopd.errors import UserError

    if not 0 <= args.eps_low <= 1 <= args.eps_high:
        raise UserError(
            f"need 0 <= --eps-low <= 1 <= --eps-high, got {args.eps_low} and {args.eps_high}"
        )
    train, inference = read_logprobs(args.train), read_logprobs(args.inference)
    if len(train) != len(inference):
        raise UserError(
            f"{args.train} has {len(train)} records, {args.inference} {len(inference)}: "
            "they must answer the same input file"
        )
    for k, (x, y) in enumerate(zip(train, inference)):
        if len(x) != len(y):
            raise UserError(
                f"record {k + 1}: {len(x)} log-probs in {args.train}, {len(y)} in "
                f"{args.inference}: not the same tokens"
            )
    m = mismatch(train, inference, args.eps_low, args.eps_high)
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"{m['sequences']} sequences, {m['tokens']} tokens")
    if not m["tokens"]:
        return 0
    print(
        f"d = log pi - log mu: mean {m['mean_diff']:+.3g}; |d| mean {m['mean_abs_diff']:.3g}, "
        f"median {m['p50_abs_diff']:.3g}, p99 {m['p99_abs_diff']:.3g}, max {m['max_abs_diff']:.3g}"
    )
    print(
        f"r = pi / mu: mean |r - 1| {m['mean_abs_r_minus_1']:.3g}; IcePop "
        f"[{m['eps_low']:g}, {m['eps_high']:g}] discards {100 * m['discard_low']:.3f}% "
        f"(r < {m['eps_low']:g}) and {100 * m['discard_high']:.3f}% (r > {m['eps_high']:g})"
    )
    print(
        f"largest |d|: record {m['worst_sequence'] + 1}, token {m['worst_token']} "
        f"(logprobs[{m['worst_token'] - 1}])"
    )
    return 0
