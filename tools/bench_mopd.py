"""Where a MOPD step's time goes: rollout, teacher scoring, training, weight sync, overhead.

    python tools/bench_mopd.py                      # tiny models built here, 30 steps
    python tools/bench_mopd.py --recipe examples/toy/mopd.yaml --steps 40   # after make demo

Runs the trainer for a fixed number of steps (one process, no eval, no checkpoints
except the last) and prints, averaged over the steps after the warm-up ones, each
stage's share of the step's wall time, the trainer's own overhead (everything that is
not one of the four stages: batching, broadcast, bookkeeping, logging) and end-to-end
response tokens per second. A figure-printing script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

STAGES = ("rollout", "teacher", "reward", "train", "weight_sync")


def tiny_setup(root: str) -> str:
    """Tiny student and teachers plus a two-domain dataset; returns a recipe path."""
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    make_tiny_hf_model("qwen3_moe", f"{root}/student", seed=0)
    make_tiny_hf_model("qwen3_moe", f"{root}/teacher_a", seed=1)
    make_tiny_hf_model("qwen3_moe", f"{root}/teacher_b", seed=2)
    with open(f"{root}/train.jsonl", "w") as f:
        for i in range(256):
            f.write(json.dumps({"prompt": f"{i}+{i % 7}=", "domain": "a", "answer": "x"}) + "\n")
            f.write(json.dumps({"prompt": f"rev:{i:x}=", "domain": "b", "answer": "y"}) + "\n")
    recipe = f"{root}/bench.yaml"
    with open(recipe, "w") as f:
        f.write(
            f"""
model: {{hf_path: {root}/student}}
data: {{train_path: {root}/train.jsonl}}
rollout: {{n_samples_per_prompt: 4, max_new_tokens: 16}}
teachers:
  ta: {{hf_path: {root}/teacher_a, domains: [a]}}
  tb: {{hf_path: {root}/teacher_b, domains: [b]}}
train: {{prompts_per_step: 16, micro_batch_size: 32, lr: 1.0e-4, lr_warmup_steps: 5}}
"""
        )
    return recipe


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="a recipe to time (default: tiny models built here)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the averages")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from megatron_mopd.config import load_config
    from megatron_mopd.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        recipe = args.recipe or tiny_setup(tmp)
        run_dir = os.path.join(tmp, "run")
        cfg = load_config(
            recipe,
            [
                f"run_dir={run_dir}",
                f"train.max_steps={args.steps}",
                "train.eval_interval=0",
                "checkpoint.interval=0",
                "checkpoint.save_hf=false",
                "logging.tensorboard=false",
                "logging.progress_bar=false",
                *args.overrides,
            ],
        )
        train(cfg)
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = rows[args.warmup :]
    if not rows:
        sys.exit("no steps left after the warm-up: raise --steps")
    wall = statistics.mean(r["time/wall"] for r in rows)
    print(f"recipe: {args.recipe or 'tiny models (built here)'}; {len(rows)} steps timed")
    print(f"{'stage':<14}{'s/step':>10}{'share':>9}")
    for stage in (*STAGES, "overhead"):
        t = statistics.mean(r.get(f"time/{stage}", 0.0) for r in rows)
        print(f"{stage:<14}{t:>10.4f}{t / wall:>9.1%}")
    print(f"{'step (wall)':<14}{wall:>10.4f}{1:>9.0%}")
    tokens = sum(r["response_tokens"] for r in rows)
    seconds = sum(r["time/wall"] for r in rows)
    print(f"end-to-end: {tokens / seconds:.1f} response tokens/s")
    overhead = statistics.mean(r["time/overhead"] for r in rows) / wall
    verdict = "under" if overhead < 0.10 else "OVER"
    print(f"trainer overhead: {overhead:.1%} of step time ({verdict} the 10% goal)")


if __name__ == "__main__":
    main()
