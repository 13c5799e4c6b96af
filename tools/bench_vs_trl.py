"""Ours vs TRL 1.16's `DistillationTrainer` on the demo's toy, in one run, alternating.

    make trl                                   # TRL in its own venv (.venv-trl), once
    python tools/bench_vs_trl.py               # 3 rounds of trl / ours / ours with overlap
    python tools/bench_vs_trl.py --pairs 5 --steps 60 --arms trl,on

Builds (or reuses) the toy exactly as `mopd demo` does (RUN_DIR/toy). Each round runs every
arm once, each in a fresh process with one CPU thread, in turn (so the machine's load
hits every arm alike): `trl` is tools/trl/distill.py under .venv-trl (nothing of TRL's is
installed into our environment); `off` and `on` are `mopd train examples/toy/mopd.yaml`
with `rollout.overlap=false` / `true` (the demo's recipe: 128 sequences per step, at most 8
new tokens, sampled-token reverse KL with IcePop; TRL's loss is the dense reverse KL over
the vocabulary, from the same teachers, one per domain).

Per arm it prints the median s/step (wall of a step, evaluation excluded, after
`--warmup` steps), tokens/s (response tokens over that time), peak RSS of the process
(`wait4`'s ru_maxrss: the process alone) and the peak memory of its whole process tree
(the sum of proportional set sizes, sampled every 50 ms: our overlapped arm's engine and
teachers run in child processes; a forked checkpoint writer's shared pages count once), each arm's whole-process wall time, and the
accuracy per domain against the training seconds before each evaluation; then every arm's
s/step as a ratio to TRL's and to ours without overlap, medians over the rounds of one
invocation. A figure-printing script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "examples", "toy", "mopd.yaml")
TRL_PY = os.path.join(REPO, ".venv-trl", "bin", "python")
TRL_SCRIPT = os.path.join(REPO, "tools", "trl", "distill.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def tree_pss_mb(pid: int) -> float:
    """The proportional set size (Pss: shared pages split among their sharers, so a
    forked child's copy-on-write pages count once) of `pid` and all its descendants now,
    in MB (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration, ValueError):
            continue
    return total / 1024


def run_process(cmd: list[str], log: str) -> tuple[float, float, float]:
    """Run `cmd` to completion (output to `log`): (wall seconds, peak RSS of the process in
    MB from `wait4`, peak Pss of its whole process tree in MB sampled every 50 ms)."""
    t0 = time.time()
    peak_tree = 0.0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_pss_mb(proc.pid))
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    rss = usage.ru_maxrss / 1024
    return time.time() - t0, rss, peak_tree


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_trl(toy, work: str, args) -> dict:
    """One TRL run: per-step seconds and tokens, evals, wall and peak RSS."""
    out = os.path.join(work, "trl.jsonl")
    cmd = [TRL_PY, TRL_SCRIPT, "--toy", toy.root, "--out", out, "--steps", str(args.steps)]
    cmd += ["--eval-interval", str(args.eval_interval), "--seed", "1234"]
    wall, rss, tree = run_process(cmd, os.path.join(work, "trl.log"))
    rows = read_jsonl(out)
    steps = [r for r in rows if "step" in r]
    evals = [r for r in rows if "eval_step" in r]
    return dict(
        seconds=[r["seconds"] for r in steps],
        tokens=[r["tokens"] for r in steps],
        evals=[(r["eval_step"], _acc(r)) for r in evals],
        wall=wall,
        rss=rss,
        tree_pss=tree,
    )


def run_ours(toy, work: str, overlap: bool, args) -> dict:
    """One `mopd train` run of the toy recipe, overlap on or off."""
    from megatron_mopd.toy.demo import toy_overrides

    run_dir = os.path.join(work, "mopd")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_mopd", "train", RECIPE, f"run_dir={run_dir}"]
    cmd += [*toy_overrides(toy), f"train.max_steps={args.steps}"]
    cmd += [f"train.eval_interval={args.eval_interval}", "checkpoint.interval=0"]
    cmd += ["checkpoint.save_hf=false", "logging.tensorboard=false", "logging.progress_bar=false"]
    cmd += [f"rollout.overlap={str(overlap).lower()}", *args.sets]
    wall, rss, tree = run_process(cmd, os.path.join(work, "mopd.log"))
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    return dict(
        seconds=[r["time/wall"] - r.get("time/eval", 0.0) for r in rows],
        tokens=[r["response_tokens"] for r in rows],
        evals=[(r["step"], _acc(r)) for r in evals],
        wall=wall,
        rss=rss,
        tree_pss=tree,
    )


