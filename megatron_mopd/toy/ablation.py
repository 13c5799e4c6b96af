"""The ablation behind MiMo's MOPD figure, on the CPU toy (`make ablation`).

    python -m megatron_mopd ablation [--run-dir runs/ablation] [--toy-dir runs/demo]
                                     [--arms orm_only,mopd,...] [--steps N] [key=value ...]

Every arm trains the same weak student from the same toy (built or reused by
`toy.build`, the demo's cache), on the same prompts in the same order (same seed), with
the recipe `examples/toy/mopd.yaml`, and differs only in the loss:

- `orm_only`: RL on the outcome reward alone (GRPO advantages of the exact-match reward,
  `loss.alpha=1`, `loss.distill_coef=0`): what the student learns without a teacher.
- `mopd_no_orm`: MOPD without the outcome reward (`alpha = 0`, the demo's setting).
- `mopd_orm`: MOPD plus the outcome reward (`alpha = 1`).
- `mopd_topk`: MOPD with the dense top-k reverse KL (teachers return their top 8) instead
  of the sampled-token advantage (`alpha = 0`): the estimator comparison.

The trainer evaluates greedy exact match on the held-out prompts every `eval_interval`
steps (and at step 0). Written: RUN_DIR/<arm>/ (each arm's run: metrics.jsonl,
eval.jsonl, TensorBoard), RUN_DIR/summary.json (each arm's per-domain accuracy curve, its
final accuracy, and the first evaluated step at which it reaches the teacher's level,
i.e. accuracy >= teacher - 0.02, or null) and RUN_DIR/figure.png (one panel per domain,
one line per arm, the teacher dashed). One seed per arm: per-evaluation noise is about
+-0.02 here (see the demo), so read differences of a few points as ties.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from megatron_mopd.errors import UserError

TOLERANCE = 0.02  # "at the teacher's level": accuracy >= teacher - TOLERANCE


@dataclass(frozen=True)
class Arm:
    """One arm of the ablation: a name, what it tests, and its recipe overrides."""

    name: str
    description: str
    overrides: tuple[str, ...]


ARMS = (
    Arm(
        "orm_only",
        "RL on the outcome reward only (GRPO, no teacher)",
        ("loss.alpha=1.0", "loss.distill_coef=0"),
    ),
    Arm("mopd_no_orm", "MOPD, sampled-token advantage, alpha = 0", ("loss.alpha=0",)),
    Arm("mopd_orm", "MOPD + outcome reward, alpha = 1", ("loss.alpha=1.0",)),
    Arm(
        "mopd_topk",
        "MOPD, dense top-8 reverse KL, alpha = 0",
        (
            "loss.alpha=0",
            "loss.estimator=topk_reverse_kl",
            "teachers.adder.top_k=8",
            "teachers.reverser.top_k=8",
        ),
    ),
)
ARM_NAMES = tuple(a.name for a in ARMS)


def first_step_at(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first evaluated step whose accuracy is >= `level`, or None."""
    for step, acc in curve:
        if acc >= level:
            return step
    return None


def summarize_arm(
    arm: Arm, curves: dict[str, list[tuple[int, float]]], teachers: dict[str, float], seconds: float
) -> dict:
    """One arm's entry of summary.json."""
    return {
        "description": arm.description,
        "overrides": list(arm.overrides),
        "curves": {d: [[s, a] for s, a in pts] for d, pts in sorted(curves.items())},
        "final": {d: pts[-1][1] for d, pts in sorted(curves.items()) if pts},
        "first_step_at_teacher": {
            d: first_step_at(curves.get(d, []), teachers[d] - TOLERANCE) for d in sorted(teachers)
        },
        "seconds": round(seconds, 1),
    }


