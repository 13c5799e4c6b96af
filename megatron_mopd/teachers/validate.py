"""Checks every teacher backend applies to what it returns (see `Teacher.score`).

A teacher must never hand the loss a missing, NaN or infinite log-prob, nor a list of the
wrong length: the loss would silently train on garbage. These checks turn such answers
into a `TeacherError` naming the teacher, where it runs and the offending request.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_mopd.errors import TeacherError
from megatron_mopd.types import ScoreRequest, ScoreResult

MAX_LOGPROB = 1e-4  # a log-prob above this is not a log-prob (float32 rounding allowed)


def check_score_requests(where: str, requests: list[ScoreRequest]) -> None:
    """Refuse requests that cannot be scored (empty response, response at index 0)."""
    for i, req in enumerate(requests):
        if not 1 <= req.response_start <= len(req.input_ids):
            raise TeacherError(
                f"{where}: request {i} has response_start={req.response_start} outside "
                f"[1, {len(req.input_ids)}] (the first token has no context to score it)"
            )


def check_score_results(
    where: str,
    requests: list[ScoreRequest],
    results: list[ScoreResult],
    top_k: int = 0,
    vocab_size: int | None = None,
) -> None:
    """Check one `ScoreResult` per request, one finite log-prob (<= 0) per response token,
    and, when `top_k > 0`, `[n, top_k]` top-k tensors: int64 ids in [0, vocab_size)
    (`vocab_size` None: >= 0), finite log-probs <= 0 (checked on all requests at once).
    `where` names the teacher."""
    if len(results) != len(requests):
        raise TeacherError(f"{where}: returned {len(results)} results for {len(requests)} requests")
    for i, (req, res) in enumerate(zip(requests, results)):
        n = len(req.input_ids) - req.response_start
        if len(res.logprobs) != n:
            raise TeacherError(
                f"{where}: request {i} has {n} response tokens but {len(res.logprobs)} log-probs"
            )
        for t, lp in enumerate(res.logprobs):
            if lp is None or not math.isfinite(lp) or lp > MAX_LOGPROB:
                raise TeacherError(
                    f"{where}: request {i} token {t} (id {req.input_ids[req.response_start + t]})"
                    f" has log-prob {lp!r}; expected a finite value <= 0"
                )
        if top_k > 0:
            _check_top_k_shape(f"{where}: request {i}", n, res.top_ids, res.top_logprobs, top_k)
    if top_k > 0 and results:
        _check_top_k_values(where, results, vocab_size)


def _check_top_k_shape(where: str, n: int, ids: Any, lps: Any, top_k: int) -> None:
    """`ids` an int64 and `lps` a floating `[n, top_k]` tensor."""
    if ids is None or lps is None:
        raise TeacherError(f"{where}: top-{top_k} log-probs were not returned")
    if not isinstance(ids, torch.Tensor) or not isinstance(lps, torch.Tensor):
        raise TeacherError(
            f"{where}: top-k ids / log-probs must be tensors [n, k], got "
            f"{type(ids).__name__} / {type(lps).__name__}"
        )
    if ids.dtype != torch.int64 or not lps.is_floating_point():
        raise TeacherError(
            f"{where}: top-k ids / log-probs have dtypes {ids.dtype} / {lps.dtype}; "
            f"expected int64 / a floating type"
        )
    if ids.dim() != 2 or lps.dim() != 2 or len(ids) != n or len(lps) != n:
        raise TeacherError(
            f"{where} has {n} response tokens but top-k of shapes "
            f"{list(ids.shape)} / {list(lps.shape)}"
        )
    if ids.shape[1] != top_k or lps.shape[1] != top_k:
        raise TeacherError(
            f"{where}: {ids.shape[1]} top ids / {lps.shape[1]} top log-probs per token, "
            f"expected {top_k}"
        )


def _check_top_k_values(where: str, results: list[ScoreResult], vocab_size: int | None) -> None:
    """Finite top-k log-probs <= 0 and ids in [0, vocab_size), on all results' rows at
    once (a few tensor operations, whatever the number of requests); the first bad token
    is named by request and position."""
    lps = torch.cat([r.top_logprobs for r in results])
    ids = torch.cat([r.top_ids for r in results])
    bad_ids = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    checks = (
        (~torch.isfinite(lps), "non-finite top-k log-prob", lps),
        (lps > MAX_LOGPROB, "positive top-k log-prob", lps),
        (bad_ids, f"top-k id outside [0, {vocab_size or 'vocab'})", ids),
    )
    for bad, what, values in checks:
        if not bad.any():
            continue
        row = int(bad.any(dim=-1).nonzero()[0, 0])
        entries = values[row].tolist()
        for i, r in enumerate(results):  # the request and token of that row
            if row < len(r.top_ids):
                raise TeacherError(f"{where}: request {i} token {row}: {what} in {entries!r}")
            row -= len(r.top_ids)
