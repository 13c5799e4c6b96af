"""One-step off-policy overlap and streaming teacher scoring (`pipeline.BatchProducer`).

Units (a scripted engine and teachers, no models): each sampled piece is scored while the
engine is still sampling the next; steps are submitted in order and taken one by one;
the weight sync waits for the sampling in flight; with overlap the steps up to
s + 1 + depth are submitted after the sync of step s, so their rollouts come from weights
at most depth steps old (staleness = depth after the first depth + 1 steps); an engine or teacher
failure becomes the step's `StepFailure` (the teacher's message kept); the checkpoint's
in-flight rollouts are scored again, not sampled again, after a restore.

End to end (the tiny recipe of `test_trainer.py`, `rollout.overlap: true`): the logged
staleness is 0 on the first two steps and 1 after; SIGKILL after a checkpoint and the same
command again give metrics and eval rows equal to an uninterrupted overlapped run's,
exactly (the checkpoint holds the rollouts sampled ahead for the next step).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from trainer_helpers import (
    assert_rows_close,
    build_tiny,
    checkpoints,
    finish,
    kill_group,
    make_recipe,
    metrics,
    start_train,
    wait_for,
    write_recipe,
)

from megatron_mopd.errors import TeacherError
from megatron_mopd.pipeline import BatchProducer
from megatron_mopd.run import StepFailure
from megatron_mopd.types import Rollout, SamplingParams, ScoreResult

# --------------------------------------------------------------------------------------
# units: a scripted run


class ScriptedEngine:
    """Samples each prompt as [prompt[0] + 1], in pieces of 2, `delay` seconds a piece."""

    def __init__(self, delay=0.0, fail_at_step=None):
        self.weight_version = "step_0"
        self.delay = delay
        self.fail_at_step = fail_at_step
        self.log: list[tuple[str, float]] = []
        self.busy = threading.Lock()

    def generate_stream(self, prompts, sampling):
        assert self.busy.acquire(blocking=False), "two samplings at once"
        try:
            if self.fail_at_step is not None and sampling.seed == self.fail_at_step:
                raise TeacherError("rollout server http://x: connection refused")
            for start in range(0, len(prompts), 2):
                time.sleep(self.delay)
                idx = list(range(start, min(start + 2, len(prompts))))
                self.log.append(("piece", time.perf_counter()))
                yield (
                    idx,
                    [
                        Rollout(
                            list(prompts[i]),
                            [prompts[i][0] + 1],
                            [-0.5],
                            "stop",
                            self.weight_version,
                        )
                        for i in idx
                    ],
                )
            self.log.append(("sampled", time.perf_counter()))
        finally:
            self.busy.release()


class ScriptedRun:
    """What `BatchProducer` uses of `run.Run`."""

    def __init__(self, engine, n_prompts=6, score_delay=0.0, fail_domain=None):
        self.engine = engine
        self.cfg = SimpleNamespace(
            train=SimpleNamespace(prompts_per_step=n_prompts),
            rollout=SimpleNamespace(max_staleness=1),
        )
        self.draws = []
        self.data = SimpleNamespace(next_prompts=self._next)
        self.score_delay = score_delay
        self.fail_domain = fail_domain
        self.scored: list[tuple[float, list[int]]] = []

    def _next(self, k):
        base = 10 * (len(self.draws) + 1)
        self.draws.append(base)
        return list(range(base, base + k))

    def rollout_request(self, prompt_index, step):
        return [[i] for i in prompt_index], SamplingParams(max_new_tokens=1, seed=step)

    def domains_of(self, prompt_index):
        return ["a" if i % 2 else "b" for i in prompt_index]

    def score_rollouts(self, rollouts, domains):
        if self.fail_domain in domains:
            raise TeacherError(f"teacher of domain {self.fail_domain}: HTTP 500")
        time.sleep(self.score_delay)
        self.scored.append((time.perf_counter(), [r.prompt_ids[0] for r in rollouts]))
        return [ScoreResult(logprobs=[-1.0]) for _ in rollouts]

    def outcome_advantages(self, rollouts, prompt_index):
        return None

    def make_batch(self, rollouts, scores, prompt_index, orm):
        return SimpleNamespace(
            rollouts=rollouts, scores=scores, prompt_index=prompt_index, extras={}
        )


def test_pieces_are_scored_while_sampling_goes_on():
    engine = ScriptedEngine(delay=0.05)
    run = ScriptedRun(engine, n_prompts=6, score_delay=0.01)
    producer = BatchProducer(run, depth=0)
    try:
        producer.start(1)
        batch = producer.take(1)
    finally:
        producer.close()
    sampled_at = dict(engine.log)["sampled"]
    # the first piece was scored before the engine had sampled the last one
    assert run.scored[0][0] < sampled_at
    assert [r.prompt_ids[0] for r in batch.rollouts] == list(range(10, 16))  # in order
    assert [r.response_ids[0] for r in batch.rollouts] == list(range(11, 17))
    assert batch.extras["time/rollout"] >= 0.15
    assert batch.extras["rollout/staleness"] == 0


def test_overlap_samples_ahead_from_older_weights():
    engine = ScriptedEngine()
    run = ScriptedRun(engine, n_prompts=2)
    producer = BatchProducer(run, depth=1)
    staleness, prompts = [], []
    try:
        producer.start(1)
        for step in range(1, 6):
            batch = producer.take(step)
            # "training" of `step` here; then the sync, after the sampling in flight
            producer.wait_engine()
            engine.weight_version = f"step_{step}"
            producer.fill(min(step + 2, 5))  # the trainer's schedule: step + 1 + depth
            staleness.append(batch.extras["rollout/staleness"])
            prompts.append(batch.prompt_index[0])
            sampled_with = 0 if step == 1 else max(1, step - 2)
            assert {r.weight_version for r in batch.rollouts} == {f"step_{sampled_with}"}
    finally:
        producer.close()
    assert staleness == [0, 0, 1, 1, 1]
    assert prompts == [10, 20, 30, 40, 50]  # prompts drawn once per step, in step order
    assert run.draws == [10, 20, 30, 40, 50]  # never beyond the last step


def test_failures_become_the_steps_failure():
    run = ScriptedRun(ScriptedEngine(fail_at_step=2), n_prompts=2)
    producer = BatchProducer(run, depth=1)
    try:
        producer.start(1)
        assert not isinstance(producer.take(1), StepFailure)
        producer.fill(2)
        producer.wait_engine()  # does not raise: the failure belongs to step 2
        failure = producer.take(2)
    finally:
        producer.close()
    assert isinstance(failure, StepFailure) and failure.step == 2
    assert "rollout server http://x: connection refused" in failure.message

    run = ScriptedRun(ScriptedEngine(), n_prompts=4, fail_domain="a")
    producer = BatchProducer(run, depth=0)
    try:
        producer.start(1)
        failure = producer.take(1)
    finally:
        producer.close()
    assert isinstance(failure, StepFailure) and "teacher of domain a: HTTP 500" in failure.message


def test_inflight_rollouts_are_rescored_not_resampled():
    engine = ScriptedEngine()
    run = ScriptedRun(engine, n_prompts=4)
    producer = BatchProducer(run, depth=1)
    try:
        producer.start(1)
        first = producer.take(1)
        producer.fill(2)
        state = producer.inflight_state()
        assert [s["step"] for s in state] == [2] and producer.draws_ahead() == 1
        want = producer.take(2)
    finally:
        producer.close()

    engine2 = ScriptedEngine()
    engine2.weight_version = "step_7"  # other weights: sampling again would show it
    run2 = ScriptedRun(engine2, n_prompts=4)
    producer2 = BatchProducer(run2, depth=1)
    try:
        producer2.restore(state)
        producer2.start(2)
        got = producer2.take(2)
    finally:
        producer2.close()
    assert run2.draws == [] and engine2.log == []  # nothing drawn, nothing sampled
    assert [r.response_ids for r in got.rollouts] == [r.response_ids for r in want.rollouts]
    assert {r.weight_version for r in got.rollouts} == {"step_0"}
    assert len(run2.scored) == 2  # both pieces scored again
    assert first.prompt_index != got.prompt_index


# --------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def overlap_recipe(tiny, run_dir: Path) -> dict:
    return make_recipe(
        tiny,
        run_dir,
        rollout={"n_samples_per_prompt": 2, "max_new_tokens": 6, "overlap": True},
    )


def test_overlapped_run_resumes_exactly(tiny, tmp_path):
    ref_dir = tmp_path / "ref"
    ref_recipe = write_recipe(tmp_path / "ref.yaml", overlap_recipe(tiny, ref_dir))
    reference = start_train(ref_recipe, log=tmp_path / "ref.log")  # beside the killed one

    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", overlap_recipe(tiny, run_dir))
    proc = start_train(recipe, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 300, proc, "checkpoint")
        wait_for(lambda: len(metrics(run_dir)) >= 3, 300, proc, "step 3")
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert len(metrics(run_dir)) < 6
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert (latest / "inflight.pt").exists()  # the next step's rollouts, sampled ahead
    out = finish(start_train(recipe, log=tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert "resuming from" in out
    finish(reference, tmp_path / "ref.log")

    rows = metrics(ref_dir)
    assert [r["rollout/staleness"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert_rows_close(metrics(run_dir), rows, tol=0.0)
    assert_rows_close(metrics(run_dir, "eval.jsonl"), metrics(ref_dir, "eval.jsonl"), tol=0.0)
    assert checkpoints(run_dir) == checkpoints(ref_dir)
