"""Peak memory and time of one MOPD training step against a plain next-token step.

    python tools/bench_loss.py                      # vocab 151,936, 8,192 response tokens
    python tools/bench_loss.py --tokens 1024 --topk 20 --rounds 1

Every variant runs in its own process (a fresh peak-RSS counter), single rank, on the same
batch (one sequence: a 16-token prompt and `--tokens` response tokens) and the same tiny
dense student (`--hidden`, `--layers`, vocabulary `--vocab`), through megatron's schedule,
DDP and Adam:

- `plain`: `train_step` with the token-mean next-token NLL (`next_token_loss`);
- `mopd`: `mopd_train_step` with the sampled-token estimator (IcePop, the default);
- `mopd_topk` (with `--topk K`): `mopd_train_step` with `topk_reverse_kl` on K ids.

Reported per variant: the process's peak RSS, the RSS just before the first step (model,
optimizer, imports) and the difference (what the step itself needs), and the step time
in wall and CPU seconds (minimum over `--repeats` steps after one warm-up step, and over
`--rounds` alternating processes). The check: MOPD at most 1.05x the peak memory and
1.10x the CPU time of the plain step; CPU time, because on a shared machine wall time
mostly measures the neighbours. On GPU, memory comes from the CUDA allocator instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LIMITS = {"memory": 1.05, "time": 1.10}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_batch(args: argparse.Namespace, prompt: int, T: int):
    """One `[1, T]` MOPD batch of random tokens, its last T - prompt the response, with
    log mu and teacher log-probs near -12 and a random `K`-entry teacher top-k."""
    import torch

    from megatron_mopd.batch import TrainBatch

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, T)
    mask[0, prompt:] = 1.0
    K = max(args.topk, 1)
    return TrainBatch(
        tokens_B_T=torch.randint(0, args.vocab, (1, T), generator=g),
        mask_B_T=mask,
        rollout_logprobs_B_T=(-12.0 + 0.1 * torch.randn(1, T, generator=g)) * mask,
        teacher_logprobs_B_T=(-12.0 + torch.randn(1, T, generator=g)) * mask,
        orm_advantages_B=torch.zeros(1),
        domain_ids_B=torch.zeros(1, dtype=torch.long),
        domains=["default"],
        lengths_B=torch.tensor([T]),
        teacher_topk_ids_B_T_K=torch.randint(0, args.vocab, (1, T, K), generator=g),
        teacher_topk_logprobs_B_T_K=torch.log_softmax(torch.randn(1, T, K + 1), -1)[..., :K],
    )


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Build the student, run 1 + `repeats` steps of `variant`, return its figures."""
    import torch

    from megatron_mopd.config import LossConfig, ModelConfig, ParallelConfig, TrainConfig
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.mopd_step import micro_batches_for_rank, mopd_train_step
    from megatron_mopd.student.train_step import (
        build_optimizer,
        next_token_loss,
        train_step,
        wrap_ddp,
    )

    torch.set_num_threads(args.threads)
    prompt, T = 16, 16 + args.tokens
    model = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=4 * args.hidden,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=args.vocab,
        max_position_embeddings=T,
    )
    parallel = ParallelConfig()
    init_distributed(parallel, model, seed=0)
    chunks = wrap_ddp(build_model(model, parallel), parallel)
    optimizer, _ = build_optimizer(chunks, TrainConfig(lr=1e-5, lr_warmup_steps=0), parallel)

    batch = random_batch(args, prompt, T)
    mask = batch.mask_B_T
    if variant == "plain":
        micro_batches = micro_batches_for_rank(batch, 0, 1, 1)
        loss_fn = next_token_loss(float(mask.sum()))

        def step():
            return train_step(chunks, optimizer, micro_batches, loss_fn)
    else:
        estimator = "topk_reverse_kl" if variant == "mopd_topk" else "sampled"
        cfg = LossConfig(estimator=estimator)

        def step():
            return mopd_train_step(chunks, optimizer, batch, cfg, micro_batch_size=1)

    cuda = torch.cuda.is_available()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    times, cpu_times = [], []
    for _ in range(1 + args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    destroy()
    return {
        "variant": variant,
        "peak_mb": peak,
        "before_step_mb": before,
        "step_mb": peak - before,
        "seconds": min(times[1:] or times),
        "cpu_seconds": min(cpu_times[1:] or cpu_times),
        "loss": float(out["loss"]),
    }


def loss_only_seconds(tokens: int, repeats: int = 20) -> dict[str, float]:
    """Forward + backward time of the two loss functions alone on `[1, T]` log-probs (what
    the MOPD step adds to the plain one, since both share the model and the log-probs)."""
    import torch

    from megatron_mopd.config import LossConfig
    from megatron_mopd.student.logprobs import MicroBatch
    from megatron_mopd.student.mopd_step import MopdLoss
    from megatron_mopd.student.train_step import next_token_loss

    T = 16 + tokens
    mask = torch.zeros(1, T)
    mask[0, 16:] = 1
    data = {
        "rollout_logprobs_B_T": -12 + 0.1 * torch.randn(1, T),
        "teacher_logprobs_B_T": -12 + torch.randn(1, T),
        "orm_advantages_B": torch.zeros(1),
        "domain_ids_B": torch.zeros(1, dtype=torch.long),
        "valid_B": torch.ones(1),
    }
    mb = MicroBatch(torch.zeros(1, T, dtype=torch.long), torch.tensor([T]), mask, data)
    fns = {"plain": next_token_loss(float(mask.sum())), "mopd": MopdLoss(LossConfig(), ["d"], 1)}
    out = {}
    for name, fn in fns.items():
        best = float("inf")
        for _ in range(repeats):
            lp = (-12 + 0.1 * torch.randn(1, T)).requires_grad_(True)
            start = time.perf_counter()
            fn(lp, mb)[0].backward()
            best = min(best, time.perf_counter() - start)
        out[name] = best
    return out


def compare(results: dict[str, dict]) -> list[str]:
    """Lines of the report, ratios against `plain`, and the verdict per MOPD variant."""
    base = results["plain"]
    lines = [
        f"{'variant':<10} {'peak MB':>9} {'before MB':>10} {'step MB':>9} {'wall s':>8} "
        f"{'cpu s':>8} {'peak x':>7} {'step-mem x':>10} {'wall x':>7} {'cpu x':>7}"
    ]
    for name, r in results.items():
        peak_x = r["peak_mb"] / base["peak_mb"]
        step_x = r["step_mb"] / base["step_mb"]
        wall_x = r["seconds"] / base["seconds"]
        cpu_x = r["cpu_seconds"] / base["cpu_seconds"]
        verdict = ""
        if name != "plain":
            ok = peak_x <= LIMITS["memory"] and cpu_x <= LIMITS["time"]
            verdict = "  PASS" if ok else "  FAIL"
        lines.append(
            f"{name:<10} {r['peak_mb']:>9.0f} {r['before_step_mb']:>10.0f} {r['step_mb']:>9.0f} "
            f"{r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} {peak_x:>7.3f} {step_x:>10.3f} "
            f"{wall_x:>7.3f} {cpu_x:>7.3f}{verdict}"
        )
    lines.append(
        f"limits: peak memory <= {LIMITS['memory']}x and CPU time <= {LIMITS['time']}x of plain "
        "(CPU time: wall time is shown but is noise on a shared machine)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=8192, help="response tokens")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--topk", type=int, default=0, help="also time the top-k estimator")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    if args.variant:  # a child process: one variant, figures on stdout
        print("RESULT " + json.dumps(run_variant(args.variant, args)), flush=True)
        return

    variants = ["plain", "mopd"] + (["mopd_topk"] if args.topk else [])
    child_args = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("json", "variant")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(__file__), *child_args, "--variant", variant]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(lines[-1][len("RESULT ") :]))
            r = runs[variant][-1]
            print(
                f"  {variant}: peak {r['peak_mb']:.0f} MB, step {r['seconds']:.2f} s wall, "
                f"{r['cpu_seconds']:.2f} s CPU",
                flush=True,
            )
    results = {
        v: {
            **min(rs, key=lambda r: r["cpu_seconds"]),
            "seconds": min(r["seconds"] for r in rs),
            "peak_mb": max(r["peak_mb"] for r in rs),
            "step_mb": max(r["step_mb"] for r in rs),
        }
        for v, rs in runs.items()
    }
    print(
        f"vocab {args.vocab}, {args.tokens} response tokens, hidden {args.hidden}, "
        f"{args.layers} layers, {args.threads} threads"
    )
    print("\n".join(compare(results)))
    alone = loss_only_seconds(args.tokens)
    print(
        f"loss functions alone (fwd + bwd on [1, {16 + args.tokens}] log-probs): plain "
        f"{alone['plain'] * 1e3:.2f} ms, mopd {alone['mopd'] * 1e3:.2f} ms"
    )
    results["loss_only_seconds"] = alone
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
