"""Build everything the CPU demo needs before MOPD: tokenizer, datasets, teachers, student.

    toy = build_toy("runs/demo")
    toy.teachers            # {"add": ".../teachers/add", "reverse": ".../teachers/reverse"}
    toy.student             # the weak student, an HF Qwen3-MoE folder
    toy.teacher_accuracy    # greedy exact match on the eval set, per domain
    toy.student_accuracy

Layout under `run_dir/toy/`: `tokenizer/`, `data/{train,eval}.jsonl` (MOPD prompts, both
domains), `teachers/<domain>/`, `student/`, and `toy.json` (this build's summary). Models
are cached: a second call with the same settings reuses them (see `sft.train_sft`).

The teachers and the student are independent fine-tuning jobs; with `workers=2` they run
in two single-threaded processes (the add teacher on one, the reverse teacher and then the
student on the other), which halves the wall time on a 2-core machine.

The weak student is trained on an *easier* distribution than the one it is evaluated on
(MOPD.md: accuracy jumps abruptly with training time, so stopping early gives an
unpredictable student): sums below 100 only, and strings of 2-4 letters instead of 3-6.
It solves the part of each domain it has seen (about 40% / 50%) and fails the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from megatron_mopd.toy.sft import SFTConfig, SFTResult
from megatron_mopd.toy.tasks import DEFAULT_SPECS, DOMAINS, TaskSpec, generate, generate_mix, write_jsonl

VOCAB_SIZE = 128  # the char vocabulary (100) padded: Megatron splits the vocabulary by TP


def _teacher_sft() -> SFTConfig:
    return SFTConfig(max_steps=3000, lr=3e-3, warmup_steps=50, eval_interval=250, target_accuracy=0.98)


def _student_sft() -> SFTConfig:
    return SFTConfig(max_steps=1500, lr=3e-3, warmup_steps=50, eval_interval=250)


@dataclass
class ToyConfig:
    """Sizes and seeds of the toy. Counts are per domain."""

    seed: int = 0
    specs: dict[str, TaskSpec] = field(default_factory=lambda: dict(DEFAULT_SPECS))
    student_specs: dict[str, TaskSpec] = field(
        default_factory=lambda: {
            "add": TaskSpec("add", 2, 2, max_answer_len=2),
            "reverse": TaskSpec("reverse", 2, 4),
        }
    )
    n_sft: int = 6000  # SFT examples of each teacher
    n_student: int = 2500  # SFT examples of the student, per domain (sums < 100: ~2,800 exist)
    n_mopd: int = 2000  # MOPD training prompts
    n_eval: int = 200  # eval prompts (teachers, student, and the demo's before/after)
    teacher: SFTConfig = field(default_factory=_teacher_sft)
    student: SFTConfig = field(default_factory=_student_sft)
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("specs", "student_specs"):
            if sorted(getattr(self, name)) != sorted(DOMAINS):
                raise ValueError(f"{name} must have one TaskSpec per domain {DOMAINS}")
        for name in ("n_sft", "n_student", "n_mopd", "n_eval", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class ToyBuild:
    """Paths and accuracies of a built toy (also written to `toy.json`)."""

    root: str
    tokenizer: str
    train_jsonl: str
    eval_jsonl: str
    teachers: dict[str, str]
    student: str
    teacher_accuracy: dict[str, float]
    student_accuracy: dict[str, float]
    seconds: dict[str, float]


@dataclass
class _Job:
    """One fine-tuning job, picklable for a worker process."""

    name: str
    out_dir: str
    tokenizer_dir: str
    train_specs: list[TaskSpec]
    eval_specs: list[TaskSpec]
    n_train: int
    n_eval: int
    seed: int
    sft: SFTConfig


def _run_job(job: _Job, quiet: bool = False) -> SFTResult:
    """Generate the job's data and fine-tune (or reuse the cached model)."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    train = generate_mix(job.train_specs, job.n_train, "train", job.seed)
    evals = generate_mix(job.eval_specs, job.n_eval, "eval", job.seed)
    key = {
        "train": [dataclasses.asdict(s) for s in job.train_specs],
        "eval": [dataclasses.asdict(s) for s in job.eval_specs],
        "n_eval": job.n_eval,
        "seed": job.seed,
        "vocab": len(tok),
    }
    log = None if quiet else (lambda msg: print(msg, flush=True))
    return train_sft_job(job, tok, train, evals, key, log)


