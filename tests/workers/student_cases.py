"""Worker: run student parity cases (forward log-probs, one train step) in one launch.

    torchrun --standalone --nproc-per-node 2 tests/workers/student_cases.py \
        --out DIR --cases '[{"name": "moe_tp2", "model": "moe", "tp": 2}, ...]'

Each case builds the tiny model at its layout (layout-independent init: the same
logical model everywhere), computes log-probs of a fixed set of uneven sequences, runs
one train step over the global batch (this DP rank's share, micro-batches of 2, a loss
that scales every sequence by 1 / global number of sequences), and computes the log-probs
again. Every rank saves `{case name: results}` (see tests/multirank.py). Runs without
torchrun too (world size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402

MODELS = {
    # Qwen3-MoE-like: qk-norm, GQA, untied embeddings, plus a gated shared expert
    "moe": ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=128,
        qk_layernorm=True,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_shared_expert_gate=True,
        init_method_std=0.05,
        seed=7,
    ),
    # Qwen2-like: QKV bias, GQA, tied embeddings
    "dense": ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        add_qkv_bias=True,
        untie_embeddings_and_output_weights=False,
        init_method_std=0.05,
        seed=7,
    ),
}

NUM_SEQUENCES = 8
MICRO_BATCH_SIZE = 2


def sequences() -> list[list[int]]:
    """Fixed sequences of uneven lengths (5..20 tokens)."""
    gen = torch.Generator().manual_seed(1234)
    lengths = torch.randint(5, 21, (NUM_SEQUENCES,), generator=gen).tolist()
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]


def sequence_mean_loss(num_global_sequences: int):
    """Each sequence's mean token NLL, scaled by 1 / (global number of sequences)."""

    def loss_fn(logprobs_B_T, mb):
        mask = mb.loss_mask_B_T.to(logprobs_B_T.dtype)
        per_seq = -(mask * logprobs_B_T).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / num_global_sequences, {"sequences": float(len(per_seq))}

    return loss_fn


def _poisoned(loss_fn):
    """The same loss with a NaN gradient (to test skipped steps)."""

    def poisoned(logprobs_B_T, mb):
        loss, metrics = loss_fn(logprobs_B_T, mb)
        return loss * float("nan"), metrics

    return poisoned


def run_case(case: dict) -> dict:
    from megatron_mopd.student.logprobs import forward_logprobs, make_micro_batches
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.train_step import build_optimizer, train_step, wrap_ddp

    model = MODELS[case["model"]]
    if "chunk" in case:  # model.logits_chunk_tokens
        model = replace(model, logits_chunk_tokens=case["chunk"])
    if "by" in case:  # model.make_vocab_size_divisible_by
        model = replace(model, make_vocab_size_divisible_by=case["by"])
    if "dispatcher" in case:
        model = replace(model, moe_token_dispatcher_type=case["dispatcher"])
    parallel = ParallelConfig(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
        use_distributed_optimizer=case.get("distopt", False),
    )
    start = time.perf_counter()
    layout = distributed.init_distributed(parallel, model, seed=0)
    seqs = sequences()
    chunks = build_model(model, parallel)
    before = forward_logprobs(chunks, seqs, micro_batch_size=3)
    chunks = wrap_ddp(chunks, parallel)
    train = TrainConfig(lr=1e-2, lr_warmup_steps=case.get("warmup", 0), clip_grad=1.0, max_steps=10)
    optimizer, scheduler = build_optimizer(chunks, train, parallel)
    share = len(seqs) // layout.dp
    mine = seqs[layout.dp_rank * share : (layout.dp_rank + 1) * share]
    batches = make_micro_batches(mine, MICRO_BATCH_SIZE, pad_to_multiple_of=layout.tp)
    step_start = time.perf_counter()
    loss_fn = sequence_mean_loss(len(seqs))
    if case.get("nan") == "all" or (case.get("nan") == "rank0" and layout.rank == 0):
        loss_fn = _poisoned(loss_fn)
    out = train_step(chunks, optimizer, batches, loss_fn, scheduler=scheduler)
    step_seconds = time.perf_counter() - step_start
    after = forward_logprobs(chunks, seqs, micro_batch_size=3)
    distributed.destroy(keep_process_group=True)
    return {
        "loss": out["loss"],
        "grad_norm": out["grad_norm"],
        "skipped": out["skipped"],
        "lr": out["lr"],
        "sequences": out.get("sequences"),
        "micro_batches": len(batches),
        "logprobs_before": torch.cat(before),
        "logprobs_after": torch.cat(after),
        "layout": (layout.tp, layout.pp, layout.ep, layout.etp, layout.dp),
        "sequence_parallel": layout.sequence_parallel,
        "seconds": time.perf_counter() - start,
        "step_seconds": step_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of case dicts")
    args = parser.parse_args()
    results = {case["name"]: run_case(case) for case in json.loads(args.cases)}
    save_result(args.out, int(os.environ.get("RANK", "0")), results)
    distributed.destroy()


if __name__ == "__main__":
    main()
