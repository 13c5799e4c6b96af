"""Embedded rollout sampling on the demo's toy: per-request generators vs one batch seed.

    python tools/bench_rollout.py                   # toy under runs/demo (built if missing)
    python tools/bench_rollout.py --repeats 9 --chunks 16,32,128

Loads the toy's student (built or reused exactly as `mopd demo` and
`tools/bench_overlap.py` do: `toy.build.build_toy`) the way the embedded rollout engine
does, and samples the demo's step: `--prompts` distinct training prompts x
`--samples` samples each (32 x 4 = 128 rows), `--max-new-tokens` (the recipe's 8) at
temperature 1, recording the MoE routing as the trainer's engine does. Arms, alternating, `--repeats` times after one warm-up call each:

- `per-request`: `HFEngine.generate` without `batch_seed` (one seeded generator per
  row, one `torch.multinomial` per row per step: what `mopd serve` does);
- `batched`: the same call with `batch_seed` (one generator, one multinomial per step).

Per arm: the median s per call, ms per model step (one forward over the batch: the
prefill, then one per decode step, so steps = the longest response), the part of it spent
in the model's forward (timed by hooks) and the rest (sampling and bookkeeping), each
the median over the calls, and the ratios of the two arms; all from one run. Then `EmbeddedRolloutEngine.generate` of the
same rows with each `--chunks` batch size (the rollout stage's cost at that
`rollout.batch_size`). A figure-printing script, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch


class ForwardTimer:
    """Seconds spent inside `model.forward` and how many forwards ran (hooks)."""

    def __init__(self, model) -> None:
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def load_rows(toy, n_prompts: int, samples: int, tokenizer) -> list[list[int]]:
    """The first `n_prompts` MOPD training prompts of the toy, each `samples` times."""
    from megatron_mopd.data import load_prompts, tokenize_prompts

    records = load_prompts(toy.train_jsonl)[:n_prompts]
    ids = tokenize_prompts(records, tokenizer)
    return [p for p in ids for _ in range(samples)]


def time_arm(engine, timer, rows, sampling, batch_seed, experts) -> tuple[float, int, float]:
    """One call: (wall seconds, model steps, seconds in the model's forward)."""
    from megatron_mopd.rollout.embedded import request_seeds

    timer.reset()
    t0 = time.perf_counter()
    if batch_seed is None:  # what the embedded engine did before: one seed per row
        seeds = request_seeds(sampling.seed, len(rows))
        params = [dataclasses.replace(sampling, seed=s) for s in seeds]
        engine.generate(rows, params, return_routed_experts=experts)
    else:
        engine.generate(rows, sampling, return_routed_experts=experts, batch_seed=batch_seed)
    return time.perf_counter() - t0, timer.calls, timer.seconds


def main(argv: list[str] | None = None) -> None:
    """Time the arms and print the figures."""
    from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine
    from megatron_mopd.toy.build import build_toy
    from megatron_mopd.types import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo", help="where the toy is (built if missing)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chunks", default="16,128", help="EmbeddedRolloutEngine batch sizes")
    p.add_argument(
        "--no-routed-experts",
        action="store_true",
        help="do not record the MoE routing (the trainer's embedded engine records it)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    toy = build_toy(args.run_dir, log=None)
    experts = not args.no_routed_experts
    rollout = EmbeddedRolloutEngine(toy.student, seed=0, return_routed_experts=experts)
    engine = rollout.engine
    timer = ForwardTimer(engine.model)
    rows = load_rows(toy, args.prompts, args.samples, engine.tokenizer)
    print(
        f"student {toy.student}: {len(rows)} rows ({args.prompts} prompts x {args.samples}), "
        f"max_new_tokens={args.max_new_tokens}, routed experts recorded: {experts}, "
        f"torch threads {torch.get_num_threads()}"
    )
    arms = {"per-request": None, "batched": 1}
    got: dict[str, list[tuple[float, int, float]]] = {a: [] for a in arms}
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        for arm, batch_seed in arms.items():
            seed = 1000 + rep
            sp = SamplingParams(max_new_tokens=args.max_new_tokens, seed=seed)
            bseed = None if batch_seed is None else seed
            res = time_arm(engine, timer, rows, sp, bseed, experts)
            if rep:
                got[arm].append(res)

    print(f"\n{args.repeats} calls per arm (alternating, after a warm-up call each)")
    print(f"{'arm':<13}{'s/call':>9}{'steps':>7}{'ms/step':>9}{'forward':>9}{'rest':>8}")
    med = {}
    for arm, res in got.items():
        wall = statistics.median(r[0] for r in res)
        per_step = [r[0] / r[1] * 1e3 for r in res]
        fwd = [r[2] / r[1] * 1e3 for r in res]
        rest = [(r[0] - r[2]) / r[1] * 1e3 for r in res]
        med[arm] = (wall, statistics.median(per_step), statistics.median(rest))
        print(
            f"{arm:<13}{wall:>9.4f}{statistics.median(r[1] for r in res):>7.0f}"
            f"{med[arm][1]:>9.3f}{statistics.median(fwd):>9.3f}{med[arm][2]:>8.3f}"
        )
    a, b = med["per-request"], med["batched"]
    print(
        f"batched / per-request: s/call {b[0] / a[0]:.3f}, ms/step {b[1] / a[1]:.3f}, "
        f"rest (outside the forward) {b[2] / a[2]:.3f}"
    )

    sizes = [int(x) for x in args.chunks.split(",") if x]
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for rep in range(args.repeats + 1):
        for size in sizes:
            rollout.batch_size = size
            sp = SamplingParams(max_new_tokens=args.max_new_tokens, seed=2000 + rep)
            t0 = time.perf_counter()
            rollout.generate(rows, sp)
            if rep:
                times[size].append(time.perf_counter() - t0)
    print(f"\nEmbeddedRolloutEngine.generate of the {len(rows)} rows (median s/call):")
    for size in sizes:
        chunks = -(-len(rows) // size)
        print(f"  batch_size {size:>4} ({chunks} chunks): {statistics.median(times[size]):.4f}")


if __name__ == "__main__":
    main()
