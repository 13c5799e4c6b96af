"""Build everything the CPU demo needs before MOPD: tokenizer, datasets, student, teachers.

    toy = build_toy("runs/demo")
    toy.student             # the weak student, an HF Qwen3-MoE folder
    toy.teachers            # {"add": ".../teachers/add", "reverse": ".../teachers/reverse"}
    toy.teacher_accuracy    # greedy exact match on the eval set, per domain
    toy.student_accuracy

Layout under `run_dir/toy/`: `tokenizer/`, `data/{train,eval}.jsonl` (MOPD prompts of both
domains, `{"prompt", "domain", "answer"}`), `student/`, `teachers/<domain>/`, and
`toy.json` (this build's summary). Models are cached: a second call with the same
settings reuses them (see `sft.train_sft`).

The pipeline follows MiMo's: one base model is fine-tuned on both domains, then each
teacher is that base fine-tuned further on its own domain, and MOPD distils the teachers
back into the base (the student). The base is weak by construction: its training data
holds a systematic mistake on part of each domain (`tasks.mistake`: a 3-digit sum loses
its leading 1; a reversal of 5+ letters loses its first letter), in 70% of the affected
examples, drawn afresh in every batch. So it makes the mistake when decoding greedily
(about 50% accuracy per domain) while still giving the right first token a fair
probability. Why not an easier distribution or early stopping: examples/toy/NOTES.md
(a student trained on shorter numbers or strings is confidently wrong on the longer
ones, 5-7 nats per token from its teachers, and MOPD did not close that gap in 300 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_mopd.toy.sft import SFTConfig, SFTResult
from megatron_mopd.toy.tasks import (
    DEFAULT_SPECS,
    DOMAINS,
    TaskSpec,
    generate,
    generate_mix,
    write_jsonl,
)

VOCAB_SIZE = 128  # the char vocabulary (100 tokens) padded: Megatron splits it by TP


def _student_sft() -> SFTConfig:
    return SFTConfig(
        max_steps=1500,
        batch_size=128,
        lr=3e-3,
        warmup_steps=50,
        eval_interval=250,
        mistake_rate=0.7,
    )


def _teacher_sft() -> SFTConfig:
    return SFTConfig(
        max_steps=600,
        batch_size=64,
        lr=1e-3,
        warmup_steps=20,
        eval_interval=50,
        target_accuracy=0.985,
    )


@dataclass
class ToyConfig:
    """Sizes and seeds of the toy. Counts are per domain."""

    seed: int = 0
    specs: dict[str, TaskSpec] = field(default_factory=lambda: dict(DEFAULT_SPECS))
    n_sft: int = 6500  # SFT examples (the add train split holds ~7,000 distinct ones)
    n_mopd: int = 2000  # MOPD training prompts
    n_eval: int = 200  # eval prompts (teachers, student, and the demo's before/after)
    student: SFTConfig = field(default_factory=_student_sft)
    teacher: SFTConfig = field(default_factory=_teacher_sft)
    threads: int = 1  # torch threads while fine-tuning (1 keeps results bit-reproducible)

    def __post_init__(self) -> None:
        if sorted(self.specs) != sorted(DOMAINS):
            raise ValueError(f"specs must have one TaskSpec per domain {DOMAINS}")
        for name in ("n_sft", "n_mopd", "n_eval", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class ToyBuild:
    """Paths and accuracies of a built toy (also written to `toy.json`)."""

    root: str
    tokenizer: str
    train_jsonl: str
    eval_jsonl: str
    student: str
    teachers: dict[str, str]
    teacher_accuracy: dict[str, float]
    student_accuracy: dict[str, float]
    seconds: dict[str, float]


def build_toy(
    run_dir: str, cfg: ToyConfig | None = None, log: Callable[[str], None] | None = print
) -> ToyBuild:
    """Tokenizer -> datasets -> weak student (cached) -> one teacher per domain (cached)."""
    import torch

    from megatron_mopd.toy.sft import train_sft
    from megatron_mopd.toy.tiny import make_char_tokenizer

    cfg = cfg or ToyConfig()
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        root = os.path.join(run_dir, "toy")
        tok_dir = os.path.join(root, "tokenizer")
        tok = make_char_tokenizer(tok_dir, vocab_size=VOCAB_SIZE)
        specs = [cfg.specs[d] for d in DOMAINS]
        data = os.path.join(root, "data")
        train_jsonl = write_jsonl(
            os.path.join(data, "train.jsonl"),
            generate_mix(specs, cfg.n_mopd, "train", cfg.seed + 1),
        )
        eval_examples = generate_mix(specs, cfg.n_eval, "eval", cfg.seed)
        eval_jsonl = write_jsonl(os.path.join(data, "eval.jsonl"), eval_examples)
        seconds = {"data": round(time.time() - t0, 1)}
        spec_key = {d: dataclasses.asdict(cfg.specs[d]) for d in DOMAINS}
        key = {"specs": spec_key, "n_eval": cfg.n_eval, "seed": cfg.seed, "vocab": len(tok)}

        student_dir = os.path.join(root, "student")
        student = train_sft(
            student_dir,
            tok,
            generate_mix(specs, cfg.n_sft, "train", cfg.seed),
            eval_examples,
            dataclasses.replace(cfg.student, seed=cfg.seed),
            data_key=key,
            log=log,
        )
        results: dict[str, SFTResult] = {"student": student}
        teachers = {}
        for d in DOMAINS:
            teacher_cfg = dataclasses.replace(cfg.teacher, seed=cfg.seed + 1, init_from=student_dir)
            # the base's own settings join the key: a rebuilt base invalidates its teachers
            base = {"base": _settings_of(student_dir)}
            res = train_sft(
                os.path.join(root, "teachers", d),
                tok,
                generate(cfg.specs[d], cfg.n_sft, "train", cfg.seed),
                [ex for ex in eval_examples if ex.domain == d],
                teacher_cfg,
                data_key={**key, **base, "domain": d},
                log=log,
            )
            results[f"teacher_{d}"] = res
            teachers[d] = res.path
    finally:
        torch.set_num_threads(threads)
    seconds.update({n: r.seconds for n, r in results.items() if not r.cached})
    seconds.update({f"{n}_cpu": r.cpu_seconds for n, r in results.items() if not r.cached})
    seconds["total"] = round(time.time() - t0, 1)
    build = ToyBuild(
        root=root,
        tokenizer=tok_dir,
        train_jsonl=train_jsonl,
        eval_jsonl=eval_jsonl,
        student=student_dir,
        teachers=teachers,
        teacher_accuracy={d: results[f"teacher_{d}"].accuracy[d] for d in DOMAINS},
        student_accuracy=student.accuracy,
        seconds=seconds,
    )
    with open(os.path.join(root, "toy.json"), "w") as f:
        json.dump(dataclasses.asdict(build), f, indent=1)
    if log:
        log(
            f"toy: teachers {build.teacher_accuracy}, student {build.student_accuracy}, "
            f"seconds {build.seconds}"
        )
    return build


def _settings_of(model_dir: str) -> dict:
    from megatron_mopd.toy.sft import SETTINGS_FILE

    with open(os.path.join(model_dir, SETTINGS_FILE)) as f:
        return json.load(f)["settings"]


def main(argv: list[str] | None = None) -> None:
    """`python -m megatron_mopd.toy.build RUN_DIR [--seed N]`."""
    parser = argparse.ArgumentParser(description=build_toy.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    build_toy(args.run_dir, ToyConfig(seed=args.seed, threads=args.threads))


if __name__ == "__main__":
    main()
