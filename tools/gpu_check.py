"""The single-GPU check of the student (issue 17): megatron-core, local layer spec, on CUDA.

    python tools/gpu_check.py                      # on one GPU (what tools/gpu_check.sh runs)
    python tools/gpu_check.py --device cpu --tiny  # the same steps on CPU, tiny sizes (tests)

One process, world size 1 (NCCL on CUDA, gloo on CPU), no Transformer Engine (the local
spec: megatron-core's own modules). Prints one `PASS` / `FAIL` / `INFO` line per step
and exits non-zero when a step fails:

1. `logprobs_fp32` / `logprobs_bf16`: a random Qwen3-MoE HF model (transformers), loaded
   into megatron-core through the weight bridge; the per-token log-probs of a few
   sequences against transformers' forward of the same weights in the same dtype (fp32:
   max |diff| under 2e-3 on CUDA, 1e-4 on CPU; bf16: mean |diff| under 0.05 and max under
   1.0, bf16 kernels differing between the two implementations).
2. `mopd_step`: one MOPD optimizer step (`student.mopd_step.mopd_train_step`, bf16, the
   distributed optimizer) on a synthetic scored batch: loss and gradient norm finite, the
   weights changed.
3. `throughput`: train steps of a ~1.2B-parameter MoE (16 layers, hidden 1024, 32 experts
   top-4 of width 512, vocabulary 151,936; `--tiny`: a small one) on sequences of
   `--seq-len` tokens: tokens/s and model FLOPs utilisation against `--peak-tflops`
   (dense bf16 peak of the GPU: 989 for H100/H200 SXM), and the peak GPU memory beside
   the estimate of `student.memory` for the same step (local spec, whole logits).

Writes `--out DIR/gpu_check.json` with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

RESULTS: dict = {"steps": {}}
FAILED: list[str] = []


def report(name: str, ok: bool | None, detail: str, **figures) -> None:
    """Print one result line and keep its figures."""
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    print(f"{status} {name}: {detail}", flush=True)
    RESULTS["steps"][name] = {"status": status, "detail": detail, **figures}
    if ok is False:
        FAILED.append(name)


def run_step(name: str, fn) -> None:
    """Run one step; an exception is a FAIL line with its last frames."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (every failure is reported, then the next step runs)
        tb = traceback.format_exc().strip().splitlines()
        report(name, False, f"{type(e).__name__}: {e} | " + " | ".join(tb[-4:]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------


def parity_sizes(tiny: bool) -> dict:
    if tiny:
        return dict(vocab_size=128, num_hidden_layers=2)
    return dict(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
    )


def hf_logprobs(hf_dir: str, sequences, dtype, device) -> list[torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
            target = torch.tensor(ids[1:], device=device).unsqueeze(-1)
            out.append(torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1).cpu())
    del model
    return out


def check_logprobs(args, device, parallel, work: str) -> None:
    from megatron_mopd.config import ModelConfig
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.load import build_student
    from megatron_mopd.student.logprobs import forward_logprobs
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    sizes = parity_sizes(args.tiny)
    vocab = sizes.pop("vocab_size")
    hf_dir = make_tiny_hf_model(
        "qwen3_moe", os.path.join(work, "hf"), seed=3, vocab_size=vocab, init_std=0.05, **sizes
    )
    gen = torch.Generator().manual_seed(0)
    lengths = (17, 64, 5, 128) if args.tiny else (128, 512, 33, 1024)
    seqs = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref = hf_logprobs(hf_dir, seqs, dtype, device)
        cfg = ModelConfig(hf_path=hf_dir, params_dtype=dtype_name, transformer_impl="local")
        init_distributed(parallel, cfg, seed=0)
        try:
            chunks, _ = build_student(cfg, parallel)
            got = forward_logprobs(chunks, seqs, micro_batch_size=2)
        finally:
            destroy(keep_process_group=True)
        diffs = torch.cat([(a.float() - b.float()).abs() for a, b in zip(got, ref)])
        max_d, mean_d = float(diffs.max()), float(diffs.mean())
        if dtype_name == "fp32":
            tol = 2e-3 if device.type == "cuda" else 1e-4
            ok = max_d < tol
            rule = f"max |diff| < {tol:g}"
        else:
            ok = mean_d < 0.05 and max_d < 1.0
            rule = "mean |diff| < 0.05, max < 1"
        report(
            f"logprobs_{dtype_name}",
            ok,
            f"megatron-core (local spec) vs transformers, {sum(len(s) - 1 for s in seqs)} "
            f"tokens: max |diff| {max_d:.2e}, mean {mean_d:.2e} ({rule})",
            max_abs_diff=max_d,
            mean_abs_diff=mean_d,
        )


def check_mopd_step(args, device, parallel) -> None:
    from megatron_mopd.batch import TrainBatch
    from megatron_mopd.config import LossConfig, ModelConfig, TrainConfig
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.logprobs import forward_logprobs
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=256 if not args.tiny else 64,
        ffn_hidden_size=512 if not args.tiny else 128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=64 if not args.tiny else 16,
        vocab_size=1024 if not args.tiny else 128,
        qk_layernorm=True,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=128 if not args.tiny else 32,
        params_dtype="bf16",
        transformer_impl="local",
    )
    par = replace(parallel, use_distributed_optimizer=True)
    init_distributed(par, cfg, seed=0)
    try:
        chunks = wrap_ddp(build_model(cfg, par), par)
        optimizer, scheduler = build_optimizer(chunks, TrainConfig(lr=1e-3, lr_warmup_steps=0), par)
        g = torch.Generator().manual_seed(1)
        B, T = 4, 64
        lengths = torch.tensor([T, 40, 50, 20])
        prompt = torch.tensor([8, 8, 4, 10])
        pos = torch.arange(T)
        mask = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).float()
        tokens = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
        # on-policy: the rollout log-probs are the student's own (importance ratios ~1)
        own = forward_logprobs(chunks, [tokens[b, : lengths[b]].tolist() for b in range(B)], 2)
        rollout = torch.zeros(B, T)
        for b in range(B):
            rollout[b, 1 : lengths[b]] = own[b]
        batch = TrainBatch(
            tokens_B_T=tokens,
            mask_B_T=mask,
            rollout_logprobs_B_T=rollout * mask,
            teacher_logprobs_B_T=(rollout - torch.rand(B, T, generator=g)) * mask,
            orm_advantages_B=torch.zeros(B),
            domain_ids_B=torch.zeros(B, dtype=torch.long),
            domains=["math"],
            lengths_B=lengths,
        )
        before = [p.detach().float().clone() for p in chunks[0].parameters()]
        out = mopd_train_step(chunks, optimizer, batch, LossConfig(), 2, scheduler=scheduler)
        changed = sum(
            not torch.equal(a, p.detach().float()) for a, p in zip(before, chunks[0].parameters())
        )
    finally:
        destroy(keep_process_group=True)
    loss, gnorm = float(out["loss"]), float(out["grad_norm"])
    ok = math.isfinite(loss) and math.isfinite(gnorm) and gnorm > 0 and changed > 0
    report(
        "mopd_step",
        ok,
        f"bf16, distributed optimizer: loss {loss:.4f}, grad norm {gnorm:.4f}, "
        f"reverse_kl {float(out.get('reverse_kl', float('nan'))):.4f}, "
        f"{changed}/{len(before)} parameters changed",
        loss=loss,
        grad_norm=gnorm,
    )


