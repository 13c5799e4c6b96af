"""The driver's batch producer: rollouts streamed to the teachers, optionally ahead of training.

    producer = BatchProducer(run, depth=1)       # depth 0: on-policy, 1: one-step off-policy
    producer.start(first_step)
    batch = producer.take(step)                  # TrainBatch (or StepFailure) of `step`
    producer.wait_engine()                       # before a weight sync: sampling has finished
    producer.fill(step + 1 + depth)              # after it: the next steps sample meanwhile

Every step's rollouts are sampled by one background thread (the engine is never driven by
two threads at once) through `RolloutEngine.generate_stream`; each piece is handed to the
teachers as soon as it is sampled (a small thread pool: HTTP waits, or an embedded
teacher's torch kernels), so scoring overlaps the rest of the sampling ("streaming
scoring"). The outcome rewards and the batch tensors are built on the caller's thread.

Overlap (`rollout.overlap`, depth = `rollout.max_staleness`): right after the weight sync
of step s the trainer submits the steps up to s + 1 + depth, so the engine samples step
s + 1 + depth from the weights of step s while the teachers score step s + 1 and the
student trains it. `wait_engine()` before each weight sync keeps a step's rollouts from
one version of the weights, at most `depth` optimizer steps behind the student's (logged
as `rollout/staleness`: 0 on the first depth + 1 steps, then depth); each rollout carries
its weight version and IcePop's ratio (train now vs the engine's log mu) corrects the
lag. Without overlap (depth 0) the same code samples each step's rollouts right when it
needs them, from the newest weights.

Exact resume: a checkpoint of step s holds the rollouts already sampled for the steps
after it (`inflight_state`, written next to `trainer.json`), together with the prompt
sampler's state after their draws; a resumed run scores them again in the same pieces
(teachers are deterministic) instead of sampling them from weights it no longer has.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from megatron_mopd.errors import TeacherError
from megatron_mopd.types import Rollout, ScoreResult

INFLIGHT_FILE = "inflight.pt"


@dataclass
class InFlight:
    """One step's rollouts on their way: sampled in pieces, each piece scored when it is."""

    step: int
    prompt_index: list[int]
    pieces: list[tuple[list[int], list[Rollout]]] = field(default_factory=list)
    scores: list[concurrent.futures.Future] = field(default_factory=list)
    sampled: concurrent.futures.Future | None = None  # done when the engine has finished
    t_submit: float = 0.0
    t_sampled: float = 0.0  # seconds the engine took
    t_first_score: float | None = None
    t_scores_done: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    restored: bool = False  # sampled by the run a checkpoint came from


def weight_step(version: str) -> int | None:
    """The optimizer step of a weight version `step_N` (None for other names)."""
    if version and version.startswith("step_"):
        try:
            return int(version[len("step_") :])
        except ValueError:
            return None
    return None


