"""Worker: run `mopd` commands (convert, logprobs) one after another in one launch.

    torchrun --standalone --nproc-per-node 2 tests/workers/mcore_cli_cases.py --out DIR \
        --steps '[{"name": "moe-tp2ep2", "argv": ["convert", "hf-to-mcore", ...]}, ...]'
    python tests/workers/mcore_cli_cases.py --out DIR --steps '[...]'      # one process

Under torchrun the default process group is created here once, so each command (which
tears down only the groups it created) can run at its own layout; in one process every
command creates and destroys its own. Each step records the command's exit code and wall
time; a failing step stops the launch (a collective cannot be skipped on one rank only),
the results of earlier steps are saved. Every rank saves `{step name: {...}}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import cli  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", required=True, help="JSON list of {name, argv}")
    args = parser.parse_args()
    torchrun = "RANK" in os.environ
    if torchrun:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if torchrun else 0
    results: dict[str, dict] = {}
    try:
        for step in json.loads(args.steps):
            start = time.perf_counter()
            try:
                cli.main(step["argv"])
                code = 0
            except SystemExit as e:
                code = e.code or 0
            results[step["name"]] = {"code": code, "seconds": time.perf_counter() - start}
            if code:
                raise RuntimeError(
                    f"step {step['name']}: mopd {' '.join(step['argv'])} exit {code}"
                )
            if torchrun:
                dist.barrier()
    finally:
        save_result(args.out, rank, results)
    if torchrun:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
