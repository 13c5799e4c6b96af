"""The ablation behind MiMo's MOPD figure, on the CPU toy (`make ablation`).

    python -m megatron_mopd ablation [--run-dir runs/ablation] [--toy-dir runs/demo]
                                     [--arms orm_only,mopd_topk,...] [--steps N]
                                     [--seeds 1,2,3] [--mistake-rate R] [key=value ...]

Every arm trains the same weak student from the same toy (built or reused by
`toy.build`, the demo's cache), on the same prompts in the same order (same seed), with
the recipe `examples/toy/mopd.yaml`, and differs only in the loss:

- `orm_only`: RL on the outcome reward alone (GRPO advantages of the exact-match reward,
  `loss.alpha=1`, `loss.distill_coef=0`): what the student learns without a teacher.
- `mopd_no_orm`: MOPD without the outcome reward (`alpha = 0`, the demo's setting).
- `mopd_orm`: MOPD plus the outcome reward (`alpha = 1`).
- `mopd_topk`: MOPD with the dense top-k reverse KL (teachers return their top 8) instead
  of the sampled-token advantage (`alpha = 0`): the estimator comparison.

The correction arms (`--arms corrections`, not in the default set) sample with a bf16
rollout engine (`rollout.dtype=bf16`) while Megatron trains in fp32, so the importance
ratio r = pi / mu differs from 1 for real, and differ only in what the loss does with it:
`bf16_none` (`loss.correction=none`: r ignored), `bf16_tis` (truncated, min(r, eps_high))
and `bf16_icepop` (out-of-bounds tokens discarded, MiMo's choice). For these the summary
also has each arm's mismatch and stability: mean |r - 1|, the fraction of tokens out of
IcePop's bounds, the reverse KL to the teachers over the last fifth of the steps, the
largest gradient norm and the skipped steps (`mismatch` in summary.json).

The trainer evaluates greedy exact match on the held-out prompts every `eval_interval`
steps (and at step 0). Written: RUN_DIR/<arm>/ (each arm's run: metrics.jsonl,
eval.jsonl, TensorBoard; RUN_DIR/<arm>/seed_<s>/ with several seeds), RUN_DIR/summary.json (each arm's per-domain accuracy curve, its
final accuracy, and the first evaluated step at which it reaches the teacher's level,
i.e. accuracy >= teacher - 0.02, or null) and RUN_DIR/figure.png (one panel per domain,
one line per arm, the teacher dashed). `--seeds 1,2,3` repeats every arm with other
training seeds (prompt order, sampling) and reports mean curves: per-evaluation noise is
about +-0.02 here (see the demo), so read differences of a few points as ties.
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
    default: bool = True  # run when --arms is not given


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
ARMS += tuple(
    Arm(
        f"bf16_{c}",
        f"MOPD under a bf16 rollout engine, correction = {c}",
        ("loss.alpha=0", "rollout.dtype=bf16", f"loss.correction={c}"),
        default=False,
    )
    for c in ("none", "tis", "icepop")
)
ARM_NAMES = tuple(a.name for a in ARMS)
DEFAULT_ARMS = tuple(a.name for a in ARMS if a.default)
# names that stand for several arms in --arms
ARM_GROUPS = {"corrections": tuple(a.name for a in ARMS if a.name.startswith("bf16_"))}


def mismatch_stats(metrics_jsonl: str) -> dict:
    """Train/inference mismatch and stability of one run, from its metrics.jsonl: mean
    |r - 1| and out-of-bounds fraction (discard_low + discard_high) over all steps, the
    reverse KL to the teachers averaged over the last fifth of the steps, the largest
    gradient norm, and how many steps were skipped (non-finite)."""
    rows = [json.loads(line) for line in open(metrics_jsonl) if '"ratio_abs_dev"' in line]
    if not rows:
        return {}
    tail = rows[-max(1, len(rows) // 5) :]

    def mean(key: str, part: list[dict]) -> float:
        return sum(float(r.get(key, 0.0)) for r in part) / len(part)

    return {
        "ratio_abs_dev": mean("ratio_abs_dev", rows),
        "out_of_bounds_frac": mean("discard_low_frac", rows) + mean("discard_high_frac", rows),
        "reverse_kl_last": mean("reverse_kl", tail),
        "grad_norm_max": max(float(r.get("grad_norm", 0.0)) for r in rows),
        "skipped_steps": sum(bool(r.get("skipped")) for r in rows),
    }


def first_step_at(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first evaluated step whose accuracy is >= `level`, or None."""
    for step, acc in curve:
        if acc >= level:
            return step
    return None


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The step-wise mean of several runs' curves (evaluated at the same steps)."""
    steps = [[s for s, _ in c] for c in curves]
    if any(st != steps[0] for st in steps):
        raise ValueError(f"curves evaluated at different steps: {steps}")
    return [(s, sum(c[i][1] for c in curves) / len(curves)) for i, s in enumerate(steps[0])]