def train_sft_job(job: _Job, tok, train, evals, key, log) -> SFTResult:
    """`sft.train_sft` for one job (a seam for tests)."""
    from megatron_mopd.toy.sft import train_sft

    return train_sft(job.out_dir, tok, train, evals, job.sft, data_key=key, log=log)


def build_toy(
    run_dir: str, cfg: ToyConfig | None = None, log: Callable[[str], None] | None = print
) -> ToyBuild:
    """Tokenizer -> datasets -> teachers (cached) -> weak student (cached)."""
    from megatron_mopd.tiny import make_char_tokenizer

    cfg = cfg or ToyConfig()
    t0 = time.time()
    root = os.path.join(run_dir, "toy")
    tok_dir = os.path.join(root, "tokenizer")
    make_char_tokenizer(tok_dir, vocab_size=VOCAB_SIZE)
    specs = [cfg.specs[d] for d in DOMAINS]
    train_jsonl = write_jsonl(
        os.path.join(root, "data", "train.jsonl"), generate_mix(specs, cfg.n_mopd, "train", cfg.seed + 1)
    )
    eval_jsonl = write_jsonl(
        os.path.join(root, "data", "eval.jsonl"), generate_mix(specs, cfg.n_eval, "eval", cfg.seed)
    )
    t_data = time.time() - t0

    teacher_sft = dataclasses.replace(cfg.teacher, seed=cfg.seed)
    student_sft = dataclasses.replace(cfg.student, seed=cfg.seed + 100)
    jobs = [
        _Job(f"teacher_{d}", os.path.join(root, "teachers", d), tok_dir, [cfg.specs[d]], [cfg.specs[d]],
             cfg.n_sft, cfg.n_eval, cfg.seed, teacher_sft)
        for d in DOMAINS
    ]
    jobs.append(
        _Job("student", os.path.join(root, "student"), tok_dir,
             [cfg.student_specs[d] for d in DOMAINS], specs, cfg.n_student, cfg.n_eval, cfg.seed, student_sft)
    )
    if cfg.workers == 1:
        results = [_run_job(j) for j in jobs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_job, jobs))
    by_name = dict(zip([j.name for j in jobs], results, strict=True))
    teacher_acc = {d: by_name[f"teacher_{d}"].accuracy[d] for d in DOMAINS}
    build = ToyBuild(
        root=root,
        tokenizer=tok_dir,
        train_jsonl=train_jsonl,
        eval_jsonl=eval_jsonl,
        teachers={d: by_name[f"teacher_{d}"].path for d in DOMAINS},
        student=by_name["student"].path,
        teacher_accuracy=teacher_acc,
        student_accuracy=by_name["student"].accuracy,
        seconds={
            "data": round(t_data, 1),
            **{n: r.seconds for n, r in by_name.items() if not r.cached},
            "total": round(time.time() - t0, 1),
        },
    )
    with open(os.path.join(root, "toy.json"), "w") as f:
        json.dump(dataclasses.asdict(build), f, indent=1)
    if log:
        log(f"teachers {teacher_acc}, student {build.student_accuracy}, times {build.seconds}")
    return build


def main(argv: list[str] | None = None) -> None:
    """`python -m megatron_mopd.toy.build RUN_DIR [--workers N]`."""
    parser = argparse.ArgumentParser(description=build_toy.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_toy(args.run_dir, ToyConfig(seed=args.seed, workers=args.workers))


if __name__ == "__main__":
    main()