def plot(summary: dict, out_png: str) -> None:
    """One panel per domain: each arm's accuracy against step, the teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(summary["teachers"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for i, (name, arm) in enumerate(summary["arms"].items()):
            pts = arm["curves"].get(d, [])
            if pts:
                steps, accs = zip(*pts)
                ax.plot(steps, accs, color=f"C{i}", marker="o", ms=2.5, label=name)
        ax.axhline(summary["teachers"][d], color="k", ls="--", lw=1, label="teacher")
        ax.set_title(f"{d}")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("greedy exact match (held-out)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Ablation on the CPU toy: ORM-only RL vs MOPD (same student, data, seed)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def run_ablation(
    run_dir: str = "runs/ablation",
    toy_dir: str = "runs/demo",
    arms: list[str] | None = None,
    steps: int | None = None,
    nproc: int = 1,
    overrides: list[str] | None = None,
    mistake_rate: float | None = None,
) -> dict:
    """Run the arms (fresh runs, sequentially) and write summary.json and figure.png.

    `mistake_rate` (default: the toy's, 0.7) is how often the weak student's training data
    shows the systematic mistake (`toy.tasks.mistake`); a higher rate gives a weaker
    student and rarer outcome rewards. A toy with another rate needs its own `toy_dir`.
    """
    import dataclasses

    from megatron_mopd.config import load_config
    from megatron_mopd.toy.build import ToyConfig, build_toy
    from megatron_mopd.toy.demo import RECIPE, _curves, _train, evaluate_folder, toy_overrides

    names = list(arms or ARM_NAMES)
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise UserError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARM_NAMES)}")
    if not os.path.exists(RECIPE):
        raise UserError(f"{RECIPE} not found: run the ablation from the repository root")
    chosen = [a for a in ARMS if a.name in names]
    t0 = time.time()
    print("== building or reusing the toy (teachers, weak student, data)", flush=True)
    toy_cfg = ToyConfig()
    if mistake_rate is not None:
        if not 0 <= mistake_rate <= 1:
            raise UserError(f"--mistake-rate {mistake_rate}: must be in [0, 1]")
        toy_cfg.student = dataclasses.replace(toy_cfg.student, mistake_rate=mistake_rate)
    toy = build_toy(toy_dir, toy_cfg)
    common = [*toy_overrides(toy), *(["train.max_steps=" + str(steps)] if steps else [])]
    common += ["train.eval_interval=10", *(overrides or [])]
    cfg = load_config(RECIPE, common)
    max_new = cfg.rollout.max_new_tokens
    teachers = {
        d: evaluate_folder(path, toy.eval_jsonl, max_new, domains={d})[d]
        for d, path in sorted(toy.teachers.items())
    }
    print("teachers: " + ", ".join(f"{d} {a:.3f}" for d, a in teachers.items()), flush=True)
    os.makedirs(run_dir, exist_ok=True)
    summary: dict = {
        "teachers": teachers,
        "student_mistake_rate": toy_cfg.student.mistake_rate,
        "tolerance": TOLERANCE,
        "steps": cfg.train.max_steps,
        "seed": cfg.train.seed,
        "eval_interval": cfg.train.eval_interval,
        "arms": {},
    }
    for k, arm in enumerate(chosen, 1):
        arm_dir = os.path.join(run_dir, arm.name)
        shutil.rmtree(arm_dir, ignore_errors=True)
        arm_overrides = [*common, *arm.overrides]
        load_config(RECIPE, [f"run_dir={arm_dir}", *arm_overrides])  # fail before training
        print(f"== arm {k}/{len(chosen)}: {arm.name} ({arm.description})", flush=True)
        t = time.time()
        _train(arm_dir, nproc, arm_overrides)
        summary["arms"][arm.name] = summarize_arm(arm, _curves(arm_dir), teachers, time.time() - t)
        _write(run_dir, summary)  # after every arm: an interrupted ablation keeps what it ran
    summary["wall_seconds"] = round(time.time() - t0, 1)
    _write(run_dir, summary)
    plot(summary, os.path.join(run_dir, "figure.png"))
    print_table(summary)
    print(f"wrote {run_dir}/summary.json, {run_dir}/figure.png")
    return summary


def _write(run_dir: str, summary: dict) -> None:
    tmp = os.path.join(run_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "summary.json"))


def print_table(summary: dict) -> None:
    """Final accuracy and first step at the teacher's level, per arm and domain."""
    domains = sorted(summary["teachers"])
    head = "".join(f"{d + ' final':>14}{d + ' reached':>16}" for d in domains)
    print(f"\n{'arm':<14}{head}")
    print(f"{'teacher':<14}" + "".join(f"{summary['teachers'][d]:>14.3f}{'':>16}" for d in domains))
    for name, arm in summary["arms"].items():
        cells = ""
        for d in domains:
            first = arm["first_step_at_teacher"][d]
            cells += f"{arm['final'].get(d, float('nan')):>14.3f}"
            cells += f"{'step ' + str(first) if first is not None else 'never':>16}"
        print(f"{name:<14}{cells}")
    print(
        f"\n'reached': first evaluation (every {summary['eval_interval']} steps) with accuracy "
        f">= teacher - {summary['tolerance']}; {summary['steps']} steps per arm, seed "
        f"{summary['seed']}."
    )
