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
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (global)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-mode", action="store_true", help="skip the TorchFunctionMode run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
