"""Checks every teacher backend applies to what it returns (see `Teacher.score`).

A teacher must never hand the loss a missing, NaN or infinite log-prob, nor a list of the
wrong length: the loss would silently train on garbage. These checks turn such answers
into a `TeacherError` naming the teacher, where it runs and the offending request.
"""

from __future__ import annotations

import math

from megatron_mopd.errors import TeacherError
from megatron_mopd.types import ScoreRequest, ScoreResult


def check_score_requests(where: str, requests: list[ScoreRequest]) -> None:
    """Refuse requests that cannot be scored (empty response, response at index 0)."""
    for i, req in enumerate(requests):
        if not 1 <= req.response_start <= len(req.input_ids):
            raise TeacherError(
                f"{where}: request {i} has response_start={req.response_start} outside "
                f"[1, {len(req.input_ids)}] (the first token has no context to score it)"
            )


def check_score_results(
    where: str, requests: list[ScoreRequest], results: list[ScoreResult], top_k: int = 0
) -> None:
    """Check one `ScoreResult` per request, one finite log-prob (<= 0) per response token,
    and k finite top-k entries per token when `top_k > 0`. `where` names the teacher."""
    if len(results) != len(requests):
        raise TeacherError(f"{where}: returned {len(results)} results for {len(requests)} requests")
    for i, (req, res) in enumerate(zip(requests, results)):
        n = len(req.input_ids) - req.response_start
        if len(res.logprobs) != n:
            raise TeacherError(
                f"{where}: request {i} has {n} response tokens but {len(res.logprobs)} log-probs"
            )
        for t, lp in enumerate(res.logprobs):
            if lp is None or not math.isfinite(lp) or lp > 1e-4:
                raise TeacherError(
                    f"{where}: request {i} token {t} (id {req.input_ids[req.response_start + t]})"
                    f" has log-prob {lp!r}; expected a finite value <= 0"
                )
        if top_k > 0:
            if res.top_ids is None or res.top_logprobs is None:
                raise TeacherError(f"{where}: request {i}: top-{top_k} log-probs were not returned")
            if len(res.top_ids) != n or len(res.top_logprobs) != n:
                raise TeacherError(
                    f"{where}: request {i} has {n} response tokens but top-k lists of length "
                    f"{len(res.top_ids)} / {len(res.top_logprobs)}"
                )
            for t, (ids, lps) in enumerate(zip(res.top_ids, res.top_logprobs)):
                if len(ids) != top_k or len(lps) != top_k:
                    raise TeacherError(
                        f"{where}: request {i} token {t}: {len(ids)} top ids / {len(lps)} top "
                        f"log-probs, expected {top_k}"
                    )
                if any(lp is None or not math.isfinite(lp) for lp in lps):
                    raise TeacherError(
                        f"{where}: request {i} token {t}: non-finite top-k log-prob in {lps!r}"
                    )
