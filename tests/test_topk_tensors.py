"""Top-k teacher answers as `[n, k]` tensors: the vectorised checks of
`teachers.validate.check_score_results` and their packing by `batch.build_train_batch`."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mopd.batch import build_train_batch
from megatron_mopd.errors import TeacherError
from megatron_mopd.teachers.validate import check_score_results
from megatron_mopd.types import Rollout, ScoreRequest, ScoreResult


def _answer(n: int, k: int, seed: int = 0) -> ScoreResult:
    g = torch.Generator().manual_seed(seed)
    lps = torch.log_softmax(torch.randn(n, 50, generator=g), -1)
    top_lp, top_ids = lps.topk(k, dim=-1)
    return ScoreResult([-1.0] * n, top_ids, top_lp)


def _check(res: ScoreResult, n: int = 4, k: int = 3, vocab: int | None = 50) -> None:
    req = ScoreRequest(input_ids=[1, 2] + [7] * n, response_start=2)
    check_score_results("teacher 't' (here)", [req], [res], k, vocab)


def _with(res: ScoreResult, ids=None, lps=None) -> ScoreResult:
    return ScoreResult(
        res.logprobs,
        res.top_ids if ids is None else ids,
        res.top_logprobs if lps is None else lps,
    )


def test_good_top_k_passes_and_bad_top_k_is_named():
    good = _answer(4, 3)
    _check(good)
    _check(_with(good, lps=good.top_logprobs.double()))  # any floating dtype
    ids, lps = good.top_ids, good.top_logprobs
    nan = lps.clone()
    nan[2, 1] = math.nan
    pos = lps.clone()
    pos[3, 0] = 0.5
    neg, high = ids.clone(), ids.clone()
    neg[1, 2] = -1
    high[0, 0] = 50
    cases = [
        (ScoreResult(good.logprobs), "request 0: top-3 log-probs were not returned"),
        (_with(good, ids=ids.tolist()), "must be tensors \\[n, k\\], got list / Tensor"),
        (_with(good, ids=ids.int()), "dtypes torch.int32 / torch.float32"),
        (_with(good, ids=ids[:3], lps=lps[:3]), "4 response tokens but top-k of shapes"),
        (_with(good, ids=ids.flatten()), "shapes \\[12\\] / \\[4, 3\\]"),
        (_with(good, ids=ids[:, :2], lps=lps[:, :2]), "2 top ids / 2 top log-probs per token"),
        (_with(good, lps=nan), "request 0 token 2: non-finite top-k log-prob in \\["),
        (_with(good, lps=pos), "request 0 token 3: positive top-k log-prob"),
        (_with(good, ids=neg), "request 0 token 1: top-k id outside \\[0, 50\\)"),
        (_with(good, ids=high), "request 0 token 0: top-k id outside \\[0, 50\\)"),
    ]
    for res, message in cases:
        with pytest.raises(TeacherError, match=f"teacher 't' \\(here\\).*{message}"):
            _check(res)
    _check(_with(good, ids=high), vocab=None)  # no vocabulary given: only ids >= 0
    with pytest.raises(TeacherError, match="outside \\[0, vocab\\)"):
        _check(_with(good, ids=neg), vocab=None)


def test_the_first_bad_token_of_many_requests_is_named():
    """The value checks run on all requests' rows at once; the message still names the
    request and its token."""
    results = [_answer(n, 2, seed=n) for n in (3, 1, 4)]
    requests = [ScoreRequest([1] * (n + 1), 1) for n in (3, 1, 4)]
    check_score_results("t", requests, results, 2, 50)
    results[2].top_logprobs[3, 1] = math.inf
    results[2].top_ids[1, 0] = 99
    with pytest.raises(TeacherError, match="t: request 2 token 3: non-finite top-k log-prob"):
        check_score_results("t", requests, results, 2, 50)
    results[2].top_logprobs[3, 1] = -1.0
    with pytest.raises(TeacherError, match="t: request 2 token 1: top-k id outside .* in \\[99, "):
        check_score_results("t", requests, results, 2, 50)


def test_batch_copies_top_k_tensors_and_pads_a_smaller_k():
    """Rows land at the response positions; a teacher with a smaller k leaves -inf (and id
    0) in the columns it lacks, which the top-k losses leave out of the support."""
    r = [
        Rollout([1, 2], [3, 4, 5], [-0.1, -0.2, -0.3], "stop", "v"),
        Rollout([1], [6], [-0.5], "length", "v"),
        Rollout([1], [7], [-0.5], "length", "v"),
    ]
    a, b = _answer(3, 4, seed=1), _answer(1, 2, seed=2)
    batch = build_train_batch(r, [a, b, ScoreResult([-1.0])], ["x", "y", "z"], ["x", "y", "z"])
    ids, lps = batch.teacher_topk_ids_B_T_K, batch.teacher_topk_logprobs_B_T_K
    assert ids.shape == lps.shape == (3, 5, 4) and ids.dtype == torch.int64
    assert torch.equal(ids[0, 2:5], a.top_ids) and torch.equal(lps[0, 2:5], a.top_logprobs)
    assert torch.equal(lps[1, 1, :2], b.top_logprobs[0])
    assert torch.equal(ids[1, 1, :2], b.top_ids[0])
    assert torch.isinf(lps[1, 1, 2:]).all() and (ids[1, 1, 2:] == 0).all()
    assert torch.isinf(lps[2]).all() and torch.isinf(lps[0, :2]).all()  # no top-k: -inf
    a.top_logprobs[0, 0] = 1.0  # a copy, not a view of the teacher's tensors
    assert lps[0, 2, 0] != 1.0
