"""Throughput of the Megatron student (forward + backward) at TP1, TP2 and EP2 on CPU,
against Hugging Face's Qwen3-MoE implementation of the same model, in one run.

    python tools/bench_student.py                 # hidden 256, 4 layers, 8 experts top-2
    python tools/bench_student.py --steps 3 --batch 2

The model: a Qwen3-MoE-like student (fp32, hidden 256, 4 layers, 8 experts top-2,
expert FFN 256, 4 heads of 64 with 2 KV groups, qk-norm, vocabulary 1024) on sequences of
256 tokens, a global batch of `--batch` sequences per step. Each layout runs in its own
process(es): TP1 in one process, together with HF transformers' `Qwen3MoeForCausalLM` of
the same size (same batch, micro-batches and loss), TP2 and EP2 under `torchrun` with 2
processes (EP2 splits the batch over the 2 ranks, TP2 gives both ranks the whole batch).
Reported per layout: global tokens / s of forward + backward (megatron's schedule,
per-token log-probs from vocabulary-sharded logits, next-token loss; no optimizer step)
and the peak RSS per rank (the student's, measured before the HF model is built). Also
(TP1): the same step under a `TorchFunctionMode` that inspects every torch call's
`device` argument -- the global alternative to the targeted CPU patches -- to show its
overhead. The machine may be shared: within a process the variants' steps are
interleaved and the best of `--steps` rounds (after a warm-up) is kept, so the TP1 / HF
ratio and the mode's overhead are robust to load; the layouts' absolute figures are not.

Response-length sweep (`--sweep`): how peak memory and tokens/s grow with the response
length, with each memory feature off and on.

    python tools/bench_student.py --sweep                       # 1k 2k 4k 8k 16k tokens
    python tools/bench_student.py --sweep --quick               # 1k 2k 4k, smaller model
    python tools/bench_student.py --sweep --lengths 2048 8192 --set model.params_dtype=bf16
    python tools/bench_student.py --sweep --variant "fc:model.recompute_granularity=full,\
        model.recompute_method=uniform,model.recompute_num_layers=1"

Each (length, variant) runs in its own process: one MOPD train step (`mopd_train_step`,
sampled estimator, Adam) of the student above but with vocabulary `--vocab` (default
32,768: the logits' `T x V` term is visible) on a step of two responses, one of T tokens
and one of T/4 (after a 64-token prompt), micro-batch size 2; best of `--steps` after a
warm-up. Printed per cell: the step's peak RSS above the RSS before it (MB) and
tokens/s. Variants are config overrides (`key.path=value`, as on the `mopd` command
line), applied on top of `--set`: `off` (every feature off), then one feature on at a
time: full recomputation, selective recomputation, token-budget micro-batches (a budget
of T tokens: the short response no longer padded to T) and, when the config has it
(`model.logits_chunk_tokens`), chunked logits; `--variant NAME:k=v,k=v` replaces them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SEQ = 256


def model_config():
    from megatron_mopd.config import ModelConfig

    return ModelConfig(
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=1024,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=64,
        vocab_size=1024,
        qk_layernorm=True,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=256,
        rotary_base=10000.0,
        max_position_embeddings=SEQ,
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sequences(n: int, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n, SEQ), generator=gen).tolist()


def _interleaved(fns: dict, steps: int) -> dict[str, float]:
    """Seconds per call of each function: one warm-up each, then `steps` rounds that call
    them in turn (so a shared machine's load hits all alike); the minimum per function."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def bench_megatron(layout: str, args: argparse.Namespace) -> list[dict]:
    """One layout's figures (run in each of its processes); at TP1 also HF's and the
    TorchFunctionMode's, interleaved with the student's steps."""
    import torch

    from megatron_mopd.config import ParallelConfig
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.logprobs import make_micro_batches, output_head, run_schedule
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.train_step import next_token_loss, wrap_ddp

    torch.set_num_threads(1)
    parallel = ParallelConfig(
        tensor_model_parallel_size=2 if layout == "tp2" else 1,
        expert_model_parallel_size=2 if layout == "ep2" else 1,
    )
    cfg = model_config()
    env = init_distributed(parallel, cfg, seed=0)
    chunks = wrap_ddp(build_model(cfg, parallel), parallel)
    seqs = _sequences(args.batch, cfg.vocab_size)
    share = len(seqs) // env.dp
    mine = seqs[env.dp_rank * share : (env.dp_rank + 1) * share]
    batches = make_micro_batches(mine, args.micro_batch, pad_to_multiple_of=env.tp)
    loss_fn = next_token_loss(args.batch * (SEQ - 1))

    def loss_func_for(mb):
        def loss_func(logits):
            loss, _ = loss_fn(output_head(chunks).token_logprobs_B_T(logits, mb.tokens_B_T), mb)
            return loss, torch.tensor(0, dtype=torch.int), {"loss": float(loss.detach())}

        return loss_func

    def step():
        for chunk in chunks:
            chunk.zero_grad_buffer()
        run_schedule(chunks, batches, loss_func_for, forward_only=False)

    def step_with_mode():
        with _DeviceInspectingMode():
            step()

    step()
    rss = _peak_rss_mb()  # the student's peak, before any HF model exists in this process
    fns = {layout: step}
    if layout == "tp1" and not args.no_mode:
        fns["mode"] = step_with_mode
    if layout == "tp1" and not args.no_hf:
        fns["hf"] = hf_step(args)
    seconds = _interleaved(fns, args.steps)
    results = [
        {"layout": name, "seconds": t, "tokens_per_s": args.batch * SEQ / t}
        for name, t in seconds.items()
        if name != "mode"
    ]
    results[0]["peak_rss_mb"] = rss
    if "mode" in seconds:
        results[0]["seconds_with_function_mode"] = seconds["mode"]
    destroy()
    return results


def _device_inspecting_mode_cls():
    import torch
    from torch.overrides import TorchFunctionMode

    class DeviceInspectingMode(TorchFunctionMode):
        """What a global CPU fix would do: look at every torch call's `device`."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs = dict(kwargs, device="cpu")
            return func(*args, **kwargs)

    del torch
    return DeviceInspectingMode


class _DeviceInspectingMode:
    def __enter__(self):
        self._mode = _device_inspecting_mode_cls()()
        return self._mode.__enter__()

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def hf_step(args: argparse.Namespace):
    """A forward + backward step of HF transformers' Qwen3-MoE of the same size (same
    batch, micro-batches and loss)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    cfg = model_config()
    config = transformers.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        num_experts=cfg.num_moe_experts,
        num_experts_per_tok=cfg.moe_router_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    model.train()
    seqs = torch.tensor(_sequences(args.batch, cfg.vocab_size))

    def step():
        model.zero_grad(set_to_none=True)
        for start in range(0, len(seqs), args.micro_batch):
            ids = seqs[start : start + args.micro_batch]
            logits = model(ids).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            (-logprobs.sum() / (len(seqs) * (SEQ - 1))).backward()

    return step