def summarize_arm(
    arm: Arm,
    per_seed: dict[int, dict[str, list[tuple[int, float]]]],
    teachers: dict[str, float],
    seconds: float,
    mismatch: list[dict] | None = None,
) -> dict:
    """One arm's entry of summary.json from each seed's per-domain curves: the mean curve,
    its final accuracy and first step at the teacher's level, and the same per seed;
    `mismatch`: each seed's `mismatch_stats`, averaged into the entry's `mismatch`."""

    def reached(curves: dict[str, list[tuple[int, float]]]) -> dict[str, int | None]:
        return {d: first_step_at(curves.get(d, []), teachers[d] - TOLERANCE) for d in teachers}

    domains = sorted({d for c in per_seed.values() for d in c})
    mean = {d: mean_curve([c[d] for c in per_seed.values()]) for d in domains}
    return {
        "description": arm.description,
        "overrides": list(arm.overrides),
        "curves": {d: [[s, round(a, 6)] for s, a in pts] for d, pts in mean.items()},
        "final": {d: round(pts[-1][1], 6) for d, pts in mean.items() if pts},
        "first_step_at_teacher": dict(sorted(reached(mean).items())),
        "per_seed": {
            str(seed): {
                "curves": {d: [[s, a] for s, a in pts] for d, pts in sorted(c.items())},
                "first_step_at_teacher": dict(sorted(reached(c).items())),
            }
            for seed, c in per_seed.items()
        },
        "seconds": round(seconds, 1),
        **({"mismatch": _mean_stats(mismatch)} if mismatch else {}),
    }


def _mean_stats(per_seed: list[dict]) -> dict:
    keys = sorted({k for st in per_seed for k in st})
    return {k: sum(st.get(k, 0.0) for st in per_seed) / len(per_seed) for k in keys}


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
                label = name if len(arm["per_seed"]) == 1 else f"{name} (mean)"
                ax.plot(steps, accs, color=f"C{i}", marker="o", ms=2.5, label=label)
            if len(arm["per_seed"]) > 1:
                for run in arm["per_seed"].values():
                    steps, accs = zip(*run["curves"][d])
                    ax.plot(steps, accs, color=f"C{i}", lw=0.7, alpha=0.3)
        ax.axhline(summary["teachers"][d], color="k", ls="--", lw=1, label="teacher")
        ax.set_title(f"{d}")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("greedy exact match (held-out)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Ablation on the CPU toy: ORM-only RL vs MOPD (same student, data, seeds)")
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
    seeds: list[int] | None = None,
) -> dict:
    """Run the arms (fresh runs, sequentially) and write summary.json and figure.png.

    `seeds`: `train.seed` of each repetition (default: the recipe's, once); every arm runs
    every seed, and the summary holds the mean curves and each seed's.

    `mistake_rate` (default: the toy's, 0.7) is how often the weak student's training data
    shows the systematic mistake (`toy.tasks.mistake`); a higher rate gives a weaker
    student and rarer outcome rewards. A toy with another rate needs its own `toy_dir`.
    """
    from megatron_mopd.config import load_config
    from megatron_mopd.toy.demo import (
        RECIPE,
        eval_curves,
        evaluate_folder,
        toy_overrides,
        train_recipe,
    )

    chosen = _chosen_arms(arms)
    if not os.path.exists(RECIPE):
        raise UserError(f"{RECIPE} not found: run the ablation from the repository root")
    t0 = time.time()
    print("== building or reusing the toy (teachers, weak student, data)", flush=True)
    toy, toy_cfg = _build_toy(toy_dir, mistake_rate)
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
        "seeds": list(seeds or [cfg.train.seed]),
        "eval_interval": cfg.train.eval_interval,
        "arms": {},
    }
    for arm in chosen:  # every arm's recipe is valid before anything trains
        load_config(RECIPE, [*common, *arm.overrides])
    for k, arm in enumerate(chosen, 1):
        arm_dir = os.path.join(run_dir, arm.name)
        shutil.rmtree(arm_dir, ignore_errors=True)
        print(f"== arm {k}/{len(chosen)}: {arm.name} ({arm.description})", flush=True)
        t = time.time()
        per_seed, stats = {}, []
        for seed in summary["seeds"]:
            seed_dir = arm_dir if len(summary["seeds"]) == 1 else f"{arm_dir}/seed_{seed}"
            train_recipe(seed_dir, nproc, [*common, *arm.overrides, f"train.seed={seed}"])
            per_seed[seed] = eval_curves(seed_dir)
            stats.append(mismatch_stats(os.path.join(seed_dir, "metrics.jsonl")))
        summary["arms"][arm.name] = summarize_arm(
            arm, per_seed, teachers, time.time() - t, stats if arm.name.startswith("bf16") else None
        )
        _write(run_dir, summary)  # after every arm: an interrupted ablation keeps what it ran
    summary["wall_seconds"] = round(time.time() - t0, 1)
    _write(run_dir, summary)
    plot(summary, os.path.join(run_dir, "figure.png"))
    print_table(summary)
    print(f"wrote {run_dir}/summary.json, {run_dir}/figure.png")
    return summary


