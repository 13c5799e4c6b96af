"""A teacher served by SGLang over HTTP (several worker URLs, or one sglang-router URL).

    teacher = SGLangTeacher("math", TeacherConfig(backend="sglang", domains=["math"],
                                                  urls=["http://10.0.0.5:30000"]))
    results = teacher.score([ScoreRequest(input_ids=prompt + response, response_start=len(prompt))])

Each sequence is scored in one prefill (`max_new_tokens: 0`) with
`logprob_start_len = response_start - 1`, so only the response's log-probs travel back
(SGLang's `input_token_logprobs[0]` is always null, whatever `logprob_start_len`;
the client is `megatron_mopd/sglang/client.py`). At construction the
teacher waits for `GET /health_generate` on every URL (up to
`startup_timeout_seconds`). Every failure (down after `max_retries`, timeout,
malformed answer) is a `TeacherError` naming the teacher, its domains and the URL, so
training stops instead of using missing or zero log-probs.
"""

from __future__ import annotations

from megatron_mopd.config import TeacherConfig
from megatron_mopd.errors import TeacherError
from megatron_mopd.sglang.client import SGLangClient, api_key_from_env
from megatron_mopd.teachers.base import Teacher
from megatron_mopd.teachers.validate import check_score_requests, check_score_results
from megatron_mopd.types import ScoreRequest, ScoreResult


class SGLangTeacher(Teacher):
    """`Teacher` over SGLang's `/generate` (prefill-only scoring)."""

    def __init__(
        self,
        name: str,
        cfg: TeacherConfig,
        *,
        wait: bool = True,
        client: SGLangClient | None = None,
    ) -> None:
        """Connect to `cfg.urls`; with `wait`, block until every server is healthy."""
        self.name = name
        self.cfg = cfg
        self.domains = list(cfg.domains)
        self.client = client or SGLangClient(
            cfg.urls,
            timeout=cfg.timeout_seconds,
            max_retries=cfg.max_retries,
            backoff_seconds=cfg.retry_backoff_seconds,
            max_in_flight=cfg.max_in_flight,
            name=name,
            api_key=api_key_from_env(cfg.api_key_env, f"teachers.{name}.api_key_env"),
        )
        if wait:
            self.wait_ready(cfg.startup_timeout_seconds)

    @property
    def where(self) -> str:
        """The teacher as error messages name it: name, domains, URLs."""
        domains = ", ".join(self.domains) or "none (default teacher)"
        return f"teacher {self.name!r} (domains: {domains}; urls: {', '.join(self.client.urls)})"

    def wait_ready(self, timeout: float) -> None:
        """Wait for `GET /health_generate` on every URL; `TeacherError` at the deadline."""
        try:
            self.client.wait_healthy(timeout)
        except TeacherError as e:
            raise TeacherError(f"{self.where}: {e}") from None

    def score(self, requests: list[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        """Log-probs of each request's response tokens (and top-k when `top_k > 0`)."""
        check_score_requests(self.where, requests)
        if not requests:
            return []
        try:
            scored = self.client.score(
                [r.input_ids for r in requests],
                [r.response_start for r in requests],
                top_k=top_k,
                batch_size=self.cfg.batch_size,
            )
        except TeacherError as e:
            raise TeacherError(f"{self.where}: {e}") from None
        results = [ScoreResult(s.logprobs, s.top_ids, s.top_logprobs) for s in scored]
        check_score_results(self.where, requests, results, top_k)
        return results

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()
