"""The rollout-engine interface the trainer sees; backends: `sglang.py`, `embedded.py`."""

from __future__ import annotations

import abc

from megatron_mopd.types import Rollout, SamplingParams


class RolloutEngine(abc.ABC):
    """Samples the student's responses with the engine's own log-probs (log mu)."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order (repeat a prompt for several samples)."""

    @abc.abstractmethod
    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Load new student weights from a Hugging Face folder."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> str:
        """The version of the weights that produced the latest rollouts."""

    def close(self) -> None:  # noqa: B027 (optional hook, default no-op)
        """Release connections or memory."""