def _chosen_arms(arms: list[str] | None) -> list[Arm]:
    """The arms named in `arms` (default: `DEFAULT_ARMS`; a name of `ARM_GROUPS` stands
    for its arms), in `ARMS` order."""
    names = [n for a in (arms or DEFAULT_ARMS) for n in ARM_GROUPS.get(a, (a,))]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        choices = ", ".join([*ARM_NAMES, *ARM_GROUPS])
        raise UserError(f"--arms: unknown arm(s) {unknown}; choose from {choices}")
    return [a for a in ARMS if a.name in names]


def _build_toy(toy_dir: str, mistake_rate: float | None):
    """Build (or reuse) the toy in `toy_dir`, its student trained with `mistake_rate`."""
    import dataclasses

    from megatron_mopd.toy.build import ToyConfig, build_toy

    toy_cfg = ToyConfig()
    if mistake_rate is not None:
        if not 0 <= mistake_rate <= 1:
            raise UserError(f"--mistake-rate {mistake_rate}: must be in [0, 1]")
        toy_cfg.student = dataclasses.replace(toy_cfg.student, mistake_rate=mistake_rate)
    return build_toy(toy_dir, toy_cfg), toy_cfg


def _write(run_dir: str, summary: dict) -> None:
    tmp = os.path.join(run_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "summary.json"))


def print_table(summary: dict) -> None:
    """Final accuracy and first step at the teacher's level, per arm and domain."""
    domains = sorted(summary["teachers"])
    seeds = summary["seeds"]
    width = 16 if len(seeds) == 1 else 12 + 6 * len(seeds)
    head = "".join(f"{d + ' final':>14}{d + ' reached':>{width}}" for d in domains)
    print(f"\n{'arm':<14}{head}")
    print(
        f"{'teacher':<14}"
        + "".join(f"{summary['teachers'][d]:>14.3f}{'':>{width}}" for d in domains)
    )

    def step(value: int | None) -> str:
        return "never" if value is None else str(value)

    for name, arm in summary["arms"].items():
        cells = ""
        for d in domains:
            reached = step(arm["first_step_at_teacher"][d])
            if len(seeds) > 1:
                runs = arm["per_seed"].values()
                reached += " (" + ",".join(step(r["first_step_at_teacher"][d]) for r in runs) + ")"
            cells += f"{arm['final'].get(d, float('nan')):>14.3f}{reached:>{width}}"
        print(f"{name:<14}{cells}")
    with_stats = {n: a["mismatch"] for n, a in summary["arms"].items() if a.get("mismatch")}
    if with_stats:
        print(
            f"\n{'arm':<14}{'mean |r-1|':>12}{'out of bounds':>15}{'KL (last 1/5)':>15}"
            f"{'max grad norm':>15}{'skipped':>9}"
        )
        for name, st in with_stats.items():
            print(
                f"{name:<14}{st['ratio_abs_dev']:>12.2e}{st['out_of_bounds_frac']:>15.2e}"
                f"{st['reverse_kl_last']:>15.4f}{st['grad_norm_max']:>15.2f}"
                f"{st['skipped_steps']:>9.0f}"
            )
    mean = "the mean curve of seeds " if len(seeds) > 1 else "seed "
    print(
        f"\n'reached': first evaluation (every {summary['eval_interval']} steps) with accuracy "
        f">= teacher - {summary['tolerance']} ({mean}{', '.join(map(str, seeds))}"
        f"{'; each seed in parentheses' if len(seeds) > 1 else ''}); "
        f"{summary['steps']} steps per arm."
    )