def _acc(row: dict) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval_acc/")}


def summarize(run: dict, warmup: int) -> dict:
    """s/step and tokens/s after the warm-up; accuracy against cumulative training seconds."""
    secs, toks = run["seconds"][warmup:], run["tokens"][warmup:]
    elapsed = [sum(run["seconds"][:s]) for s, _ in run["evals"]]
    return dict(
        s_per_step=statistics.median(secs),
        tokens_per_s=sum(toks) / sum(secs),
        wall=run["wall"],
        rss=run["rss"],
        tree_pss=run["tree_pss"],
        curve=[(s, t, a) for (s, a), t in zip(run["evals"], elapsed)],
    )


def print_figures(results: dict[str, list[dict]], args) -> None:
    """The per-arm table, the accuracy curves of the last round, and the ratios."""
    med = {
        arm: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "curve"}
        for arm, rs in results.items()
    }
    print(f"\n{args.pairs} rounds, {args.steps} steps each, medians over rounds")
    print(
        f"{'arm':<6}{'s/step':>9}{'tokens/s':>10}{'RSS MB':>8}{'tree PSS MB':>13}{'process s':>11}"
    )
    for arm, m in med.items():
        print(
            f"{arm:<6}{m['s_per_step']:>9.4f}{m['tokens_per_s']:>10.0f}"
            f"{m['rss']:>8.0f}{m['tree_pss']:>13.0f}{m['wall']:>11.1f}"
        )
    print("\naccuracy vs training seconds (last round): step, s, per-domain accuracy")
    for arm, rs in results.items():
        points = "  ".join(
            f"{s}:{t:.1f}s " + "/".join(f"{v:.2f}" for _, v in sorted(a.items()))
            for s, t, a in rs[-1]["curve"]
        )
        print(f"  {arm:<5} {points}")
    base = med.get("trl")
    own = med.get("off")
    print()
    for arm, m in med.items():
        parts = []
        if base:
            parts.append(f"{m['s_per_step'] / base['s_per_step']:.2f}x TRL's s/step")
            parts.append(f"{m['tree_pss'] / base['tree_pss']:.2f}x TRL's peak tree PSS")
        if own:
            parts.append(f"{m['s_per_step'] / own['s_per_step']:.2f}x ours without overlap")
        print(f"{arm}: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> None:
    """Run the rounds and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo", help="where the toy is (built if missing)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3, help="rounds of every arm")
    p.add_argument("--arms", default="trl,off,on", help="comma-separated: trl, off, on")
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="sets",
        help="extra overrides of our runs",
    )
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if bad := [a for a in arms if a not in ("trl", "off", "on")]:
        p.error(f"--arms: unknown {bad} (choose from trl, off, on)")
    if "trl" in arms and not os.path.exists(TRL_PY):
        sys.exit(f"{TRL_PY} is missing: run `make trl` first (TRL in its own environment)")

    from megatron_mopd.toy.build import build_toy

    toy = build_toy(args.run_dir)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for rnd in range(args.pairs):
        for arm in arms[rnd % len(arms) :] + arms[: rnd % len(arms)]:
            work = os.path.join(args.run_dir, "bench_vs_trl", arm)
            os.makedirs(work, exist_ok=True)
            run = (
                run_trl(toy, work, args) if arm == "trl" else run_ours(toy, work, arm == "on", args)
            )
            s = summarize(run, args.warmup)
            results[arm].append(s)
            last = s["curve"][-1][2] if s["curve"] else {}
            final = " ".join(f"{d}={v:.3f}" for d, v in sorted(last.items())) or "-"
            print(
                f"round {rnd + 1} {arm:<4} {s['s_per_step']:.4f} s/step "
                f"{s['tokens_per_s']:.0f} tok/s rss {s['rss']:.0f} MB "
                f"wall {s['wall']:.1f} s  final {final}",
                flush=True,
            )
    print_figures(results, args)


if __name__ == "__main__":
    main()
