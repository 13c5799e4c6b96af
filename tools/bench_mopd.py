"""Where a MOPD step's time goes: rollout, teacher scoring, training, weight sync, overhead.

    python tools/bench_mopd.py                      # tiny models built here, 30 steps
    python tools/bench_mopd.py --recipe examples/toy/mopd.yaml --steps 40   # after make demo

Runs the trainer for a fixed number of steps (one process, no eval, no checkpoints
except the last) and prints, averaged over the steps after the warm-up ones, each
stage's share of the step's wall time, the trainer's own overhead (everything that is
not one of the four stages: batching, broadcast, bookkeeping, logging) and end-to-end
response tokens per second. A figure-printing script, not a test.

    python tools/bench_mopd.py --recipe examples/toy/mopd.yaml --loss sampled,topk_reverse_kl \
        --rounds 3 --pythonpath /path/to/old_checkout,.   # before/after, alternating

With `--loss`, each estimator (and each checkout of `--pythonpath`, whose megatron_mopd the
child imports) is timed in its own child process, in turn, `--rounds` times, and the mean
s/step of each and its ratio to the first estimator are printed. A top-k estimator sets
every teacher's `top_k` to `--top-k` (default: the student's vocabulary, a full top-k).
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


def timed_run(recipe: str, steps: int, warmup: int, overrides: list[str]) -> list[dict]:
    """Train `steps` steps of `recipe` in this process; the metrics rows after `warmup`."""
    import time

    from megatron_mopd.config import load_config
    from megatron_mopd.logger import MetricsLogger
    from megatron_mopd.trainer import train

    log = MetricsLogger.log

    def log_with_cpu(self, step, metrics, kind="train"):  # this process's CPU seconds so far
        log(self, step, {**metrics, "bench/cpu": time.process_time()}, kind)

    MetricsLogger.log = log_with_cpu  # (the CPU time is steadier than the wall on a busy host)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cfg = load_config(
            recipe,
            [
                f"run_dir={run_dir}",
                f"train.max_steps={steps}",
                "train.eval_interval=0",
                "checkpoint.interval=0",
                "checkpoint.save_hf=false",
                "logging.tensorboard=false",
                "logging.progress_bar=false",
                *overrides,
            ],
        )
        train(cfg)
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    MetricsLogger.log = log
    for prev, row in zip(rows, rows[1:]):
        row["time/cpu"] = row["bench/cpu"] - prev["bench/cpu"]
    rows = rows[max(warmup, 1) :]
    if not rows:
        sys.exit("no steps left after the warm-up: raise --steps")
    return rows


def print_table(label: str, rows: list[dict]) -> None:
    """Each stage's mean s/step and share of the step, overhead, tokens/s."""
    wall = statistics.mean(r["time/wall"] for r in rows)
    print(f"recipe: {label}; {len(rows)} steps timed")
    print(f"{'stage':<14}{'s/step':>10}{'share':>9}")
    for stage in (*STAGES, "overhead"):
        t = statistics.mean(r.get(f"time/{stage}", 0.0) for r in rows)
        print(f"{stage:<14}{t:>10.4f}{t / wall:>9.1%}")
    print(f"{'step (wall)':<14}{wall:>10.4f}{1:>9.0%}")
    cpu = statistics.mean(r["time/cpu"] for r in rows)
    print(f"{'step (CPU)':<14}{cpu:>10.4f}  (this process, all threads)")
    tokens = sum(r["response_tokens"] for r in rows)
    seconds = sum(r["time/wall"] for r in rows)
    print(f"end-to-end: {tokens / seconds:.1f} response tokens/s")
    overhead = statistics.mean(r["time/overhead"] for r in rows) / wall
    verdict = "under" if overhead < 0.10 else "OVER"
    print(f"trainer overhead: {overhead:.1%} of step time ({verdict} the 10% goal)")


def loss_overrides(recipe: str, estimator: str, top_k: int, overrides: list[str]) -> list[str]:
    """`loss.estimator=estimator`, and for a top-k estimator every teacher's `top_k`
    (`top_k` 0: the student's vocabulary, i.e. the full distribution)."""
    from megatron_mopd.config import load_config

    out = [f"loss.estimator={estimator}"]
    if estimator == "sampled":
        return out
    cfg = load_config(recipe, overrides)
    if top_k <= 0:
        top_k = cfg.model.vocab_size
        if cfg.model.hf_path:
            with open(os.path.join(cfg.model.hf_path, "config.json")) as f:
                top_k = json.load(f)["vocab_size"]
    return out + [f"teachers.{name}.top_k={top_k}" for name in cfg.teachers]


def compare(args: argparse.Namespace, recipe: str) -> None:
    """Time each estimator of `--loss` (and each checkout of `--pythonpath`) in its own
    child process, alternating, `--rounds` times; print the median over rounds of each
    one's s/step (the step's wall and CPU time, the teacher / train / overhead stages) and
    the ratios of its step's wall and CPU time to the first estimator's."""
    import subprocess

    losses = args.loss.split(",")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = args.pythonpath.split(",") if args.pythonpath else [here]
    cols = ("wall", "cpu", "teacher", "train", "overhead")
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        for r in range(args.rounds):
            for tree in trees:
                for loss in losses:
                    extra = loss_overrides(recipe, loss, args.top_k, args.overrides)
                    cmd = [sys.executable, os.path.abspath(__file__), "--recipe", recipe]
                    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                    cmd += ["--rows-json", out, *args.overrides, *extra]
                    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                    with open(out) as f:
                        rows = json.load(f)
                    t = {c: statistics.mean(x.get(f"time/{c}", 0.0) for x in rows) for c in cols}
                    runs.setdefault((tree, loss), []).append(t)
                    figures = ", ".join(f"{c} {v:.4f}" for c, v in t.items())
                    print(f"round {r}: {tree} {loss}: {figures} s/step", flush=True)
    print(f"medians over {args.rounds} rounds, s/step; ratios: step / {losses[0]}'s step")
    head = "".join(f"{c:>10}" for c in cols) + f"{'ratio':>8}{'cpu ratio':>11}"
    print(f"{'checkout':<28}{'loss':<18}{head}")
    for tree in trees:
        med = {
            loss: {c: statistics.median(t[c] for t in runs[(tree, loss)]) for c in cols}
            for loss in losses
        }
        for loss in losses:
            figures = "".join(f"{med[loss][c]:>10.4f}" for c in cols)
            ratio = med[loss]["wall"] / med[losses[0]]["wall"]
            cpu = med[loss]["cpu"] / med[losses[0]]["cpu"]
            print(f"{tree:<28}{loss:<18}{figures}{ratio:>8.3f}{cpu:>11.3f}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="a recipe to time (default: tiny models built here)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the averages")
    parser.add_argument(
        "--loss",
        help="comma-separated loss.estimator values to compare (e.g. sampled,topk_reverse_kl),"
        " each timed in a child process, alternating",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="every teacher's top_k for a top-k estimator (default: the student's vocabulary)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternations with --loss")
    parser.add_argument(
        "--pythonpath",
        help="with --loss: comma-separated checkouts whose megatron_mopd the children import "
        "(a before/after comparison)",
    )
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)  # a child's timed rows
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        recipe = args.recipe or tiny_setup(tmp)
        if args.loss:
            compare(args, recipe)
            return
        rows = timed_run(recipe, args.steps, args.warmup, args.overrides)
    if args.rows_json:
        with open(args.rows_json, "w") as f:
            json.dump(rows, f)
    print_table(args.recipe or "tiny models (built here)", rows)


if __name__ == "__main__":
    main()
