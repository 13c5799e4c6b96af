"""The student's rollout engine in-process: a Hugging Face transformers copy of the student.

    engine = EmbeddedRolloutEngine("/path/to/student_hf", seed=1234, batch_size=16)
    rollouts = engine.generate(prompt_ids, SamplingParams(max_new_tokens=32, seed=7))
    for idx, piece in engine.generate_stream(prompt_ids, sampling): ...   # chunk by chunk
    engine.update_weights_from_state_dict(export_hf_state_dict(model_chunks), "step-3")

It plays SGLang's part on CPU: it samples with `HFEngine.generate` and returns the
sampled tokens' log-probs under *its own* forward (log mu). The trainer computes
log pi with Megatron's kernels on the same weights, so the two differ numerically for
real, as Megatron and SGLang do on GPUs; MOPD's importance weights see a genuine, if
small, train/inference mismatch.

Log-probs are always the unscaled log_softmax of the logits (SGLang's
`SGLANG_RETURN_ORIGINAL_LOGPROB=1`); MOPD samples at temperature 1, where the two agree.

Batches: prompts are sampled `batch_size` at a time (`rollout.batch_size`), in order;
`generate_stream` yields each chunk (its indices, its rollouts) as soon as it is done,
and `generate` is those pieces joined.

Seeds: `SamplingParams.seed` seeds the whole call; chunk c draws all its tokens from one
generator seeded by `request_seeds(seed, n_chunks)[c]` (`HFEngine.generate`'s
`batch_seed`: one draw per decode step for the whole chunk). So the same seed,
prompts and `batch_size` give the same rollouts, whatever else happened before, and
repeated prompts (several samples per prompt) get different samples; a prompt's sample
does depend on the chunk it is in (its position and its neighbours). With
`SamplingParams.seed` None each chunk's seed is drawn from the engine's own generator
(seeded by the engine's `seed`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from megatron_mopd.errors import UserError
from megatron_mopd.rollout.base import RolloutEngine
from megatron_mopd.types import Rollout, SamplingParams

if TYPE_CHECKING:
    import torch

    from megatron_mopd.rollout.hf_engine import HFEngine


def request_seeds(seed: int, n: int) -> list[int]:
    """`n` well-mixed per-request seeds derived from one call seed (deterministic)."""
    out = []
    for i in range(n):
        digest = hashlib.blake2b(f"mopd:{seed}:{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


class EmbeddedRolloutEngine(RolloutEngine):
    """Samples the student's responses with a transformers model in this process."""

    def __init__(
        self,
        hf_path: str,
        seed: int | None = None,
        dtype: str = "float32",
        weight_version: str = "0",
        engine: HFEngine | None = None,
        return_routed_experts: bool = True,
        batch_size: int = 16,
    ) -> None:
        """Load the student from an HF folder (unless `engine` is given). `seed` seeds the
        draws of calls whose `SamplingParams.seed` is None. `return_routed_experts`: fill
        `Rollout.routed_experts` with the experts the engine's MoE routers chose (in
        its own dtype; nothing for dense models), for routing replay and its metrics.
        `batch_size`: prompts sampled together (the unit of `generate_stream` and of
        seeding; the default is `rollout.batch_size`'s)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"embedded rollout engine: batch_size={batch_size!r} must be >= 1")
        self.return_routed_experts = return_routed_experts
        self.batch_size = batch_size
        self._rng = random.Random(seed)  # chunk seeds of unseeded calls
        if engine is None:
            from megatron_mopd.rollout.hf_engine import HFEngine

            try:
                engine = HFEngine(
                    hf_path,
                    dtype=dtype,
                    seed=seed,
                    weight_version=weight_version,
                    return_original_logprob=True,
                )
            except (OSError, ValueError) as e:
                raise UserError(f"embedded rollout engine: cannot load {hf_path}: {e}") from e
        self.engine = engine
        self.hf_path = hf_path

    @property
    def tokenizer(self):
        """The student's tokenizer saved with the model (None when the folder has none)."""
        return self.engine.tokenizer

    @property
    def weight_version(self) -> str:
        """The version of the weights that produce the next rollouts."""
        return self.engine.weight_version

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order, with log mu of every sampled token (the
        pieces of `generate_stream`, joined)."""
        return [r for _, piece in self.generate_stream(prompts, sampling) for r in piece]

    def generate_stream(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> Iterator[tuple[list[int], list[Rollout]]]:
        """Chunks of `batch_size` prompts in order, each (its indices, its rollouts) as
        soon as it is sampled; chunk c is seeded by `request_seeds(sampling.seed, .)[c]`."""
        n_chunks = -(-len(prompts) // self.batch_size)
        if sampling.seed is None:
            seeds = [self._rng.getrandbits(63) for _ in range(n_chunks)]
        else:
            seeds = request_seeds(sampling.seed, n_chunks)
        for c, seed in enumerate(seeds):
            lo = c * self.batch_size
            idx = list(range(lo, min(lo + self.batch_size, len(prompts))))
            yield idx, self._sample_chunk([prompts[i] for i in idx], sampling, seed, lo)

    def _sample_chunk(
        self, prompts: list[list[int]], sampling: SamplingParams, seed: int, first: int
    ) -> list[Rollout]:
        """One engine call for one chunk; `first` is its first prompt's index (errors)."""
        try:
            outs = self.engine.generate(
                prompts,
                sampling,
                return_routed_experts=self.return_routed_experts,
                batch_seed=seed,
            )
        except ValueError as e:
            raise UserError(f"embedded rollout engine ({self.hf_path}): {e}") from e
        version = self.engine.weight_version
        rollouts = []
        for i, (prompt, out) in enumerate(zip(prompts, outs), start=first):
            if len(out.logprobs) != len(out.output_ids) or not all(
                math.isfinite(x) for x in out.logprobs
            ):
                raise RuntimeError(
                    f"embedded rollout engine: prompt {i}: {len(out.output_ids)} tokens with "
                    f"log-probs {out.logprobs!r} (expected one finite value per token)"
                )
            rollouts.append(
                Rollout(
                    prompt_ids=list(prompt),
                    response_ids=list(out.output_ids),
                    rollout_logprobs=list(out.logprobs),
                    finish_reason=out.finish_reason,
                    weight_version=version,
                    routed_experts=out.routed_experts,
                )
            )
        return rollouts

    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Reload every weight from an HF folder of the same architecture."""
        try:
            self.engine.load_weights_from_disk(hf_dir, weight_version=weight_version)
        except (OSError, ValueError) as e:
            raise UserError(
                f"embedded rollout engine: cannot load weights from {hf_dir}: {e}"
            ) from e
        self.hf_path = hf_dir

    def update_weights_from_state_dict(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
        weight_version: str,
    ) -> None:
        """Copy HF-named tensors (any subset, e.g. streamed from the Megatron student's
        export) into the model in place; no file is written."""
        self.engine.load_state_dict(named_tensors, weight_version=weight_version)

    def close(self) -> None:
        """Drop the model."""
        self.engine = None  # type: ignore[assignment]