def throughput_config(tiny: bool):
    from megatron_mopd.config import ModelConfig

    if tiny:
        return ModelConfig(
            num_layers=2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=16,
            vocab_size=256,
            qk_layernorm=True,
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            params_dtype="bf16",
            transformer_impl="local",
        )
    return ModelConfig(
        num_layers=16,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=16,
        num_query_groups=4,
        kv_channels=64,
        vocab_size=151936,
        max_position_embeddings=32768,
        qk_layernorm=True,
        num_moe_experts=32,
        moe_router_topk=4,
        moe_ffn_hidden_size=512,
        params_dtype="bf16",
        transformer_impl="local",
    )


def model_flops_per_token(cfg, seq_len: int) -> tuple[float, int, int]:
    """(training FLOPs per token, total parameters, active parameters): 6 x active matmul
    parameters (output layer included, embedding lookup not) + causal attention
    `6 x layers x seq x heads x head_dim` (forward 2 matmuls of s^2 d / 2, x3 for training)."""
    h, L = cfg.hidden_size, cfg.num_layers
    hd = cfg.kv_channels or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, (cfg.num_query_groups or cfg.num_attention_heads) * hd
    attn = h * (q + 2 * kv) + q * h
    fe = cfg.moe_ffn_hidden_size
    experts_all = cfg.num_moe_experts * 3 * fe * h
    experts_active = cfg.moe_router_topk * 3 * fe * h
    router = cfg.num_moe_experts * h
    vocab = cfg.vocab_size * h
    total = L * (attn + router + experts_all) + 2 * vocab
    active = L * (attn + router + experts_active) + vocab  # the output layer's matmul
    flops = 6 * active + 6 * L * seq_len * q
    return flops, total, active


