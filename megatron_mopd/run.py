"""The pieces of one training run, wired together for `trainer.train`.

`Run.create` builds, in order, and fails before any training on a bad input:
run directory (writable?), student (Megatron, all ranks), prompt data (every record
valid, every domain routed), teachers and rollout engine (driver only), the pre-flight
check (servers reachable, tokenizers identical), logger and checkpoint manager.

The driver is global rank 0: it samples rollouts, asks teachers for scores, computes
rewards, and broadcasts the scored batch. Every rank trains on its data-parallel share.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from megatron_mopd.batch import TrainBatch, broadcast_batch, build_train_batch
from megatron_mopd.config import Config
from megatron_mopd.config_tree import to_dict
from megatron_mopd.data import PromptRecord, PromptSampler, load_prompts, tokenize_prompts
from megatron_mopd.errors import UserError
from megatron_mopd.types import Rollout, SamplingParams, ScoreRequest, ScoreResult


def step_seed(seed: int, step: int, what: str = "rollout") -> int:
    """A deterministic seed for one stage of one step (independent of RNG state)."""
    digest = hashlib.blake2b(f"{what}:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class StepFailure:
    """What the driver broadcasts instead of a batch when a step's rollouts or teacher
    scores failed: every rank then stops together, training nothing on that step."""

    step: int
    message: str


class Prompts:
    """The training prompts (tokenised) and their resumable sampler.

    `draws` counts the calls of `next_prompts` (one per step, set on resume). The sampler's
    state after each of the last draws is kept, so a checkpoint of step `s` can store it
    as it was after `s` draws although later steps have drawn their prompts already
    (a failed step, or the steps sampled ahead with `rollout.overlap`): `state_after`.
    """

    KEEP_STATES = 16

    def __init__(self, records: list[PromptRecord], ids: list[list[int]], seed: int, shuffle: bool):
        self.records = records
        self.ids = ids
        self.sampler = PromptSampler(len(records), seed, shuffle)
        self.domains = sorted({r.domain for r in records})
        self.draws = 0
        self._states = {0: self.sampler.state()}

    def next_prompts(self, k: int) -> list[int]:
        """Indices of the next `k` prompts."""
        out = self.sampler.next(k)
        self.draws += 1
        self._states[self.draws] = self.sampler.state()
        self._states.pop(self.draws - self.KEEP_STATES, None)
        return out

    def state_after(self, draws: int) -> dict:
        """The sampler's state after `draws` draws (one of the last `KEEP_STATES`)."""
        if draws not in self._states:
            raise ValueError(f"sampler state after {draws} draws is gone (now at {self.draws})")
        return self._states[draws]

    def resumed_at(self, state: dict, draws: int) -> None:
        """Continue from a checkpoint's sampler `state`, taken after `draws` draws."""
        self.sampler.load_state(state)
        self.draws = draws
        self._states = {draws: self.sampler.state()}


