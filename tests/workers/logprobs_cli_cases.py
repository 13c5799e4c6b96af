"""Worker: run the real `mopd logprobs` command at several layouts in one torchrun launch.

    torchrun --standalone --nproc-per-node 2 tests/workers/logprobs_cli_cases.py \
        --out DIR --input in.jsonl --cases '[{"name": "qwen2-tp2", "hf": DIR, "args": [...]}]'

The default process group is created here, once, so the command (which only tears down
the groups it created) can run case after case with different layouts; each case writes
`DIR/<name>.jsonl` through the command's own atomic writer. A failing case stops the
launch (a collective cannot be skipped on one rank only); the files of earlier cases stay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multirank import save_result  # noqa: E402

from megatron_mopd import cli  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--cases", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    done = []
    for case in json.loads(args.cases):
        output = os.path.join(args.out, f"{case['name']}.jsonl")
        argv = ["logprobs", "--hf", case["hf"], "--input", args.input, "--output", output]
        try:
            cli.main(argv + case["args"])
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"case {case['name']}: mopd logprobs exited {e.code}") from None
        dist.barrier()
        done.append(case["name"])
    save_result(args.out, rank, {"done": done})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
