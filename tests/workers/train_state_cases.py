"""Worker: save the student's training state at one layout, resume it at others.

    torchrun --standalone --nproc-per-node 2 tests/workers/train_state_cases.py --out DIR \
        --ckpt ROOT --cases '[{"name": "save", "tp": 2, "save": "a", "start": 2},
                              {"name": "tp1", "load": "a", "start": 2}, ...]'

Every case builds the tiny MoE student (Qwen3-MoE-like, 4 experts) at its layout (with the
distributed optimizer unless `"distopt": false`; `"dtype": "bf16"` for bf16 parameters), an LR schedule with warmup and cosine
decay, and runs train steps on fixed global batches (each DP rank its share; the loss
scales every sequence by 1 / global number of sequences, so the summed loss is layout
independent). Batch k is the same everywhere.

- `"save": NAME`: run steps 0 .. start-1, save the training state to ROOT/NAME, then run
  `RESUMED_STEPS` more (the reference).
- `"load": NAME`: build the model from a *different* random seed, load ROOT/NAME, run
  steps start .. start + RESUMED_STEPS - 1; with `"expect_error": true`, the load must
  raise `UserError`, whose message is the result. `"format"` on a save case is the
  distributed optimizer's `optimizer_format`. With `"model_only": true` only the model is
  loaded, with `convert.mcore.load_mcore_checkpoint` (the optimizer starts fresh).

Each rank saves `{case name: {"losses": [...], "lrs": [...], ...}}`. The second resumed step
depends on the optimizer's loaded moments and step count, not only on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402

MODEL = ModelConfig(
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
    init_method_std=0.05,
    seed=7,
)
TRAIN = TrainConfig(
    lr=3e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_style="cosine", max_steps=8, clip_grad=1.0
)
RESUMED_STEPS = 2
NUM_SEQUENCES = 8
MICRO_BATCH_SIZE = 2


def global_batch(step: int) -> list[list[int]]:
    """The fixed global batch of `step` (uneven lengths)."""
    gen = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(5, 17, (NUM_SEQUENCES,), generator=gen).tolist()
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]


def sequence_mean_loss(num_global_sequences: int):
    def loss_fn(logprobs_B_T, mb):
        mask = mb.loss_mask_B_T.to(logprobs_B_T.dtype)
        per_seq = -(mask * logprobs_B_T).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / num_global_sequences, {}

    return loss_fn


def run_case(case: dict, ckpt_root: str) -> dict:
    from dataclasses import replace

    from megatron_mopd.convert.mcore import load_mcore_checkpoint, read_mcore_config
    from megatron_mopd.student.logprobs import make_micro_batches
    from megatron_mopd.student.model import build_model
    from megatron_mopd.student.state import load_training_state, save_training_state
    from megatron_mopd.student.train_step import build_optimizer, train_step, wrap_ddp

    parallel = ParallelConfig(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
        use_distributed_optimizer=case.get("distopt", True),
    )
    start = time.perf_counter()
    saving = "save" in case
    ckpt_dir = os.path.join(ckpt_root, case["save"] if saving else case["load"])
    start_step = case["start"]
    model_cfg = replace(MODEL, params_dtype=case.get("dtype", "fp32"))
    if not saving:
        model_cfg = replace(model_cfg, seed=MODEL.seed + 1)
    layout = distributed.init_distributed(parallel, model_cfg, seed=0)
    chunks = wrap_ddp(build_model(model_cfg, parallel), parallel)
    optimizer, scheduler = build_optimizer(chunks, TRAIN, parallel)

    def step(k: int) -> dict:
        seqs = global_batch(k)
        share = len(seqs) // layout.dp
        mine = seqs[layout.dp_rank * share : (layout.dp_rank + 1) * share]
        batches = make_micro_batches(mine, MICRO_BATCH_SIZE, pad_to_multiple_of=layout.tp)
        return train_step(
            chunks, optimizer, batches, sequence_mean_loss(len(seqs)), scheduler=scheduler
        )

    before: list[float] = []
    described = None
    if saving:
        before = [step(k)["loss"] for k in range(start_step)]
        save_start = time.perf_counter()
        save_training_state(
            chunks,
            optimizer,
            scheduler,
            ckpt_dir,
            model_cfg=model_cfg,
            optimizer_format=case.get("format", "fully_reshardable"),
        )
        io_seconds = time.perf_counter() - save_start
        described = read_mcore_config(ckpt_dir).num_moe_experts
    elif case.get("model_only"):  # the model part only, as a Megatron checkpoint
        load_start = time.perf_counter()
        load_mcore_checkpoint(chunks, ckpt_dir)
        io_seconds = time.perf_counter() - load_start
    elif case.get("expect_error"):
        from megatron_mopd.errors import UserError

        try:
            load_training_state(chunks, optimizer, scheduler, ckpt_dir)
        except UserError as e:
            distributed.destroy(keep_process_group=True)
            return {"error": str(e), "seconds": time.perf_counter() - start, "io_seconds": 0.0}
        raise AssertionError(f"case {case['name']}: the load did not fail")
    else:
        load_start = time.perf_counter()
        load_training_state(chunks, optimizer, scheduler, ckpt_dir)
        io_seconds = time.perf_counter() - load_start
    lr_at_resume = float(optimizer.param_groups[0]["lr"])
    outs = [step(start_step + k) for k in range(RESUMED_STEPS)]
    distributed.destroy(keep_process_group=True)
    return {
        "before": before,
        "described_experts": described,
        "losses": [o["loss"] for o in outs],
        "grad_norms": [o["grad_norm"] for o in outs],
        "lrs": [o["lr"] for o in outs],
        "lr_at_resume": lr_at_resume,
        "scheduler_steps": scheduler.num_steps,
        "layout": (layout.tp, layout.pp, layout.ep, layout.etp, layout.dp),
        "io_seconds": io_seconds,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True, help="folder of the checkpoints")
    parser.add_argument("--cases", required=True, help="JSON list of case dicts")
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    results = {}
    for case in json.loads(args.cases):
        results[case["name"]] = run_case(case, args.ckpt)
        torch.distributed.barrier()
    save_result(args.out, torch.distributed.get_rank(), results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