def _worker(args: argparse.Namespace) -> None:
    results = bench_megatron(args.worker, args)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(args.out, f"{args.worker}.rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _launch(layout: str, nproc: int, args: argparse.Namespace, out: str) -> None:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [os.path.abspath(__file__), "--worker", layout, "--out", out]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--micro-batch", str(args.micro_batch)]
    cmd += ["--no-hf"] * args.no_hf + ["--no-mode"] * args.no_mode
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(cmd, check=True, env=env, timeout=1800)


# --------------------------------------------------------------------------------------
# response-length sweep


def sweep_variants(has_chunking: bool) -> dict[str, list[str]]:
    """The default variants of the sweep: all off, then one feature on at a time (the
    token budget's `{T}` is the step's longest length)."""
    off = ["model.logits_chunk_tokens=0"] if has_chunking else []
    variants = {
        "off": off,
        "recompute full": off
        + [
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
        ],
        "recompute selective": off + ["model.recompute_granularity=selective"],
        "token budget": off + ["train.max_tokens_per_microbatch={T}"],
    }
    if has_chunking:
        variants["chunked logits 512"] = ["model.logits_chunk_tokens=512"]
    return variants


def _sweep_model_overrides(args: argparse.Namespace, length: int) -> list[str]:
    hidden, layers = (128, 2) if args.quick else (256, 4)
    return [
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={4 * hidden}",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        f"model.kv_channels={hidden // 4}",
        f"model.vocab_size={args.vocab}",
        "model.qk_layernorm=true",
        "model.num_moe_experts=8",
        "model.moe_router_topk=2",
        f"model.moe_ffn_hidden_size={hidden}",
        f"model.max_position_embeddings={length + 64}",
        "model.transformer_impl=local",
        "train.micro_batch_size=2",
        "train.lr_warmup_steps=0",
        "train.lr=1.0e-6",
    ]


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sweep_worker(args: argparse.Namespace) -> dict:
    """One (length, variant) cell in this process: peak RSS of the step and tokens/s."""
    import torch

    from megatron_mopd.batch import TrainBatch
    from megatron_mopd.config import load_config
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    torch.set_num_threads(1)
    T = args.length
    overrides = _sweep_model_overrides(args, T) + list(args.set or [])
    overrides += [o.replace("{T}", str(T + 64)) for o in json.loads(args.overrides)]
    cfg = load_config(None, overrides)
    init_distributed(cfg.parallel, cfg.model, seed=0)
    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg.parallel)
    optimizer, _ = build_optimizer(chunks, cfg.train, cfg.parallel)
    lengths = [64 + T, 64 + max(1, T // 4)]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.model.vocab_size, (2, max(lengths)), generator=g)
    mask = torch.zeros(2, max(lengths))
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
        mask[i, 64:n] = 1.0
    batch = TrainBatch(
        tokens_B_T=tokens, mask_B_T=mask, rollout_logprobs_B_T=-10.0 * mask,
        teacher_logprobs_B_T=-10.0 * mask, orm_advantages_B=torch.zeros(2),
        domain_ids_B=torch.zeros(2, dtype=torch.long), domains=["d"],
        lengths_B=torch.tensor(lengths),
    )  # fmt: skip
    kw = dict(
        max_tokens_per_microbatch=cfg.train.max_tokens_per_microbatch,
        pack_sequences=cfg.train.pack_sequences,
    )
    before = _rss_now_mb()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        mopd_train_step(chunks, optimizer, batch, cfg.loss, cfg.train.micro_batch_size, **kw)
        if step:
            times.append(time.perf_counter() - start)
    destroy()
    return {
        "step_peak_mb": _peak_rss_mb() - before,
        "tokens_per_s": sum(lengths) / min(times),
    }


def run_sweep(args: argparse.Namespace) -> None:
    """Every (variant, length) cell in its own process; one table."""
    from megatron_mopd.config import ModelConfig

    has_chunking = "logits_chunk_tokens" in {f.name for f in dataclasses.fields(ModelConfig)}
    variants = sweep_variants(has_chunking)
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, _, items = spec.partition(":")
            variants[name] = [x for x in items.split(",") if x]
    lengths = args.lengths or (
        [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    )
    hidden, layers = (128, 2) if args.quick else (256, 4)
    print(
        f"MOPD step of 2 responses (T and T/4 tokens after a 64-token prompt), hidden {hidden}, "
        f"{layers} layers, 8 experts top-2, vocabulary {args.vocab}, fp32, CPU, 1 process "
        f"per cell, best of {args.steps}; overrides: {args.set or 'none'}"
    )
    print("cell: step peak RSS above the RSS before the step (MB) / tokens per second")
    print(f"{'variant':<22}" + "".join(f"{f'T={n}':>20}" for n in lengths))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    table: dict[str, list[dict | None]] = {}
    for name, overrides in variants.items():
        row = []
        for n in lengths:
            cmd = [sys.executable, os.path.abspath(__file__), "--sweep-worker", "--length", str(n)]
            cmd += ["--steps", str(args.steps), "--vocab", str(args.vocab)]
            cmd += ["--overrides", json.dumps(overrides)] + ["--quick"] * args.quick
            for item in args.set or []:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            row.append(json.loads(lines[-1][7:]) if lines and not proc.returncode else None)
            if row[-1] is None:
                print(f"  {name} T={n} failed: {proc.stderr.strip().splitlines()[-1:]}")
        table[name] = row
        cells = "".join(
            f"{'failed':>20}"
            if r is None
            else f"{r['step_peak_mb']:>10.0f} / {r['tokens_per_s']:>7.0f}"
            for r in row
        )
        print(f"{name:<22}{cells}", flush=True)
    print("growth of the step's peak memory per doubling of T (MB ratio, last two lengths):")
    for name, row in table.items():
        if len(row) >= 2 and row[-1] and row[-2] and row[-2]["step_peak_mb"] > 0:
            ratio = row[-1]["step_peak_mb"] / row[-2]["step_peak_mb"]
            print(f"  {name:<22}{ratio:.2f}x for {lengths[-1] / lengths[-2]:.0f}x the tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (global)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-mode", action="store_true", help="skip the TorchFunctionMode run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help="response-length sweep")
    parser.add_argument("--lengths", type=int, nargs="+", help="sweep: response lengths")
    parser.add_argument("--quick", action="store_true", help="sweep: 1k-4k, smaller model")
    parser.add_argument("--vocab", type=int, default=32768, help="sweep: vocabulary size")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="sweep: config override (all cells)"
    )
    parser.add_argument(
        "--variant", action="append", metavar="NAME:K=V,K=V", help="sweep: replace the variants"
    )
    parser.add_argument("--sweep-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep_worker:
        print("RESULT " + json.dumps(sweep_worker(args)))
        return
    if args.sweep:
        if args.steps == 5:
            args.steps = 1
        run_sweep(args)
        return
    if args.worker:
        _worker(args)
        return
    out = tempfile.mkdtemp(prefix="bench-student-")
    for layout, nproc in (("tp1", 1), ("tp2", 2), ("ep2", 2)):
        _launch(layout, nproc, args, out)
    rows: dict[str, list[dict]] = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name)) as f:
            for r in json.load(f):
                rows.setdefault(r["layout"], []).append(r)
    print(
        f"Qwen3-MoE-like student: hidden 256, 4 layers, 8 experts top-2, seq {SEQ}, fp32, "
        f"{args.batch} sequences per step, micro-batch {args.micro_batch}, "
        f"best of {args.steps} steps"
    )
    print(f"{'layout':8s} {'fwd+bwd tokens/s':>17s} {'s/step':>8s} {'peak RSS/rank (MB)':>20s}")
    for layout in ("tp1", "tp2", "ep2", "hf"):
        if layout not in rows:
            continue
        r = rows[layout]
        rss = "/".join(f"{x['peak_rss_mb']:.0f}" for x in r if "peak_rss_mb" in x) or "-"
        print(f"{layout:8s} {r[0]['tokens_per_s']:17.0f} {r[0]['seconds']:8.3f} {rss:>20s}")
    if "hf" in rows:
        ratio = rows["tp1"][0]["tokens_per_s"] / rows["hf"][0]["tokens_per_s"]
        print(f"megatron TP1 / transformers (same process, interleaved): {ratio:.2f}x tokens/s")
    mode = rows["tp1"][0].get("seconds_with_function_mode")
    if mode:
        print(
            f"TP1 step with a device-inspecting TorchFunctionMode: {mode:.3f} s "
            f"({100 * (mode / rows['tp1'][0]['seconds'] - 1):+.0f}% vs targeted patches)"
        )


if __name__ == "__main__":
    main()