class BatchProducer:
    """Samples, scores and batches the steps' rollouts for `trainer.train` (driver only).

    `run` is the `run.Run` (engine, router, data, rewards); `depth` is how many steps are
    sampled ahead of the one training (0 without `rollout.overlap`).
    """

    def __init__(self, run: Any, depth: int, score_threads: int = 4):
        self.run = run
        self.depth = depth
        self.queue: collections.deque[InFlight] = collections.deque()
        self._sampler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mopd-rollout")
        self._scorer = concurrent.futures.ThreadPoolExecutor(
            score_threads, thread_name_prefix="mopd-score"
        )
        self._restored: dict[int, InFlight] = {}
        self.next_step = 1  # the first step not submitted yet (set by `start`)

    def start(self, first_step: int) -> None:
        """The run trains from `first_step` on (1, or the step after a resumed checkpoint)."""
        self.next_step = first_step

    # ------------------------------------------------------------------ submitting
    def fill(self, upto: int) -> None:
        """Make sure the rollouts of every step up to `upto` are in flight, submitting
        the missing ones in step order (`take(s)` fills up to `s`; with overlap the
        trainer fills up to `s + 1 + depth` after the weight sync of step `s`)."""
        nxt = self.queue[-1].step + 1 if self.queue else self.next_step
        while nxt <= upto:
            self.queue.append(self._submit(nxt))
            nxt += 1
        self.next_step = max(self.next_step, nxt)

    def _submit(self, step: int) -> InFlight:
        restored = self._restored.pop(step, None)
        if restored is not None:  # sampled before the checkpoint: only scored again
            item = restored
            item.t_submit = time.perf_counter()
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            item.sampled = done
            for idx, rolls in item.pieces:
                item.scores.append(self._scorer.submit(self._score_piece, item, idx, rolls))
            return item
        # prompts are drawn here, on the caller's thread, in step order
        item = InFlight(step=step, prompt_index=self.run.data.next_prompts(self._per_step()))
        item.t_submit = time.perf_counter()
        item.sampled = self._sampler.submit(self._sample, item)
        return item

    def _per_step(self) -> int:
        return self.run.cfg.train.prompts_per_step

    def _sample(self, item: InFlight) -> None:
        t0 = time.perf_counter()
        prompts, sampling = self.run.rollout_request(item.prompt_index, item.step)
        for idx, rolls in self.run.engine.generate_stream(prompts, sampling):
            item.pieces.append((list(idx), rolls))
            item.scores.append(self._scorer.submit(self._score_piece, item, idx, rolls))
        item.t_sampled = time.perf_counter() - t0

    def _score_piece(
        self, item: InFlight, idx: list[int], rolls: list[Rollout]
    ) -> list[ScoreResult]:
        with item.lock:
            if item.t_first_score is None:
                item.t_first_score = time.perf_counter()
        domains = self.run.domains_of(item.prompt_index)
        out = self.run.score_rollouts(rolls, [domains[i] for i in idx])
        with item.lock:
            item.t_scores_done = max(item.t_scores_done, time.perf_counter())
        return out

    # ------------------------------------------------------------------ taking
    def wait_engine(self) -> None:
        """Block until the engine has finished every submitted sampling (errors are kept
        for `take`): a weight update must not land in the middle of a step's rollouts."""
        for item in self.queue:
            concurrent.futures.wait([item.sampled])

    def take(self, step: int):
        """The `TrainBatch` of `step`, or a `run.StepFailure` saying why there is none."""
        from megatron_mopd.run import StepFailure

        if not self.queue or self.queue[0].step != step:
            self.fill(step)
        item = self.queue.popleft()
        assert item.step == step, (item.step, step)
        t_wait = time.perf_counter()
        try:
            item.sampled.result()
            t_gen_end = time.perf_counter()
            results = [f.result() for f in item.scores]
            t_reward = time.perf_counter()
            rollouts: list[Rollout | None] = [None] * len(self.run.domains_of(item.prompt_index))
            scores: list[ScoreResult | None] = [None] * len(rollouts)
            for (idx, rolls), res in zip(item.pieces, results):
                for i, r, s in zip(idx, rolls, res):
                    rollouts[i], scores[i] = r, s
            missing = [i for i, r in enumerate(rollouts) if r is None]
            if missing:
                raise RuntimeError(
                    f"the rollout engine returned no response for {len(missing)} of "
                    f"{len(rollouts)} prompts (first: {missing[0]})"
                )
            orm = self.run.outcome_advantages(rollouts, item.prompt_index)
            batch = self.run.make_batch(rollouts, scores, item.prompt_index, orm)
        except TeacherError as e:  # no scores: nothing is trained on this step
            return StepFailure(step, str(e))
        except Exception as e:  # e.g. a reward function's bug: every rank stops, saved
            traceback.print_exc(file=sys.stderr)
            return StepFailure(step, f"{type(e).__name__}: {e} (traceback above)")
        now = time.perf_counter()
        first = item.t_first_score if item.t_first_score is not None else now
        batch.extras.update(
            {
                "time/rollout": item.t_sampled,
                # from the first piece handed to the teachers to the last one scored
                "time/teacher": max(0.0, item.t_scores_done - first),
                # scoring still running after sampling ended (what streaming leaves over)
                "time/teacher_tail": max(0.0, item.t_scores_done - item.t_submit - item.t_sampled),
                "time/reward": now - t_reward,
                "time/batch_wait_sampling": max(0.0, t_gen_end - t_wait),
            }
        )
        staleness = self.staleness(rollouts, step)
        if staleness is not None:
            batch.extras["rollout/staleness"] = staleness
            limit = self.run.cfg.rollout.max_staleness
            if staleness > limit and not item.restored:  # the producer's invariant: a bug
                raise RuntimeError(
                    f"step {step}: rollouts from {staleness} steps ago exceed "
                    f"rollout.max_staleness={limit}"
                )
        return batch

    @staticmethod
    def staleness(rollouts: list[Rollout], step: int) -> int | None:
        """How many optimizer steps the oldest rollout's weights lag the student's
        (the student trains step `step` from the weights of step - 1)."""
        versions = [weight_step(r.weight_version) for r in rollouts]
        if not versions or any(v is None for v in versions):
            return None
        return (step - 1) - min(versions)

    # ------------------------------------------------------------------ checkpoints
    def draws_ahead(self) -> int:
        """Prompt draws made for steps that are not trained yet (in flight)."""
        return len(self.queue) + len(self._restored)

    def inflight_state(self) -> list[dict]:
        """The sampled rollouts of the steps in flight, for a checkpoint (waits for the
        engine; scoring is not needed: a resumed run scores them again)."""
        self.wait_engine()
        out = []
        for item in self.queue:
            if item.sampled.exception() is not None:
                break  # that step fails when it is taken; a resume samples it afresh
            out.append(
                {"step": item.step, "prompt_index": item.prompt_index, "pieces": item.pieces}
            )
        return out

    def restore(self, state: list[dict]) -> None:
        """Take the rollouts a checkpoint saved (`inflight_state`) for the next steps."""
        for s in state:
            self._restored[s["step"]] = InFlight(
                step=s["step"],
                prompt_index=list(s["prompt_index"]),
                pieces=[(list(i), list(r)) for i, r in s["pieces"]],
                restored=True,
            )

    def close(self) -> None:
        """Stop the threads (what is in flight is dropped)."""
        for item in self.queue:
            if item.sampled is not None:
                item.sampled.cancel()
        self._sampler.shutdown(wait=True, cancel_futures=True)
        self._scorer.shutdown(wait=True, cancel_futures=True)