class Run:
    """Everything `trainer.train` touches, with one method per stage of the loop."""

    def __init__(self, cfg: Config, env: Any):
        self.cfg = cfg
        self.env = env
        self.is_driver = env.rank == 0
        self.run_dir = os.path.abspath(cfg.run_dir)
        self.data: Prompts | None = None
        self.eval_data: Prompts | None = None
        self.engine = None
        self.producer = None  # the driver's pipeline.BatchProducer
        self.router = None
        self.reward_fns: dict[str, Any] = {}
        self.logger = None
        self.ckpt = None
        self.student = None
        self.tokenizer = None
        self.nonfinite_in_row = 0
        self.saved_step: int | None = None
        self.progress = None
        self._last_eval: dict[str, float] = {}
        self._t_start = time.time()

    # ---------------------------------------------------------------- set-up
    @classmethod
    def create(cls, cfg: Config, env: Any) -> Run:
        """Build every piece; user errors surface here, before any training (what was
        built already is closed again)."""
        run = cls(cfg, env)
        try:
            run._build()
        except BaseException:
            run.close()
            raise
        return run

    def _build(self) -> None:
        """Run directory, checkpoint manager, pre-flight (driver), student, data, driver."""
        from megatron_mopd.checkpoint import CheckpointManager
        from megatron_mopd.logger import MetricsLogger
        from megatron_mopd.student.actor import Student
        from megatron_mopd.teachers.preflight import run_preflight

        run, cfg, env = self, self.cfg, self.env
        if not cfg.data.train_path:
            raise UserError("data.train_path is not set: MOPD needs a JSONL prompt dataset")
        run.logger = MetricsLogger(
            run.run_dir,
            enabled=run.is_driver,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project,
            config=to_dict(cfg),
        )
        if run.is_driver:
            with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        run.ckpt = CheckpointManager(
            cfg.checkpoint.dir or os.path.join(run.run_dir, "checkpoints"),
            keep_last=cfg.checkpoint.keep_last,
        )
        if run.is_driver:  # datasets, teachers and tokenizers, before the (slow) student build
            run_preflight(cfg, offline=False, wait_for_servers=True)
        run.student = Student.create(cfg, env)
        run.tokenizer = run.student.tokenizer
        run._build_data()
        if run.is_driver:
            run._build_driver()

    def _build_data(self) -> None:
        from megatron_mopd.teachers.router import check_domains

        cfg = self.cfg
        need_answer = bool(cfg.rewards) or cfg.train.eval_interval > 0
        records = load_prompts(cfg.data.train_path, need_answer=bool(cfg.rewards))
        check_domains(cfg, {r.domain for r in records})
        ids = tokenize_prompts(
            records, self.tokenizer, cfg.data.apply_chat_template, cfg.data.max_prompt_length
        )
        self.data = Prompts(records, ids, cfg.train.seed, cfg.data.shuffle)
        if cfg.data.eval_path:
            erecs = load_prompts(cfg.data.eval_path, need_answer=need_answer)
            eids = tokenize_prompts(
                erecs, self.tokenizer, cfg.data.apply_chat_template, cfg.data.max_prompt_length
            )
            self.eval_data = Prompts(erecs, eids, cfg.train.seed, shuffle=False)
        for domain, spec in cfg.rewards.items():
            from megatron_mopd.rewards import load_reward_fn

            self.reward_fns[domain] = load_reward_fn(spec, key=f"rewards.{domain}")
        if cfg.rewards:
            missing = sorted(set(self.data.domains) - set(cfg.rewards))
            if missing:
                raise UserError(
                    f"rewards has no entry for domain(s) {missing} of {cfg.data.train_path}"
                )

    def _build_driver(self) -> None:
        from megatron_mopd.rollout.factory import build_rollout_engine
        from megatron_mopd.teachers.router import TeacherRouter

        cfg = self.cfg
        # the student's vocabulary bounds the teachers' top-k ids (one tokenizer)
        self.router = TeacherRouter.from_config(cfg, vocab_size=self.student.model_cfg.vocab_size)
        self.engine = build_rollout_engine(cfg, hf_path=self.student.hf_dir)
        from megatron_mopd.pipeline import BatchProducer

        self.producer = BatchProducer(self, depth=self.overlap_depth)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(
                total=cfg.train.max_steps, desc="mopd", unit="step", file=sys.stderr
            )

    @property
    def overlap_depth(self) -> int:
        """Steps sampled ahead of the training one: `rollout.max_staleness` with
        `rollout.overlap`, else 0 (on-policy)."""
        rc = self.cfg.rollout
        return rc.max_staleness if rc.overlap else 0

    # ---------------------------------------------------------------- stages
    def rollout_request(
        self, prompt_index: list[int], step: int
    ) -> tuple[list[list[int]], SamplingParams]:
        """The engine's prompts (each repeated `rollout.n_samples_per_prompt` times, in a
        row) and sampling settings of `step` (its seed derived from train.seed and step)."""
        rc = self.cfg.rollout
        n = rc.n_samples_per_prompt
        prompts = [self.data.ids[i] for i in prompt_index for _ in range(n)]
        stop = list(rc.stop_token_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in stop:
            stop.append(self.tokenizer.eos_token_id)
        sampling = SamplingParams(
            max_new_tokens=rc.max_new_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            top_k=rc.top_k,
            stop_token_ids=stop,
            seed=step_seed(self.cfg.train.seed, step),
        )
        return prompts, sampling

    def rollout(self, prompt_index: list[int], step: int) -> list[Rollout]:
        """Sample `rollout.n_samples_per_prompt` responses per prompt (consecutive)."""
        return self.engine.generate(*self.rollout_request(prompt_index, step))

    def domains_of(self, prompt_index: list[int]) -> list[str]:
        """The domain of every rollout of these prompts (in `rollout_request`'s order)."""
        n = self.cfg.rollout.n_samples_per_prompt
        return [self.data.records[i].domain for i in prompt_index for _ in range(n)]

    def score_rollouts(self, rollouts: list[Rollout], domains: list[str]) -> list[ScoreResult]:
        """Each domain teacher's log-probs of its rollouts' response tokens."""
        requests = [
            ScoreRequest(input_ids=r.prompt_ids + r.response_ids, response_start=len(r.prompt_ids))
            for r in rollouts
        ]
        return self.router.score(requests, domains)

    def score(self, rollouts: list[Rollout], prompt_index: list[int]) -> list[ScoreResult]:
        """The domain teacher's log-probs of every response token."""
        return self.score_rollouts(rollouts, self.domains_of(prompt_index))

    def _rewards(self, rollouts: list[Rollout], prompt_index: list[int]) -> torch.Tensor:
        n = self.cfg.rollout.n_samples_per_prompt
        out = []
        for j, r in enumerate(rollouts):
            rec = self.data.records[prompt_index[j // n]]
            text = self.decode_response(r.response_ids)
            out.append(float(self.reward_fns[rec.domain](text, rec.answer)))
        return torch.tensor(out)

    def decode_response(self, ids: list[int]) -> str:
        """Response text without the stop token."""
        eos = self.tokenizer.eos_token_id
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def outcome_advantages(self, rollouts, prompt_index) -> torch.Tensor | None:
        """GRPO advantages when outcome rewards are configured, else None."""
        from megatron_mopd.loss import grpo_advantages

        if not self.reward_fns:
            self._rewards_last = None
            return None
        rewards = self._rewards(rollouts, prompt_index)
        self._rewards_last = rewards
        return grpo_advantages(
            rewards, self.cfg.rollout.n_samples_per_prompt, self.cfg.loss.grpo_normalize_std
        )

    def make_batch(self, rollouts, scores, prompt_index, orm) -> TrainBatch:
        """Pack the scored rollouts into the tensors every rank trains on."""
        domains = self.domains_of(prompt_index)
        batch = build_train_batch(
            rollouts, scores, domains, self.data.domains, orm, pad_id=self.pad_id
        )
        extras = {
            "finish_stop_frac": sum(r.finish_reason == "stop" for r in rollouts) / len(rollouts),
            "weight_version": rollouts[0].weight_version if rollouts else "",
        }
        for d in sorted(set(domains)):  # sequences each domain's teacher scored for this batch
            extras[f"teacher_sequences/{d}"] = domains.count(d)
        if getattr(self, "_rewards_last", None) is not None:
            rewards = self._rewards_last
            for d_i, d in enumerate(self.data.domains):
                sel = batch.domain_ids_B == d_i
                if sel.any():
                    extras[f"reward/{d}"] = rewards[sel].mean().item()
        batch.extras = extras
        return batch

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def broadcast(self, batch: TrainBatch | None) -> TrainBatch:
        """The driver's batch on every rank."""
        return broadcast_batch(batch, src=0)

    def sync_weights(self, step: int) -> None:
        """Push the updated student to the rollout engine (collective)."""
        from megatron_mopd.rollout.weight_sync import sync_weights

        sync_weights(
            self.student.model_chunks,
            self.engine if self.is_driver else None,
            self.cfg,
            step,
            model_cfg=self.student.model_cfg,
        )

    def export_hf(self, out_dir: str) -> None:
        """Write the student as a Hugging Face folder (collective; rank 0 writes)."""
        from megatron_mopd.convert.hf import export_hf_checkpoint

        tok_dir = self.cfg.model.tokenizer_path or self.student.hf_dir
        export_hf_checkpoint(
            self.student.model_chunks, self.student.model_cfg, out_dir, tokenizer_dir=tok_dir
        )
        if self.is_driver:
            print(f"student written as a Hugging Face folder: {out_dir}", file=sys.stderr)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy exact match per domain on the held-out prompts (driver), logged."""
        if not self.is_driver or self.eval_data is None:
            return {}
        from megatron_mopd.rewards import exact_match

        ev = self.eval_data
        k = min(self.cfg.train.eval_prompts, len(ev.records))
        stop = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        greedy = SamplingParams(
            max_new_tokens=self.cfg.rollout.max_new_tokens,
            temperature=0.0,
            stop_token_ids=stop,
            seed=0,
        )
        outs = self.engine.generate(ev.ids[:k], greedy)
        per: dict[str, list[float]] = {}
        for rec, out in zip(ev.records[:k], outs):
            fn = self.reward_fns.get(rec.domain, exact_match)
            per.setdefault(rec.domain, []).append(
                float(fn(self.decode_response(out.response_ids), rec.answer or ""))
            )
        acc = {f"eval_acc/{d}": sum(v) / len(v) for d, v in sorted(per.items())}
        self._last_eval = acc
        self.logger.log(step, acc, kind="eval")
        return acc

    # ---------------------------------------------------------------- logging
    def log_step(
        self, step: int, metrics: dict, batch: TrainBatch, times: dict, wall: float | None = None
    ) -> dict:
        """One row of metrics.jsonl (driver) and the progress bar."""
        from megatron_mopd.trainer import is_finite_metrics

        finite = is_finite_metrics(metrics)
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        if not self.is_driver:
            return metrics
        tokens = int(batch.mask_B_T.sum().item())
        step_time = sum(times.values())
        row = dict(metrics)
        row.update({f"time/{k}": v for k, v in times.items()})
        row["time/step"] = step_time
        if wall is not None:  # everything but the stages: batching, broadcast, bookkeeping
            row["time/wall"] = wall
            row["time/overhead"] = max(0.0, wall - step_time)
        row["response_tokens"] = tokens
        row["tokens_per_s"] = tokens / step_time if step_time > 0 else 0.0
        row["lr"] = self.student.current_lr()
        row["skipped"] = not finite or bool(metrics.get("skipped", False))
        row.update({k: v for k, v in batch.extras.items() if k != "weight_version"})
        self.logger.log(step, row)
        if self.progress is not None:
            show = {
                "loss": row.get("loss"),
                "kl": row.get("reverse_kl"),
                "tok/s": row["tokens_per_s"],
            }
            show.update({k.split("/")[-1]: v for k, v in self._last_eval.items()})
            self.progress.set_postfix(
                {
                    k: (f"{v:.3g}" if isinstance(v, float) else v)
                    for k, v in show.items()
                    if v is not None
                },
                refresh=False,
            )
            self.progress.update(1)
        return row

    def should_stop_nonfinite(self, metrics: dict) -> bool:
        """True after `train.max_consecutive_nonfinite` non-finite steps in a row."""
        return self.nonfinite_in_row >= self.cfg.train.max_consecutive_nonfinite

    # ---------------------------------------------------------------- checkpoints
    def trainer_state(self, step: int, inflight: list | None = None) -> dict:
        """The driver's resumable state besides model and optimizer; `inflight`: the
        rollouts sampled ahead for the next steps, saved beside it (their prompt draws
        are part of the sampler state)."""
        draws = step + len(inflight or [])
        return {
            "step": step,
            # a failed step, or the steps sampled ahead, have drawn prompts already: the
            # sampler is stored as it was after exactly the draws the checkpoint covers
            "sampler": self.data.state_after(draws),
            "sampler_draws": draws,
            "inflight_steps": [x["step"] for x in inflight or []],
            "weight_version": getattr(self.engine, "weight_version", None),
            "nonfinite_in_row": self.nonfinite_in_row,
            "time": time.time(),
        }

    def save(self, step: int, with_inflight: bool = True) -> None:
        """Write checkpoint `step` (collective); with overlap also the rollouts already
        sampled for the following steps (`with_inflight`), so a resume is exact."""
        from megatron_mopd.checkpoint import rng_state
        from megatron_mopd.pipeline import INFLIGHT_FILE

        inflight = None
        if self.is_driver and self.producer is not None and with_inflight:
            inflight = self.producer.inflight_state() or None

        def write(tmp: str) -> None:
            self.student.save_state(os.path.join(tmp, "mcore"))
            torch.save(
                {"rng": rng_state(), "nonfinite_in_row": self.nonfinite_in_row},
                os.path.join(tmp, f"rank_{self.env.rank:05d}.pt"),
            )
            if self.is_driver:
                if inflight:
                    torch.save(inflight, os.path.join(tmp, INFLIGHT_FILE))
                with open(os.path.join(tmp, "trainer.json"), "w") as f:
                    json.dump(self.trainer_state(step, inflight), f, indent=1)

        self.ckpt.save(step, write)
        self.saved_step = step

    def save_on_failure(self, collective: bool = False) -> str:
        """Best effort: keep the newest trained state when a teacher fails mid-run.

        Saving is collective: with several ranks it is only attempted when every rank got
        here together (`collective`, see `stop_after_failure`); otherwise the other ranks
        are inside another collective and the newest periodic checkpoint is what remains.
        Returns a sentence saying which checkpoint a restart resumes from.
        """
        step = self.student.step if self.student is not None else 0
        if step and self.saved_step != step and (collective or self.env.world_size == 1):
            try:
                # what was sampled ahead is not kept: the failed step is sampled afresh
                self.save(step, with_inflight=False)
            except Exception as e:  # the original error matters more
                print(f"could not save a checkpoint after the failure: {e}", file=sys.stderr)
        if self.saved_step:
            return (
                f"checkpoint of step {self.saved_step} in {self.ckpt.root}: run the same "
                "command again to resume from it"
            )
        return "no checkpoint was saved (no step was trained)"

    def stop_after_failure(self, failure: StepFailure) -> None:
        """Every rank, on the driver's `StepFailure`: save the last trained step, then stop."""
        where = self.save_on_failure(collective=True)
        self.stop(f"step {failure.step} failed and was not trained: {failure.message}; {where}")

    def stop(self, message: str) -> None:
        """Every rank together: the driver reports `message` on stderr, then all raise
        `RunStopped`. The report comes first because under torchrun the first rank to exit
        gets the others killed, the driver maybe before it could say why."""
        from megatron_mopd.errors import RunStopped

        if self.is_driver:
            if self.progress is not None:
                self.progress.close()
                self.progress = None
            print(f"mopd train: error: {message}", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        raise RunStopped(message, reported=True)

    def resume_or_start(self) -> int:
        """Load the newest valid checkpoint (if any) and sync weights; return its step."""
        from megatron_mopd.checkpoint import set_rng_state
        from megatron_mopd.pipeline import INFLIGHT_FILE

        info = self.ckpt.find_resume()
        step = 0
        if info is not None:
            step = info.step
            self.student.load_state(os.path.join(info.path, "mcore"))
            self.student.step = step
            with open(os.path.join(info.path, "trainer.json")) as f:
                state = json.load(f)
            draws = state.get("sampler_draws", step)
            self.data.resumed_at(state["sampler"], draws)
            inflight_path = os.path.join(info.path, INFLIGHT_FILE)
            if self.is_driver and state.get("inflight_steps"):
                # sampled before the checkpoint from weights this run no longer has: they
                # are trained on as the uninterrupted run did (whatever rollout.overlap
                # says now), so the resumed run stays the same
                self.producer.restore(torch.load(inflight_path, weights_only=False))
            self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
            self.saved_step = step
            rank_file = os.path.join(info.path, f"rank_{self.env.rank:05d}.pt")
            if os.path.exists(rank_file):  # absent when resuming at another world size
                set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
            if self.is_driver:
                self.logger.truncate_after(step)
                print(f"resuming from {info.path} (step {step})", file=sys.stderr, flush=True)
                if self.progress is not None:
                    self.progress.update(step)
        elif self.is_driver:
            # rows left by a run that was killed before its first checkpoint: they would
            # appear twice (this run trains those steps again)
            self.logger.truncate_after(0)
        self.sync_weights(step)
        return step

    def close(self) -> None:
        """Close the progress bar, the logger, teachers and the engine."""
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()
        if self.producer is not None:
            self.producer.close()
        if self.router is not None:
            self.router.close()
        if self.engine is not None:
            self.engine.close()