def memory_estimate(cfg, seq: int, n_seq: int) -> float:
    """`student.memory`'s per-GPU bytes for the throughput step (local spec, whole logits,
    one sequence per micro-batch, distributed optimizer at DP1)."""
    import dataclasses

    from megatron_mopd.config import Config, ParallelConfig, TrainConfig
    from megatron_mopd.student import memory

    full = Config(
        model=cfg,
        parallel=ParallelConfig(use_distributed_optimizer=True),
        train=TrainConfig(micro_batch_size=1),
    )
    s = dataclasses.replace(
        memory.settings_from_config(full, 1),
        implementation="local",
        tokens_per_microbatch=seq,
        seq_len=seq,
        logits_chunk_tokens=0,
        micro_batches=n_seq,
    )
    return memory.estimate_from_settings(cfg, s).total_bytes


def check_throughput(args, device, parallel) -> None:
    from megatron_mopd.config import TrainConfig
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.logprobs import make_micro_batches
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.train_step import (
        build_optimizer,
        next_token_loss,
        train_step,
        wrap_ddp,
    )

    cfg = throughput_config(args.tiny)
    seq = args.seq_len if not args.tiny else 128
    n_seq = args.sequences if not args.tiny else 2
    par = replace(parallel, use_distributed_optimizer=True)
    init_distributed(par, cfg, seed=0)
    try:
        chunks = wrap_ddp(build_model(cfg, par), par)
        optimizer, scheduler = build_optimizer(chunks, TrainConfig(lr=1e-5, lr_warmup_steps=0), par)
        g = torch.Generator().manual_seed(2)
        seqs = [
            torch.randint(3, cfg.vocab_size, (seq,), generator=g).tolist() for _ in range(n_seq)
        ]
        batches = make_micro_batches(seqs, 1)
        loss_fn = next_token_loss(n_seq * (seq - 1))
        train_step(chunks, optimizer, batches, loss_fn, scheduler=scheduler)  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = args.steps if not args.tiny else 1
        start = time.perf_counter()
        for _ in range(steps):
            out = train_step(chunks, optimizer, batches, loss_fn, scheduler=scheduler)
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    finally:
        destroy(keep_process_group=True)
    tokens = steps * n_seq * seq
    tps = tokens / seconds
    estimated = memory_estimate(cfg, seq, n_seq)
    flops, total, active = model_flops_per_token(cfg, seq)
    mfu = tps * flops / (args.peak_tflops * 1e12)
    ok = math.isfinite(float(out["loss"]))
    peak_txt = f", estimated {estimated / 2**30:.1f} GiB"
    if peak is not None:
        peak_txt = f", peak memory {peak / 2**30:.1f} GiB ({estimated / 2**30:.1f} estimated)"
    report(
        "throughput",
        ok,
        f"{total / 1e9:.3g}B-parameter MoE ({active / 1e9:.3g}B active), {n_seq} x {seq} tokens "
        f"a step, {steps} steps: {tps:,.0f} tokens/s, MFU {mfu * 100:.1f}% of "
        f"{args.peak_tflops:g} TFLOP/s{peak_txt}, loss {float(out['loss']):.3f}",
        tokens_per_second=tps,
        mfu=mfu,
        peak_memory_bytes=peak,
        estimated_memory_bytes=estimated,
        total_params=total,
        active_params=active,
        flops_per_token=flops,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes (CPU tests)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sequences", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default=None, help="folder for gpu_check.json")
    parser.add_argument(
        "--only", default=None, help="comma-separated steps: logprobs,mopd_step,throughput"
    )
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_mopd.config import ParallelConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        report("cuda", False, "torch.cuda.is_available() is False")
        return 1
    device = torch.device(args.device)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # never pick a GPU in the CPU run
    else:
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity: real fp32 matmuls
        torch.backends.cudnn.allow_tf32 = False
    import megatron.core

    try:
        import transformer_engine  # noqa: F401

        te = "present (not used: local spec)"
    except Exception:  # noqa: BLE001
        te = "absent"
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    report(
        "environment",
        None,
        f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}), megatron-core {megatron.core.__version__}, device {name}, "
        f"Transformer Engine {te}",
    )
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel = ParallelConfig(backend=backend)
    only = set(args.only.split(",")) if args.only else {"logprobs", "mopd_step", "throughput"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        if "logprobs" in only:
            run_step("logprobs", lambda: check_logprobs(args, device, parallel, work))
        if "mopd_step" in only:
            run_step("mopd_step", lambda: check_mopd_step(args, device, parallel))
        if "throughput" in only:
            run_step("throughput", lambda: check_throughput(args, device, parallel))
    dist.destroy_process_group()
    RESULTS["failed"] = FAILED
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(RESULTS, f, indent=2)
    print("gpu_check: " + ("FAIL " + ", ".join(FAILED) if FAILED else "all PASS"), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
