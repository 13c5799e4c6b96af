"""Worker: weight sync from a Megatron student (TP2) into both rollout backends.

    torchrun --standalone --nproc-per-node 2 tests/workers/weight_sync_cases.py \
        --out DIR --hf HF_DIR --run-dir RUN_DIR --server-url URL

The student is loaded from HF_DIR, every parameter is shifted by +0.01 (so the expected
HF weights are known exactly), then synced (1) in memory into an embedded engine and
(2) over disk into the SGLang-compatible server at URL (which serves HF_DIR), twice, to
check folder rotation. Rank 0 saves what it observed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import load_config  # noqa: E402


def shift(chunks, delta: float) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(delta)


def max_diff_to(named: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], delta: float):
    return max(float((named[k] - (reference[k] + delta)).abs().max()) for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--server-url", required=True)
    args = parser.parse_args()

    from safetensors.torch import load_file

    from megatron_mopd.rollout.weight_sync import sync_weights
    from megatron_mopd.student.load import build_student

    base = [f"model.hf_path={args.hf}", "parallel.tp=2", f"run_dir={args.run_dir}"]
    cfg = load_config(None, base)
    distributed.init_distributed(cfg.parallel, seed=0)
    chunks, arch = build_student(cfg.model, cfg.parallel)
    rank = torch.distributed.get_rank()
    original = load_file(os.path.join(args.hf, "model.safetensors"))
    result: dict = {}

    # (1) embedded engine, in memory
    shift(chunks, 0.01)
    engine = None
    if rank == 0:
        from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine

        engine = EmbeddedRolloutEngine(args.hf, seed=0)
    version = sync_weights(chunks, engine, cfg, 1, model_cfg=arch)
    if rank == 0:
        params = dict(engine.engine.model.named_parameters())
        result["embedded_version"] = (version, engine.weight_version)
        result["embedded_max_diff"] = max_diff_to(params, original, 0.01)

    # (2) SGLang engine (the project's CPU server), over disk, twice
    cfg2 = load_config(
        None,
        [*base, "rollout.backend=sglang", f"rollout.urls=[{args.server_url}]"],
    )
    sg = None
    if rank == 0:
        from megatron_mopd.rollout.sglang import SGLangRolloutEngine

        sg = SGLangRolloutEngine(cfg2.rollout)
    sync_weights(chunks, sg, cfg2, 2, model_cfg=arch)
    shift(chunks, 0.01)
    version = sync_weights(chunks, sg, cfg2, 3, model_cfg=arch)
    if rank == 0:
        import httpx

        info = httpx.get(f"{args.server_url}/model_info", timeout=30).json()
        folder = os.path.join(os.path.abspath(args.run_dir), "weights")
        result["disk_version"] = (version, sg.weight_version, info["weight_version"])
        result["disk_model_path"] = info["model_path"]
        result["disk_folders"] = sorted(os.listdir(folder))
        exported = load_file(os.path.join(folder, "step_3", "model.safetensors"))
        result["disk_max_diff"] = max_diff_to(exported, original, 0.02)
        result["disk_files"] = sorted(os.listdir(os.path.join(folder, "step_3")))
        sg.close()
    save_result(args.out, rank, result)
    distributed.destroy()


if __name__ == "__main__":
    main()
