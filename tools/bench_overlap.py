"""Overlap on vs off on the demo's toy: s/step, and whether a step costs its longest stage.

    python tools/bench_overlap.py                         # embedded engines, 3 pairs of runs
    python tools/bench_overlap.py --sglang                # rollouts + teachers on real SGLang
    python tools/bench_overlap.py --set rollout.embedded_subprocess=off   # extra overrides

Builds (or reuses) the toy exactly as `mopd demo` does (RUN_DIR/toy), then runs `mopd train`
of examples/toy/mopd.yaml for `--steps` steps (no eval, no checkpoints) with
`rollout.overlap=false` and `=true`, alternating (`--pairs` pairs, so the machine's load
hits both arms alike), each run in a fresh process. Per arm it prints the median s/step
(wall, the steps after `--warmup`), the mean of each stage, and for the overlapped arm
how the step compares with its stages (sampling, scoring, training, weight sync, rewards,
each its mean time): the sum (what a serial step costs) and the longest. The weight sync
waits for the sampling in flight by design (a step's rollouts come from one version), so
with sampling the longest stage the step is at least sampling + sync. All ratios come
from the same invocation. A figure-printing script, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "examples", "toy", "mopd.yaml")
# stages of a step: the main thread's, and the producer's (in the background with overlap)
MAIN = ("batch", "train", "engine_wait", "weight_sync")
PRODUCER = ("rollout", "teacher", "teacher_tail", "reward")


def run_arm(run_dir: str, overrides: list[str], log: str) -> list[dict]:
    """One `mopd train` in a fresh process; its metrics rows."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_mopd", "train", RECIPE, f"run_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"mopd train failed (exit {rc}); see {log}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r.get(f"time/{key}", 0.0) for r in rows)


def main(argv: list[str] | None = None) -> None:
    """Run the pairs and print the figures."""
    from megatron_mopd.toy.build import build_toy
    from megatron_mopd.toy.demo import sglang_overrides, toy_overrides

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo", help="where the toy is (built if missing)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--sglang", action="store_true", help="rollouts and teachers on real SGLang")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    args = p.parse_args(argv)

    toy = build_toy(args.run_dir)
    base = [
        *toy_overrides(toy),
        f"train.max_steps={args.steps}",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.save_hf=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        *args.sets,
    ]
    arms = {"off": ["rollout.overlap=false"], "on": ["rollout.overlap=true"]}
    bench_dir = os.path.join(args.run_dir, "bench_overlap")
    os.makedirs(bench_dir, exist_ok=True)
    stack = contextlib.ExitStack()
    with stack:
        if args.sglang:
            from megatron_mopd.toy.sglang_servers import LocalSGLang

            specs = {
                "student": (toy.student, []),
                "add": (toy.teachers["add"], []),
                "reverse": (toy.teachers["reverse"], []),
            }
            print("starting 3 SGLang servers ...", flush=True)
            servers = stack.enter_context(
                LocalSGLang.start_all(specs, os.path.join(bench_dir, "sglang"))
            )
            base += sglang_overrides(servers)
        rows: dict[str, list[dict]] = {a: [] for a in arms}
        walls: dict[str, list[float]] = {a: [] for a in arms}
        for pair in range(args.pairs):
            for arm, extra in arms.items():
                t0 = time.time()
                got = run_arm(
                    os.path.join(bench_dir, arm),
                    [*base, *extra],
                    os.path.join(bench_dir, f"{arm}.log"),
                )[args.warmup :]
                rows[arm] += got
                walls[arm].append(statistics.median(r["time/wall"] for r in got))
                print(
                    f"pair {pair + 1}/{args.pairs} {arm:>3}: median {walls[arm][-1]:.3f} s/step "
                    f"({time.time() - t0:.0f} s for the run)",
                    flush=True,
                )

    report(rows, args)


def report(rows: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Print both arms' stages, s/step and tokens/s, and the overlapped step against its
    longest stage and the sum of its stages."""
    where = "real SGLang servers" if args.sglang else "embedded engines"
    print(
        f"\n{args.steps} steps x {args.pairs} runs per arm ({where}), first {args.warmup} left out"
    )
    print(f"{'stage (mean s)':<18}{'off':>9}{'on':>9}")
    for key in (*PRODUCER, *MAIN, "wall"):
        print(f"{key:<18}{mean(rows['off'], key):>9.4f}{mean(rows['on'], key):>9.4f}")
    med = {a: statistics.median(r["time/wall"] for r in rows[a]) for a in rows}
    tok = {
        a: sum(r["response_tokens"] for r in rows[a]) / sum(r["time/wall"] for r in rows[a])
        for a in rows
    }
    print(
        f"median s/step: off {med['off']:.4f}, on {med['on']:.4f}: on/off = {med['on'] / med['off']:.3f}"
    )
    print(f"response tokens/s: off {tok['off']:.0f}, on {tok['on']:.0f}")
    on = rows["on"]
    # the stages as work, each on its own worker: the engine samples, the teachers score
    # (first piece handed over to last one scored), the trainer trains and syncs; with
    # overlap the scoring of one step runs beside the sampling of the next
    stages = {k: mean(on, k) for k in ("rollout", "teacher", "train", "weight_sync", "reward")}
    longest = max(stages, key=stages.get)
    total = sum(stages.values())
    wall = mean(on, "wall")
    print(
        f"overlapped step: {wall:.4f} s; its stages: "
        + ", ".join(f"{k} {v:.4f}" for k, v in stages.items())
        + f"; step / longest ({longest}) = {wall / stages[longest]:.2f}, "
        f"step / sum = {wall / total:.2f}"
    )
    stale = [r.get("rollout/staleness") for r in on]
    print(f"staleness of trained rollouts: {sorted(set(stale))}")


if __name__ == "__main__":
    main()
