"""Padding and step time: fixed micro-batches against token-budget micro-batches.

    python tools/bench_microbatch.py                  # plan at DP1 and DP8 + a timed step
    python tools/bench_microbatch.py --no-step        # the padding figures only (1 s)

1. Padding (no model; what each layout would feed the forward passes). A global batch
   of `--sequences` rollouts (default 256): prompts of 64-512 tokens (uniform), responses
   log-normal (median `--median` tokens, sigma 0.8) clipped to `--max-response` (8,192).
   Today's layout (`train.micro_batch_size`, every micro-batch padded to the step's
   longest sequence) against `train.max_tokens_per_microbatch` (sorted by length, greedy
   fill, each micro-batch padded to its own longest, the count agreed over DP with empty
   micro-batches), at DP1 and DP8 (each rank's share planned as `mopd_step` does).
   Printed: tokens processed (real + padding), the padding, the share of today's padding
   the budget saves, the micro-batch counts.
2. Step time (unless `--no-step`): one `mopd_train_step` of a small MoE student on CPU,
   the same distribution scaled down (responses up to 1,024 tokens, 32 sequences),
   fixed micro-batches of 4 against a 4,096-token budget: seconds per step (best of
   `--steps` after a warm-up, the two variants interleaved) and the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample_lengths(n: int, median: float, max_response: int, seed: int = 0) -> list[int]:
    """Prompt + response lengths: prompts U[64, 512], responses log-normal, clipped."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(64, 513, (n,), generator=g)
    responses = torch.exp(math.log(median) + 0.8 * torch.randn(n, generator=g))
    responses = responses.round().clamp(1, max_response).long()
    return (prompts + responses).tolist()


def fixed_tokens(lengths: list[int], dp: int, mbs: int) -> tuple[int, int]:
    """(tokens processed per step over all ranks, micro-batches per rank) of today's layout."""
    per_rank = math.ceil(len(lengths) / dp)
    count = max(1, math.ceil(per_rank / mbs))
    rows = max(1, math.ceil(per_rank / count))
    return dp * count * rows * max(lengths), count


def budget_tokens(lengths: list[int], dp: int, budget: int) -> tuple[int, int, int]:
    """(tokens processed over all ranks, agreed micro-batches per rank, max over ranks of
    the busiest rank's tokens) with token-budget micro-batches."""
    import torch

    from megatron_mopd.student.micro_batches import padded_tokens, plan_token_budget

    shares = torch.tensor_split(torch.arange(len(lengths)), dp)
    plans, per_rank = [], []
    for share in shares:
        mine = [lengths[i] for i in share.tolist()]
        groups = plan_token_budget(mine, budget)
        plans.append(len(groups))
        per_rank.append(padded_tokens(groups, mine))
    count = max(plans)
    empty = sum(count - p for p in plans)  # one token each
    return sum(per_rank) + empty, count, max(per_rank)


def padding_report(args) -> None:
    lengths = sample_lengths(args.sequences, args.median, args.max_response)
    real = sum(lengths)
    print(
        f"global batch: {len(lengths)} sequences, {real:,} tokens, longest {max(lengths):,}, "
        f"median {sorted(lengths)[len(lengths) // 2]:,}"
    )
    print(f"{'layout':<34}{'processed':>14}{'padding':>14}{'pad saved':>11}{'mb/rank':>9}")
    for dp in (1, 8):
        base_pad = None
        for mbs in (1, 4):
            tokens, count = fixed_tokens(lengths, dp, mbs)
            pad = tokens - real
            base_pad = pad if mbs == 1 else base_pad
            print(
                f"{f'DP{dp} micro_batch_size={mbs}':<34}{tokens:>14,}{pad:>14,}{'':>11}{count:>9}"
            )
        for budget in args.budgets:
            tokens, count, busiest = budget_tokens(lengths, dp, budget)
            pad = tokens - real
            saved = 1 - pad / base_pad
            print(
                f"{f'DP{dp} max_tokens_per_microbatch={budget}':<34}{tokens:>14,}{pad:>14,}"
                f"{saved:>10.1%}{count:>9}"
            )
        print(f"  (pad saved: against DP{dp} micro_batch_size=1)")


def step_report(args) -> None:
    import torch

    from megatron_mopd import distributed
    from megatron_mopd.batch import TrainBatch
    from megatron_mopd.config import LossConfig, ModelConfig, ParallelConfig, TrainConfig
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    torch.set_num_threads(1)
    model = ModelConfig(
        num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
        num_query_groups=2, vocab_size=512, num_moe_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=128, max_position_embeddings=2048,
    )  # fmt: skip
    parallel = ParallelConfig()
    distributed.init_distributed(parallel, model, seed=0)
    chunks = wrap_ddp(build_model(model, parallel), parallel)
    optimizer, _ = build_optimizer(chunks, TrainConfig(lr=1e-5, lr_warmup_steps=0), parallel)
    lengths = [min(n, 1024 + 64) for n in sample_lengths(32, 256, 1024, seed=1)]
    B, T = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
        mask[i, min(64, n - 1) : n] = 1.0
    batch = TrainBatch(
        tokens_B_T=tokens, mask_B_T=mask, rollout_logprobs_B_T=-6.0 * mask,
        teacher_logprobs_B_T=-6.0 * mask, orm_advantages_B=torch.zeros(B),
        domain_ids_B=torch.zeros(B, dtype=torch.long), domains=["d"],
        lengths_B=torch.tensor(lengths),
    )  # fmt: skip
    cfg = LossConfig()
    variants = {
        "micro_batch_size=4": dict(micro_batch_size=4),
        "max_tokens_per_microbatch=4096": dict(micro_batch_size=4, max_tokens_per_microbatch=4096),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(args.steps + 1):
        for name, kw in variants.items():
            start = time.perf_counter()
            mopd_train_step(chunks, optimizer, batch, cfg, kw.pop("micro_batch_size", 4), **kw)
            variants[name] = {"micro_batch_size": 4, **kw}
            if round_:
                times[name].append(time.perf_counter() - start)
    print(f"\nstep time, {B} sequences, {sum(lengths):,} tokens (longest {T}), DP1 on CPU:")
    best = {k: min(v) for k, v in times.items()}
    for name, t in best.items():
        print(f"  {name:<34}{t:8.2f} s/step")
    fixed, budget = best["micro_batch_size=4"], best["max_tokens_per_microbatch=4096"]
    print(f"  token budget / fixed: {budget / fixed:.2f}x the time")
    distributed.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--median", type=float, default=1500.0)
    parser.add_argument("--max-response", type=int, default=8192)
    parser.add_argument("--budgets", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-step", action="store_true")
    args = parser.parse_args()
    padding_report(args)
    if not args.no_step:
        step_report(args)


if __name__ == "__main__":
    main()
