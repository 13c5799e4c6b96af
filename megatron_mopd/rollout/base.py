"""The rollout-engine interface the trainer sees; backends: `sglang.py`, `embedded.py`."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator

from megatron_mopd.types import Rollout, SamplingParams


def join_pieces(n: int, pieces: Iterable[tuple[list[int], list[Rollout]]]) -> list[Rollout]:
    """The `n` rollouts of `generate_stream`'s pieces, in index order."""
    out: list[Rollout | None] = [None] * n
    for idx, rolls in pieces:
        for i, r in zip(idx, rolls):
            out[i] = r
    return out  # type: ignore[return-value]


class RolloutEngine(abc.ABC):
    """Samples the student's responses with the engine's own log-probs (log mu)."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One `Rollout` per prompt, in order (repeat a prompt for several samples)."""

    def generate_stream(
        self, prompts: list[list[int]], sampling: SamplingParams
    ) -> Iterator[tuple[list[int], list[Rollout]]]:
        """The rollouts of `generate`, in pieces as they complete: yields (indices into
        `prompts`, their rollouts); the pieces cover every prompt once. Backends that
        sample in batches yield each batch when it is done, so teacher scoring can start
        on it (the default yields everything at once). Concatenated in index order they
        equal `generate(prompts, sampling)`."""
        yield list(range(len(prompts))), self.generate(prompts, sampling)

    @abc.abstractmethod
    def update_weights_from_disk(self, hf_dir: str, weight_version: str) -> None:
        """Load new student weights from a Hugging Face folder."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> str:
        """The version of the weights that produced the latest rollouts."""

    def close(self) -> None:  # noqa: B027 (optional hook, default no-op)
        """Release connections or memory."""
