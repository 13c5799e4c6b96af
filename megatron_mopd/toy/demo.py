"""The CPU demo behind `make demo`: MOPD in miniature, end to end.

    python -m megatron_mopd demo [--run-dir runs/demo] [--nproc 1] [--sglang] [key=value ...]

1. Build the toy (`toy.build`): a character tokenizer, two synthetic domains (`add`,
   `reverse`), one small MoE teacher per domain fine-tuned on its domain, and a weak MoE
   student fine-tuned on an easier distribution (cached under RUN_DIR/toy).
2. Train the student with MOPD (`examples/toy/mopd.yaml`): Megatron student, embedded
   rollout engine, both teachers routed by domain, sampled-token reverse-KL advantage
   with IcePop weights (MiMo's form), LR warmup. A fresh run each time (RUN_DIR/mopd).
   With `--sglang` (`make demo-sglang`) the rollout engine and both teachers are real
   SGLang 0.5.23 servers started here (`toy.sglang_servers`; needs `make sglang`), the
   student's weights reaching the rollout server from disk after every step, as on a
   cluster; their logs go to RUN_DIR/sglang.
3. Evaluate teachers, the student before and the student after with one function
   (greedy decoding through the same engine, exact match on the same held-out prompts),
   print a table, write RUN_DIR/summary.json and RUN_DIR/figure.png (per-domain accuracy
   against step, each teacher's accuracy dashed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from megatron_mopd.errors import UserError

RECIPE = os.path.join("examples", "toy", "mopd.yaml")


def evaluate_folder(hf_dir: str, eval_jsonl: str, max_new_tokens: int, domains=None) -> dict:
    """Greedy exact-match accuracy per domain of the HF model in `hf_dir` on `eval_jsonl`."""
    from megatron_mopd.data import load_prompts, tokenize_prompts
    from megatron_mopd.rewards import exact_match
    from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine
    from megatron_mopd.types import SamplingParams

    engine = EmbeddedRolloutEngine(hf_dir, seed=0, batch_size=1024)  # the eval set: one batch
    tok = engine.tokenizer
    records = [r for r in load_prompts(eval_jsonl) if domains is None or r.domain in domains]
    ids = tokenize_prompts(records, tok)
    outs = engine.generate(
        ids,
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_token_ids=[tok.eos_token_id],
            seed=0,
        ),
    )
    hits: dict[str, list[float]] = {}
    for rec, out in zip(records, outs):
        resp = out.response_ids
        if resp and resp[-1] == tok.eos_token_id:
            resp = resp[:-1]
        text = tok.decode(resp, skip_special_tokens=True)
        hits.setdefault(rec.domain, []).append(exact_match(text, rec.answer or ""))
    engine.close()
    return {d: sum(v) / len(v) for d, v in sorted(hits.items())}


def toy_overrides(toy) -> list[str]:
    """Recipe overrides pointing `examples/toy/mopd.yaml` at a built toy (`toy.build`), so
    that a toy built elsewhere than runs/demo/toy is the one trained on."""
    return [
        f"model.hf_path={toy.student}",
        f"data.train_path={toy.train_jsonl}",
        f"data.eval_path={toy.eval_jsonl}",
        f"teachers.adder.hf_path={toy.teachers['add']}",
        f"teachers.reverser.hf_path={toy.teachers['reverse']}",
    ]


def train_recipe(run_dir: str, nproc: int, overrides: list[str]) -> None:
    """`mopd train` of the toy recipe with `overrides`: in this process, or under torchrun
    with `nproc` processes."""
    args = ["train", RECIPE, f"run_dir={run_dir}", *overrides]
    if nproc == 1:
        from megatron_mopd.config import load_config
        from megatron_mopd.trainer import train

        train(load_config(RECIPE, args[2:]))
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_mopd",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if subprocess.call(cmd, env=env) != 0:
        raise UserError(f"training failed: {' '.join(cmd)}")


def eval_curves(mopd_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Per-domain `(step, accuracy)` points from a run's eval.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {}
    path = os.path.join(mopd_dir, "eval.jsonl")
    if os.path.exists(path):
        for line in open(path):
            row = json.loads(line)
            for key, value in row.items():
                if key.startswith("eval_acc/"):
                    curves.setdefault(key.split("/", 1)[1], []).append((row["step"], value))
    return curves


def plot(curves: dict, teachers: dict[str, float], out_png: str) -> None:
    """Per-domain accuracy against step; teachers as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (domain, points) in enumerate(sorted(curves.items())):
        color = f"C{i}"
        steps, accs = zip(*points)
        ax.plot(steps, accs, color=color, marker="o", ms=3, label=f"student: {domain}")
        if domain in teachers:
            ax.axhline(teachers[domain], color=color, ls="--", lw=1, label=f"teacher: {domain}")
    ax.set_xlabel("MOPD step")
    ax.set_ylabel("greedy exact match (held-out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("MOPD on CPU: student vs. domain teachers")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def sglang_overrides(servers) -> list[str]:
    """Recipe overrides sending the rollouts and both teachers to real SGLang servers."""
    return [
        "rollout.backend=sglang",
        f"rollout.urls=[{servers['student'].url}]",
        "rollout.weight_sync=disk",
        "teachers.adder.backend=sglang",
        f"teachers.adder.urls=[{servers['add'].url}]",
        "teachers.reverser.backend=sglang",
        f"teachers.reverser.urls=[{servers['reverse'].url}]",
    ]


def run_demo(
    run_dir: str = "runs/demo",
    nproc: int = 1,
    overrides: list[str] | None = None,
    sglang: bool = False,
) -> dict:
    """Build the toy, train with MOPD (rollouts and teachers on real SGLang servers with
    `sglang`), evaluate; returns the summary."""
    from megatron_mopd.config import load_config
    from megatron_mopd.toy.build import build_toy

    if not os.path.exists(RECIPE):
        raise UserError(f"{RECIPE} not found: run the demo from the repository root")
    t0 = time.time()
    print("== 1/3 building the toy: tokenizer, tasks, teachers, weak student (cached)", flush=True)
    toy = build_toy(run_dir)
    mopd_dir = os.path.join(run_dir, "mopd")
    shutil.rmtree(mopd_dir, ignore_errors=True)  # a fresh MOPD run each time
    overrides = [*toy_overrides(toy), *(overrides or [])]
    cfg = load_config(RECIPE, [f"run_dir={mopd_dir}", *overrides])
    where = "real SGLang servers" if sglang else "embedded engines"
    print(
        f"== 2/3 MOPD: {cfg.train.max_steps} steps, {nproc} process(es), rollouts and "
        f"teachers on {where}",
        flush=True,
    )
    t_train = time.time()
    if sglang:
        from megatron_mopd.rollout.factory import HF_DTYPES
        from megatron_mopd.toy.sglang_servers import LocalSGLang

        # the rollout server computes log mu in rollout.dtype (bf16: a real mismatch)
        specs = {
            "student": (toy.student, ["--dtype", HF_DTYPES[cfg.rollout.dtype]]),
            "add": (toy.teachers["add"], []),
            "reverse": (toy.teachers["reverse"], []),
        }
        print("   starting 3 SGLang servers (logs in RUN_DIR/sglang)", flush=True)
        with LocalSGLang.start_all(specs, os.path.join(run_dir, "sglang")) as servers:
            train_recipe(mopd_dir, nproc, [*overrides, *sglang_overrides(servers)])
            stubs = servers.stub_calls()
        if stubs:
            raise UserError(f"the sgl_kernel stand-in was called: {stubs[:3]}")
    else:
        train_recipe(mopd_dir, nproc, overrides)
    t_train = time.time() - t_train
    print("== 3/3 evaluating teachers and student on held-out prompts", flush=True)
    max_new = cfg.rollout.max_new_tokens
    teacher_acc = {
        d: evaluate_folder(path, toy.eval_jsonl, max_new, domains={d})[d]
        for d, path in sorted(toy.teachers.items())
    }
    before = evaluate_folder(toy.student, toy.eval_jsonl, max_new)
    after = evaluate_folder(os.path.join(mopd_dir, "hf_final"), toy.eval_jsonl, max_new)
    summary = {
        "domains": {
            d: {"teacher": teacher_acc[d], "student_before": before[d], "student_after": after[d]}
            for d in sorted(teacher_acc)
        },
        "steps": cfg.train.max_steps,
        "wall_seconds": round(time.time() - t0, 1),
        "mopd_seconds": round(t_train, 1),
        "reached_teachers": all(after[d] >= teacher_acc[d] - 0.02 for d in teacher_acc),
        "backends": "sglang" if sglang else "embedded",
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(eval_curves(mopd_dir), teacher_acc, os.path.join(run_dir, "figure.png"))
    print_summary(summary)
    print(f"wrote {run_dir}/summary.json, {run_dir}/figure.png, {mopd_dir}/metrics.jsonl")
    return summary


def print_summary(summary: dict) -> None:
    """The demo's table (teacher, student before and after, per domain) and its totals."""
    print()
    print(f"{'domain':<10}{'teacher':>10}{'before':>10}{'after':>10}")
    for d, row in summary["domains"].items():
        print(
            f"{d:<10}{row['teacher']:>10.3f}{row['student_before']:>10.3f}"
            f"{row['student_after']:>10.3f}"
        )
    print(
        f"\n{summary['steps']} MOPD steps, {summary['wall_seconds']} s in all "
        f"({summary['mopd_seconds']} s of MOPD). Student reached every teacher (within 0.02): "
        f"{summary['reached_teachers']}"
    )
