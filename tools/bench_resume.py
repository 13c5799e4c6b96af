"""Peak memory and time of resuming a training state (model + distributed optimizer).

    python tools/bench_resume.py                  # Qwen3-MoE-like, ~100M params, bf16
    python tools/bench_resume.py --dtype fp32 --layers 2

Builds the student (hidden 512, 8 experts of 1024 top-2, vocabulary 32,000; bf16 weights
with fp32 main parameters, or fp32) with megatron's distributed optimizer on one gloo rank,
saves its training state (`student.state.save_training_state`) in both optimizer formats,
then resumes it (`load_training_state`) in fresh processes, interleaved `--rounds` times:

- `fully_reshardable` (the default `checkpoint.optimizer_format`), as the trainer does: the
  experts' fused fc1 (saved as two halves through a `ShardedTensorFactory`) merges into the
  parameter it was loaded into (`convert.dist_ckpt.merge_in_place`);
- `fully_reshardable, concat`: the same with megatron-core's own merge, which concatenates
  the halves into new tensors (the trainer's behaviour before; `merge_in_place` patched
  out in that process);
- `dp_reshardable` (`checkpoint.optimizer_format=dp_reshardable`).

Each process samples its RSS every 20 ms while loading. Reported: the steady state before
loading (model + optimizer built), the peak while loading above it, as a multiple of the
model's weights in bytes, and the load time; the lowest of the rounds (the machine may be
shared). Both resumed states are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def model_config(args: argparse.Namespace):
    from megatron_mopd.config import ModelConfig

    return ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=3 * args.hidden,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=args.hidden // 8,
        vocab_size=args.vocab,
        qk_layernorm=True,
        num_moe_experts=args.experts,
        moe_router_topk=2,
        moe_ffn_hidden_size=args.expert_size,
        params_dtype=args.dtype,
        transformer_impl="local",
    )


def _build(args: argparse.Namespace):
    from megatron_mopd import distributed
    from megatron_mopd.config import ParallelConfig, TrainConfig
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    parallel = ParallelConfig(use_distributed_optimizer=True)
    cfg = model_config(args)
    distributed.init_distributed(parallel, cfg, seed=0)
    chunks = wrap_ddp(build_model(cfg, parallel), parallel)
    optimizer, scheduler = build_optimizer(chunks, TrainConfig(lr=1e-4, max_steps=10), parallel)
    return cfg, chunks, optimizer, scheduler


def _weights_bytes(chunks) -> int:
    return sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _digest(chunks, optimizer) -> list[float]:
    """Sums of the model's weights and of the optimizer's state, to compare two resumes."""
    import torch

    from megatron_mopd.student.state import _megatron_optimizers

    out = [float(sum(p.double().sum() for c in chunks for p in c.parameters()))]
    for opt in _megatron_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                for v in opt.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.numel() > 1:
                        out.append(float(v.double().abs().sum()))
    return out


def child(args: argparse.Namespace) -> None:
    """One phase in this process: `save`, or a resume (`in-place` / `concat`)."""
    import torch

    from megatron_mopd.student import state

    cfg, chunks, optimizer, scheduler = _build(args)
    if args.phase.startswith("save"):
        with torch.no_grad():  # non-zero moments, so that the resume has something to load
            state.ensure_optimizer_state(optimizer)
            for opt in state._megatron_optimizers(optimizer):
                for group in opt.optimizer.param_groups:
                    for p in group["params"]:
                        for v in opt.optimizer.state[p].values():
                            if torch.is_tensor(v) and v.numel() > 1:
                                v.uniform_(0.0, 1e-3)
        fmt = args.phase.split(":")[1]
        state.save_training_state(
            chunks, optimizer, scheduler, args.ckpt, model_cfg=cfg, optimizer_format=fmt
        )
        print(json.dumps({"weights": _weights_bytes(chunks)}))
        return
    if args.phase.endswith("concat"):
        import megatron_mopd.convert.dist_ckpt as dist_ckpt

        dist_ckpt.merge_in_place = lambda sharded: None
    state.ensure_optimizer_state(optimizer)
    import gc

    gc.collect()
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    state.load_training_state(chunks, optimizer, scheduler, args.ckpt)
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    print(
        json.dumps(
            {
                "before": before,
                "peak_above": peak[0] - before,
                "seconds": seconds,
                "weights": _weights_bytes(chunks),
                "digest": _digest(chunks, optimizer),
            }
        )
    )


def run(args: argparse.Namespace, phase: str, ckpt: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--ckpt", ckpt]
    for k in ("layers", "hidden", "experts", "expert_size", "vocab", "dtype"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    env.update(LOCAL_RANK="0")
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{phase} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Parse flags; save once, resume both ways, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-size", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return
    variants = {  # name: (checkpoint, phase)
        "fully_reshardable": ("fully_reshardable", "in-place"),
        "fully_reshardable, concat": ("fully_reshardable", "concat"),
        "dp_reshardable": ("dp_reshardable", "in-place"),
    }
    with tempfile.TemporaryDirectory(prefix="mopd_bench_resume_") as work:
        t0 = time.perf_counter()
        for fmt in ("fully_reshardable", "dp_reshardable"):
            weights = run(args, f"save:{fmt}", os.path.join(work, fmt))["weights"]
        print(
            f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of "
            f"{args.expert_size}, vocabulary {args.vocab}, {args.dtype}: weights "
            f"{weights / 2**20:.0f} MiB; 2 training states saved in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, (fmt, phase) in variants.items():
                r = run(args, phase, os.path.join(work, fmt))
                if name not in best or r["peak_above"] < best[name]["peak_above"]:
                    best[name] = r
        digests = {json.dumps(r["digest"]) for r in best.values()}
        if len(digests) != 1:
            sys.exit("the resumes differ")
        print(
            f"{'resume':26s} {'before load':>12s} {'peak above':>11s} {'x weights':>10s} {'s':>6s}"
        )
        for name, r in best.items():
            print(
                f"{name:26s} {r['before'] / 2**20:8.0f} MiB {r['peak_above'] / 2**20:7.0f} MiB "
                f"{r['peak_above'] / weights:9.2f}x {r['seconds']:6.1f}"
            )
        print(
            "peak above: RSS while loading above the steady state before it (model and "
            "optimizer built); all resumed states equal."
        )


if __name__ == "__main__":
    main()
