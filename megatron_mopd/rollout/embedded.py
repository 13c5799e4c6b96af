"""The student's rollout engine in-process: a Hugging Face transformers copy of the student.

    engine = EmbeddedRolloutEngine("/path/to/student_hf", seed=1234)
    rollouts = engine.generate(prompt_ids, SamplingParams(max_new_tokens=32, seed=7))
    engine.update_weights_from_state_dict(export_hf_state_dict(model_chunks), "step-3")

It plays SGLang's part on CPU: it samples with `HFEngine.generate` and returns the
sampled tokens' log-probs under *its own* forward (log mu). The trainer computes
log pi with Megatron's kernels on the same weights, so the two differ numerically for
real, as Megatron and SGLang do on GPUs; MOPD's importance weights see a genuine, if
small, train/inference mismatch.

Log-probs are always the unscaled log_softmax of the logits (SGLang's
`SGLANG_RETURN_ORIGINAL_LOGPROB=1`); MOPD samples at temperature 1, where the two agree.

Seeds: `SamplingParams.seed` seeds the whole call; prompt i draws from its own generator
seeded by `request_seeds(seed, n)[i]`, so repeated prompts (several samples per prompt)
get different samples, and a call is reproducible whatever the batching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable
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
    ) -> None:
        """Load the student from an HF folder (unless `engine` is given). `seed` seeds the
        draws of calls whose `SamplingParams.seed` is None. `return_routed_experts`: fill
        `Rollout.routed_experts` with the experts the engine's MoE routers chose (in
        its own dtype; nothing for dense models), for routing replay and its metrics."""
        self.return_routed_experts = return_routed_experts
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
        """One `Rollout` per prompt, in order, with log mu of every sampled token."""
        if not prompts:
            return []
        if sampling.seed is None:
            params: SamplingParams | list[SamplingParams] = sampling
        else:
            params = [
                dataclasses.replace(sampling, seed=s)
                for s in request_seeds(sampling.seed, len(prompts))
            ]
        try:
            outs = self.engine.generate(
                prompts, params, return_routed_experts=self.return_routed_experts
            )
        except ValueError as e:
            raise UserError(f"embedded rollout engine ({self.hf_path}): {e}") from e
        version = self.engine.weight_version
        rollouts = []
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
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
