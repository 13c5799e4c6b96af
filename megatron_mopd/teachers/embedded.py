"""A teacher computed in-process from a Hugging Face folder (CPU, or one GPU).

    teacher = EmbeddedTeacher("math", "/path/to/hf_dir")
    results = teacher.score([ScoreRequest(input_ids=[1, 5, 9, 7], response_start=2)], top_k=4)

It wraps `HFEngine.score` (one prefill per sequence, a plain log_softmax at temperature 1),
so it returns exactly what the SGLang teacher returns for the same tokens, up to kernel
numerics. Left out: sharding a teacher over several devices; a teacher too big for one
process belongs behind an SGLang server (`backend: sglang`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_mopd.errors import TeacherError
from megatron_mopd.teachers.base import Teacher
from megatron_mopd.teachers.validate import check_score_requests, check_score_results
from megatron_mopd.types import ScoreRequest, ScoreResult

if TYPE_CHECKING:
    from megatron_mopd.config import TeacherConfig
    from megatron_mopd.rollout.hf_engine import HFEngine


class EmbeddedTeacher(Teacher):
    """Scores with a transformers model loaded from `hf_path` in this process."""

    def __init__(
        self,
        name: str,
        hf_path: str,
        batch_size: int = 32,
        dtype: str = "float32",
        engine: HFEngine | None = None,
    ) -> None:
        """Load the model (unless an already-built `engine` is given). `batch_size` is the
        number of sequences per engine call (the engine also caps padded tokens)."""
        self.name = name
        self.hf_path = hf_path
        self.batch_size = batch_size
        self.where = f"teacher {name!r} (hf_path={hf_path})"
        if engine is None:
            from megatron_mopd.rollout.hf_engine import HFEngine

            try:
                engine = HFEngine(hf_path, dtype=dtype)
            except (OSError, ValueError) as e:
                raise TeacherError(f"{self.where}: cannot load the model: {e}") from e
        self.engine = engine

    @classmethod
    def from_config(cls, name: str, tcfg: TeacherConfig) -> EmbeddedTeacher:
        """Build from `teachers.<name>` of the config."""
        return cls(name, tcfg.hf_path, batch_size=tcfg.batch_size)

    @property
    def tokenizer(self):
        """The tokenizer saved with the model (None when the folder has none)."""
        return self.engine.tokenizer

    def score(self, requests: list[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        """Log-probs (and top-k) of every response token, in order (see `Teacher.score`)."""
        check_score_requests(self.where, requests)
        top_k = min(top_k, self.engine.vocab_size)
        results: list[ScoreResult] = []
        for lo in range(0, len(requests), self.batch_size):
            chunk = requests[lo : lo + self.batch_size]
            try:
                outs = self.engine.score(
                    [r.input_ids for r in chunk],
                    starts=[r.response_start for r in chunk],
                    top_k=top_k,
                )
            except ValueError as e:  # bad ids or positions, named by index within the chunk
                raise TeacherError(f"{self.where}: requests {lo}..: {e}") from e
            for out in outs:
                # response_start >= 1, so no position lacks a predecessor (no None entries)
                # and the top-k rows are the response tokens' ([n, k] tensors)
                results.append(
                    ScoreResult(
                        logprobs=list(out.logprobs),
                        top_ids=out.top_ids if top_k else None,
                        top_logprobs=out.top_logprobs if top_k else None,
                    )
                )
        check_score_results(self.where, requests, results, top_k, self.engine.vocab_size)
        return results

    def close(self) -> None:
        """Drop the model."""
        self.engine = None  # type: ignore[assignment]
