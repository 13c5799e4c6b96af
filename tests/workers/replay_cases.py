"""Worker: one MOPD step of a student loaded from an HF folder, routing replay on or off.

    torchrun --standalone --nproc-per-node 2 tests/workers/replay_cases.py \
        --out DIR --batch BATCH.pt --hf HF_DIR --cases '[{"name": "ep2", "ep": 2, "replay": true}]'

`BATCH.pt` is a `TrainBatch` built from a bf16 embedded engine's rollouts (with their
routed experts); every case runs `mopd_train_step` on it with `loss.routing_replay` as
given and saves the step's output and the (replicated) router weights' gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import LossConfig, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402


def run_case(case: dict, hf: str, batch) -> dict:
    from megatron_mopd.student.load import build_student
    from megatron_mopd.student.logprobs import unwrap_model
    from megatron_mopd.student.mopd_step import mopd_train_step
    from megatron_mopd.student.train_step import build_optimizer, wrap_ddp

    parallel = ParallelConfig(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
    )
    distributed.init_distributed(parallel, None, seed=0)
    chunks, _ = build_student(ModelConfig(hf_path=hf), parallel)
    if case.get("recompute"):  # full activation recomputation: the routers run again in
        config = unwrap_model(chunks[0]).config  # the backward (megatron's REPLAY_BACKWARD)
        config.recompute_granularity = "full"
        config.recompute_method = "uniform"
        config.recompute_num_layers = 1
    chunks = wrap_ddp(chunks, parallel)
    optimizer, _ = build_optimizer(
        chunks, TrainConfig(lr=1e-3, lr_warmup_steps=0, clip_grad=0.0), parallel
    )
    cfg = LossConfig(
        routing_replay=case["replay"], correction="icepop", eps_low=0.98, eps_high=1.02
    )
    out = mopd_train_step(chunks, optimizer, batch, cfg, case.get("mbs", 2))
    grads = {}
    for name, p in [] if case.get("pp", 1) > 1 else unwrap_model(chunks[0]).named_parameters():
        if name.endswith("router.weight"):
            g = getattr(p, "main_grad", None)
            grads[name] = (p.grad if g is None else g).detach().clone().float()
    distributed.destroy(keep_process_group=True)
    return {"out": out, "router_grads": grads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of case dicts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = torch.load(args.batch, weights_only=False)
    results = {c["name"]: run_case(c, args.hf, batch) for c in json.loads(args.cases)}
    save_result(args.out, int(os.environ.get("RANK", "0")), results)
    distributed.destroy()


if __name__ == "__main__":
    main()
