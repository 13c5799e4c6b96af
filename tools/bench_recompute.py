"""Peak memory and step time of activation recomputation: none, full, selective.

    python tools/bench_recompute.py                 # 2,048 tokens, hidden 256, 4 layers
    python tools/bench_recompute.py --tokens 4096 --steps 3

Each case runs in its own process (so peak RSS is its own): a Qwen3-MoE-like student
(fp32, hidden `--hidden`, `--layers` layers, 8 experts top-2, vocabulary 4,096) built on
CPU, then `--steps` MOPD train steps (after one warm-up) on one sequence of `--tokens`
tokens. Reported per case: the step's peak RSS above the RSS before the first step (the
activations, logits and gradients the step adds, and Adam's state, allocated by the
warm-up step, the same in every case; `ru_maxrss` minus the resident size after the model
and optimizer were built), the total peak RSS, seconds per step (best), and both
as ratios to no recomputation. Cases: none; full (uniform, 1 layer per unit: every layer's
input kept, the rest recomputed); full block (half the layers); selective (megatron's
default `core_attn`); selective with core_attn, layernorm and moe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    "none": {},
    "full uniform 1": {"granularity": "full", "method": "uniform", "num_layers": 1},
    "full block L/2": {"granularity": "full", "method": "block", "num_layers": "half"},
    "selective core_attn": {"granularity": "selective"},
    "selective attn+norm+moe": {
        "granularity": "selective",
        "modules": ["core_attn", "layernorm", "moe"],
    },
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(name: str, args) -> dict:
    """One case in this process: build, warm up, time `args.steps` steps."""
    import torch

    from megatron_mopd import distributed
    from megatron_mopd.batch import TrainBatch
    from megatron_mopd.config import LossConfig, ModelConfig, ParallelConfig, TrainConfig
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    torch.set_num_threads(1)
    rc = dict(CASES[name])
    if rc.get("num_layers") == "half":
        rc["num_layers"] = max(1, args.layers // 2)
    model = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        num_attention_heads=4, num_query_groups=2, kv_channels=args.hidden // 4,
        vocab_size=4096, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=args.hidden,
        max_position_embeddings=args.tokens, **{f"recompute_{k}": v for k, v in rc.items()},
    )  # fmt: skip
    model.validate("model")
    parallel = ParallelConfig()
    distributed.init_distributed(parallel, model, seed=0)
    chunks = wrap_ddp(build_model(model, parallel), parallel)
    optimizer, _ = build_optimizer(chunks, TrainConfig(lr=1e-6, lr_warmup_steps=0), parallel)
    T = args.tokens
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, T)
    mask[:, :16] = 0
    batch = TrainBatch(
        tokens_B_T=torch.randint(3, model.vocab_size, (1, T), generator=g), mask_B_T=mask,
        rollout_logprobs_B_T=-8.0 * mask, teacher_logprobs_B_T=-8.0 * mask,
        orm_advantages_B=torch.zeros(1), domain_ids_B=torch.zeros(1, dtype=torch.long),
        domains=["d"], lengths_B=torch.tensor([T]),
    )  # fmt: skip
    before = _rss_mb()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        out = mopd_train_step(chunks, optimizer, batch, LossConfig(), 1)
        if step:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    distributed.destroy()
    return {
        "step_peak_mb": peak - before,
        "peak_mb": peak,
        "seconds": min(times),
        "loss": out["loss"],
        "grad_norm": out["grad_norm"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args)))
        return
    print(
        f"MOPD step, 1 sequence of {args.tokens} tokens, hidden {args.hidden}, {args.layers} "
        "layers, 8 experts top-2, vocabulary 4096, fp32, CPU, one process per case"
    )
    print(
        f"{'case':<26}{'step peak MB':>13}{'ratio':>7}{'peak RSS MB':>13}{'s/step':>8}{'ratio':>7}  loss / grad norm"
    )
    base = None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "hidden", "layers", "steps")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name:<26} failed:\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        base = base or r
        print(
            f"{name:<26}{r['step_peak_mb']:>13.0f}{r['step_peak_mb'] / base['step_peak_mb']:>7.2f}"
            f"{r['peak_mb']:>13.0f}{r['seconds']:>8.2f}{r['seconds'] / base['seconds']:>7.2f}"
            f"  {r['loss']:.6f} / {r['grad_norm']:.6f}"
        )


if __name__ == "__main__":
    main()
