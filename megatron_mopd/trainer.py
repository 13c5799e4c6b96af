"""The MOPD loop: sample -> score by domain teacher -> rewards -> Megatron step -> sync.

    torchrun --nproc-per-node N -m megatron_mopd train RECIPE.yaml [key=value ...]

`train()` reads as the algorithm (MOPD.md, "Where the pieces run"); every stage is a
function or object from the module named after it. Rollout generation, teacher scoring
and rewards run on global rank 0 (the "driver", which talks to the inference engine and
the teachers, as slime's and verl's controllers do); the scored batch is broadcast and
each data-parallel rank trains on its share through Megatron's schedule. After each
step the student's weights are pushed to the rollout engine, so rollouts are on-policy
up to the train/inference numerical mismatch that IcePop corrects; with
`rollout.overlap` the next step's rollouts are sampled (and scored as they come) while
this step trains, from weights one step older (`pipeline.py`), and IcePop's ratio
corrects that lag too.

Determinism: sampling seeds are derived from (train.seed, step), and prompts come from a
resumable sampler, so a run resumed from a checkpoint reproduces the uninterrupted run
(with overlap the checkpoint also holds the rollouts sampled ahead).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time

from megatron_mopd.config import Config
from megatron_mopd.errors import TeacherError


class StepTimer:
    """Wall time of each stage of one step, and of the whole step (`elapsed`)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Add the time spent inside the `with` block to stage `name`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        """Seconds since the step started."""
        return time.perf_counter() - self.t0


class GCPauses:
    """Garbage collection kept off the hot loop, and the pauses it still takes, measured.

    `start()` collects once and then `gc.freeze()`s everything alive after set-up (torch,
    megatron-core, the model's modules, tokenizers: hundreds of thousands of objects that
    live until the end), so a full collection during training only traverses what the
    steps themselves allocate instead of the whole heap. `take()` returns the seconds the
    collector ran and the number of full (generation 2) collections since the last call;
    they are logged per step as `time/gc` and `time/gc_full_collections`.
    """

    def __init__(self, freeze: bool = True):
        self.freeze = freeze
        self.seconds = 0.0
        self.full = 0
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._t0
        if info.get("generation") == 2:
            self.full += 1

    def start(self) -> None:
        """Freeze what set-up left alive (when `freeze`), then start measuring pauses."""
        if self.freeze:
            gc.collect()
            gc.freeze()
        gc.callbacks.append(self._callback)

    def take(self) -> tuple[float, int]:
        """(seconds in the collector, full collections) since the previous call."""
        out = (self.seconds, self.full)
        self.seconds, self.full = 0.0, 0
        return out

    def close(self) -> None:
        """Stop measuring and give the frozen objects back to the collector."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)
        if self.freeze:
            gc.unfreeze()


def train(cfg: Config) -> dict:
    """Run MOPD training as configured; returns the last step's metrics (rank 0)."""
    from megatron_mopd import distributed
    from megatron_mopd.run import Run, StepFailure
    from megatron_mopd.student.load import resolve_model_config

    # the real architecture (read from model.hf_path) is checked against the layout
    # before any process group exists
    model_cfg = resolve_model_config(cfg.model, cfg.parallel)
    env = distributed.init_distributed(cfg.parallel, model_cfg, seed=cfg.train.seed)
    gc_pauses = GCPauses(freeze=cfg.train.gc_freeze)
    try:
        run = Run.create(cfg, env)  # checks every input, then student, data, teachers, engine
    except BaseException:
        distributed.destroy()
        raise
    try:
        start = run.resume_or_start()  # loads the newest checkpoint, syncs weights to the engine
        if cfg.train.eval_interval and start == 0:
            run.evaluate(0)  # the student before training
        gc_pauses.start()  # set-up's objects frozen: no full-heap collection mid-step
        depth = run.overlap_depth  # steps sampled ahead (rollout.overlap), 0: on-policy
        if run.is_driver:
            run.producer.start(start + 1)
        last: dict = {}
        for step in range(start + 1, cfg.train.max_steps + 1):
            timer = StepTimer()
            batch = None
            if run.is_driver:
                # rollouts -> teachers (streamed: each sampled piece is scored at once) ->
                # rewards -> batch; with overlap they were sampled while the last step trained
                with timer.stage("batch"):
                    batch = run.producer.take(step)
            batch = run.broadcast(batch)
            if isinstance(batch, StepFailure):
                run.stop_after_failure(batch)  # every rank: save the last trained step, raise
            with timer.stage("train"):
                metrics = run.student.train_on(batch, cfg.loss)
            if run.is_driver:  # the steps sampled ahead keep the weights they started with
                with timer.stage("engine_wait"):
                    run.producer.wait_engine()
            with timer.stage("weight_sync"):
                run.sync_weights(step)
            if run.is_driver and depth:  # with overlap: the next steps sample from these
                # weights now, beside the scoring of step + 1 and its training
                run.producer.fill(min(step + 1 + depth, cfg.train.max_steps))
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                with timer.stage("eval"):
                    run.evaluate(step)
            gc_seconds, gc_full = gc_pauses.take()
            metrics = {**metrics, "time/gc": gc_seconds, "time/gc_full_collections": gc_full}
            last = run.log_step(step, metrics, batch, timer.times, timer.elapsed())
            if run.should_stop_nonfinite(metrics):
                run.save(step)
                run.stop(
                    f"stopped at step {step}: {cfg.train.max_consecutive_nonfinite} steps in a "
                    "row had a non-finite loss or gradient (see metrics.jsonl)"
                )
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                run.save(step)
        if cfg.train.eval_interval and cfg.train.max_steps % cfg.train.eval_interval:
            run.evaluate(cfg.train.max_steps)
        if run.saved_step != cfg.train.max_steps:
            run.save(cfg.train.max_steps)
        if cfg.checkpoint.save_hf:
            run.export_hf(os.path.join(run.run_dir, "hf_final"))
        return last
    except TeacherError:
        run.save_on_failure()  # e.g. weight sync failed (single process): keep what was trained
        raise
    finally:
        gc_pauses.close()
        run.close()
        distributed.destroy()


def is_finite_metrics(metrics: dict) -> bool:
    """True when the step's loss and grad norm are finite."""
    for key in ("loss", "grad_norm"):
        value = metrics.get(key)
        if value is not None and not math.isfinite(float(value)):
            return False
    return True


def default_run_dir(cfg: Config) -> str:
    """`run_dir` as an absolute path."""
    return os.path.abspath(cfg.run_dir)
