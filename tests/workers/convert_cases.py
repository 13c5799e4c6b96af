"""Worker: HF -> Megatron (at a layout) -> HF, for several layouts in one torchrun launch.

    torchrun --standalone --nproc-per-node 2 tests/workers/convert_cases.py --out DIR \
        --cases '[{"name": "tp2-qwen2", "hf": DIR, "tp": 2, "export": DIR2, ...}]'

Each case: init the layout's groups (the default process group is created here once and
kept), build the student from `hf` (weights loaded by the bridge, each rank reading its
shards), export it to `export` with `export_hf_checkpoint` (gathered to rank 0), then, for
each folder in `bad`, try loading it and record the error every rank raised; with
`derive`, check that exporting without a `ModelConfig` (architecture read from the chunks)
gives the same tensors. Every rank saves `{case name: {"errors": [...], "params": n,
"derived_equal": bool | None}}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_mopd.convert import (  # noqa: E402
    export_hf_checkpoint,
    export_hf_state_dict,
    load_hf_weights,
)
from megatron_mopd.errors import UserError  # noqa: E402
from megatron_mopd.student.load import build_student  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}


def run_case(case: dict) -> dict:
    parallel = ParallelConfig(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp"),
    )
    model_cfg = ModelConfig(hf_path=case["hf"])
    distributed.init_distributed(parallel, None)
    try:
        chunks, resolved = build_student(model_cfg, parallel)
        export_hf_checkpoint(
            chunks,
            resolved,
            case["export"],
            dtype=DTYPES[case.get("dtype")],
            max_shard_bytes=case.get("max_shard_bytes", 4 * 1024**3),
        )
        derived_equal = None
        if case.get("derive"):  # the architecture read from the chunks gives the same export
            with_cfg = dict(export_hf_state_dict(chunks, resolved))
            derived = dict(export_hf_state_dict(chunks))
            if dist.get_rank() == 0:
                derived_equal = sorted(with_cfg) == sorted(derived) and all(
                    torch.equal(with_cfg[k], derived[k]) for k in with_cfg
                )
        errors = []
        for bad in case.get("bad", []):
            try:
                load_hf_weights(chunks, bad, resolved)
                errors.append(None)
            except UserError as e:
                errors.append(str(e))
        n = sum(p.numel() for c in chunks for p in c.parameters())
        dist.barrier()
        return {"errors": errors, "params": n, "derived_equal": derived_equal}
    finally:
        distributed.destroy(keep_process_group=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = {}
    for case in json.loads(args.cases):
        results[case["name"]] = run_case(case)
    save_result(args.out, dist.get_rank(), results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
