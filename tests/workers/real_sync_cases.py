"""Worker: weight sync from a TP2 Megatron student into a real SGLang server, every mode.

    torchrun --standalone --nproc-per-node 2 tests/workers/real_sync_cases.py --out DIR \
        --hf HF_DIR --run-dir RUN_DIR --url URL --port PORT --bucket-mb MB

URL serves HF_DIR (real SGLang, with `--api-key` from $MOPD_TEST_KEY). For each mode in
turn (disk, tensor, distributed over gloo) every Megatron parameter is shifted by a known
amount, the student is synced through `weight_sync.sync_weights` (the export gathers each
tensor from both TP ranks), and rank 0 scores fixed sequences on the server against
transformers' forward of the HF weights it should now hold (the original plus the
shifts, written to a folder of its own). Rank 0 saves the differences, the versions the
server reports, and the seconds each sync took.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402
from sglang_helpers import random_seqs, reference_logprobs  # noqa: E402
from weight_sync_cases import shift  # noqa: E402  (this folder is on sys.path[0])

from megatron_mopd import distributed  # noqa: E402
from megatron_mopd.config import load_config  # noqa: E402


def expected_folder(hf: str, out: str, delta: float) -> str:
    """`hf` with every weight shifted by `delta` (what the server should serve)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(hf):
        if name != "model.safetensors":
            shutil.copy(os.path.join(hf, name), out)
    weights = load_file(os.path.join(hf, "model.safetensors"))
    save_file({k: v + delta for k, v in weights.items()}, os.path.join(out, "model.safetensors"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket-mb", type=float, required=True)
    args = parser.parse_args()

    from megatron_mopd.rollout.factory import build_rollout_engine
    from megatron_mopd.rollout.weight_sync import sync_weights
    from megatron_mopd.sglang.client import SGLangClient
    from megatron_mopd.student.load import build_student

    base = [f"model.hf_path={args.hf}", "parallel.tp=2", f"run_dir={args.run_dir}"]
    cfg = load_config(None, base)
    distributed.init_distributed(cfg.parallel, seed=0)
    chunks, arch = build_student(cfg.model, cfg.parallel)
    rank = torch.distributed.get_rank()
    seqs = random_seqs(6, 3, 40, vocab=128, seed=4)
    result: dict = {}
    total = 0.0
    for step, mode in enumerate(("disk", "tensor", "distributed"), start=1):
        mcfg = load_config(
            None,
            [
                *base,
                "rollout.backend=sglang",
                f"rollout.urls=[{args.url}]",
                "rollout.api_key_env=MOPD_TEST_KEY",
                f"rollout.weight_sync={mode}",
                f"rollout.weight_sync_bucket_mb={args.bucket_mb}",
                "rollout.weight_sync_address=127.0.0.1",
                f"rollout.weight_sync_port={args.port}",
            ],
        )
        delta = 0.01 * step
        total += delta
        shift(chunks, delta)
        engine = build_rollout_engine(mcfg) if rank == 0 else None
        t0 = time.perf_counter()
        version = sync_weights(chunks, engine, mcfg, step, model_cfg=arch)
        seconds = time.perf_counter() - t0
        if rank == 0:
            ref_dir = expected_folder(args.hf, os.path.join(args.run_dir, f"ref_{mode}"), total)
            reference = reference_logprobs(ref_dir, seqs)
            with SGLangClient([args.url], api_key=os.environ["MOPD_TEST_KEY"]) as client:
                scored = client.score(seqs)
                info = client.model_info()
            diff = max(abs(a - b) for s, r in zip(scored, reference) for a, b in zip(s.logprobs, r))
            result[mode] = {
                "version": (version, engine.weight_version, info["weight_version"]),
                "max_diff": diff,
                "seconds": seconds,
            }
            engine.close()
        torch.distributed.barrier()
    save_result(args.out, rank, result)
    distributed.destroy()


if __name__ == "__main__":
    main()
