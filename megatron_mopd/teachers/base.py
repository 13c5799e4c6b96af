"""The teacher interface the trainer sees; backends: `sglang.py` (HTTP), `embedded.py`."""

from __future__ import annotations

import abc

from megatron_mopd.types import ScoreRequest, ScoreResult


class Teacher(abc.ABC):
    """Scores given token sequences in one prefill (no generation)."""

    name: str

    @abc.abstractmethod
    def score(self, requests: list[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        """Log-probs of every response token of every request, in order; with
        `top_k > 0` also each token's top-k as `[n, top_k]` tensors (`ScoreResult`).

        Raises `TeacherError` (naming the teacher and its server) on failure; never
        returns missing, NaN or infinite log-probs.
        """

    def close(self) -> None:  # noqa: B027 (optional hook, default no-op)
        """Release connections or memory."""
