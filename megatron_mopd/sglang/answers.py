"""The checks of SGLang's answers: a scoring or sampling answer turned into checked
`ScoredSequence`s / `Generation`s, or a `TeacherError` naming the server, the request and
the first bad entry.

Split from `client.py` (the protocol: requests, batching, retries), which calls
these on every answer. A scoring answer in SGLang's compact layout (orjson) is checked on
a flat decoding of its log-prob and top-k arrays (`fast_answers.fast_scored`); anything
else gets the full decoding and the entry-by-entry check (`check_scored`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_mopd.errors import RetryableAnswer, TeacherError
from megatron_mopd.sglang.fast_answers import MAX_LOGPROB, fast_scored, ids_match
from megatron_mopd.sglang.http_pool import Answer, decode_answer


@dataclass
class ScoredSequence:
    """Log-probs of the tokens `start..L-1` of one scored sequence; with top-k, `top_ids`
    (int64) / `top_logprobs` (float32) are `[L - start, k]` tensors, one row per token."""

    logprobs: list[float]
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


@dataclass
class Generation:
    """One sampled continuation, as the server returned it (checked)."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: dict
    weight_version: str | None
    # meta_info.routed_experts when asked (`return_routed_experts`): base64 of int32
    # [prompt + output - 1, num_layers, top_k], as SGLang 0.5.23 encodes it
    routed_experts: str | None = None


def check_scoring_answer(
    resp: Answer,
    url: str,
    label: str,
    seqs: list[list[int]],
    starts: list[int],
    sent_start: int,
    top_k: int,
    first_index: int,
) -> list[ScoredSequence]:
    """The checked log-probs of one scoring answer: `seqs` sent with `logprob_start_len =
    sent_start`, each kept from its own `starts[j]` on; errors number the sequences from
    `first_index`. SGLang's compact layout takes `fast_scored`; any other layout, or any
    doubt, the full decoding and `check_scored`, which names what is wrong."""
    n = len(seqs)
    fast = fast_scored(resp.data, seqs, sent_start, starts, top_k)
    if fast is not None:
        items, logprobs, tops = fast
        for j, item in enumerate(items):
            raise_if_aborted(item, url, label, first_index + j, "sequence")
        if tops is None:
            return [ScoredSequence(lp) for lp in logprobs]
        return [ScoredSequence(lp, *top) for lp, top in zip(logprobs, tops)]
    answer = decode_answer(resp)
    if not isinstance(answer, list) or len(answer) != n:
        check_item(answer, url, label, 0, n)  # raises, naming what came instead
    for j, item in enumerate(answer):
        raise_if_aborted(item, url, label, first_index + j, "sequence")
    out = [
        check_scored(
            answer[j], url, label, j, first_index + j, seqs[j], sent_start, starts[j], top_k
        )
        for j in range(n)
    ]
    if url not in _SLOW_LAYOUT_SEEN:  # a good answer the fast path could not take: say so
        _SLOW_LAYOUT_SEEN.add(url)
        log.warning(
            "%s: scoring answers are not in SGLang's compact JSON layout; they are checked "
            "entry by entry, at ~3x the client's CPU (fine for correctness)",
            url,
        )
    return out


_SLOW_LAYOUT_SEEN: set[str] = set()  # servers already warned about (once per process)
log = logging.getLogger(__name__)


def raise_if_aborted(item: Any, url: str, label: str, index: int, what: str) -> None:
    """`RetryableAnswer` if SGLang aborted this item: it answers HTTP 200 with
    `finish_reason = {"type": "abort", "message": ...}` (and whatever log-probs it had) for
    a request aborted without an HTTP status (`/abort_request`, a retraction, a weight
    update that aborts requests); asking again is right, reading it as data is not."""
    meta = item.get("meta_info") if isinstance(item, dict) else None
    finish = meta.get("finish_reason") if isinstance(meta, dict) else None
    if isinstance(finish, dict) and finish.get("type") == "abort":
        raise RetryableAnswer(
            f"{url}: {label}, {what} {index}: the server aborted the request "
            f"({finish.get('message') or 'no message'})"
        )


def check_item(answer: Any, url: str, label: str, j: int, n: int) -> dict:
    """Item `j` of a batch answer (a list of n objects)."""
    if not isinstance(answer, list) or len(answer) != n:
        got = f"a list of {len(answer)}" if isinstance(answer, list) else type(answer).__name__
        raise TeacherError(f"{url}: {label}: expected a list of {n} results, got {got}")
    item = answer[j]
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise TeacherError(f"{url}: {label}, item {j}: no meta_info in the answer")
    return item


def check_scored(
    item: Any,
    url: str,
    label: str,
    j: int,
    index: int,
    ids: list[int],
    sent_start: int,
    start: int,
    top_k: int,
) -> ScoredSequence:
    """Turn item `j` of a scoring answer (sent with `logprob_start_len = sent_start`) into
    the log-probs of tokens `start..`, or raise `TeacherError`."""
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        raise TeacherError(f"{url}: {label}, item {j}: no meta_info in the answer")
    entries = meta.get("input_token_logprobs")
    expected = len(ids) - sent_start
    if not isinstance(entries, list) or len(entries) != expected:
        got = len(entries) if isinstance(entries, list) else repr(entries)[:50]
        raise TeacherError(
            f"{url}: {label}, sequence {index}: {got} input_token_logprobs for {len(ids)} "
            f"tokens from logprob_start_len={sent_start}; expected {expected}"
        )
    first = entries[0]
    if not isinstance(first, list | tuple) or len(first) < 2 or first[0] is not None:
        raise TeacherError(
            f"{url}: {label}, sequence {index}: the first input_token_logprobs entry is "
            f"{first!r}; the contract gives a leading null"
        )
    skip = start - sent_start  # entries before token `start` (the leading null included)
    logprobs = _fast_logprobs(entries, skip, ids, start)
    if logprobs is None:  # something is off: find the first bad entry and name it
        where = f"{url}: {label}, sequence {index}"
        logprobs = _checked_logprobs(entries, ids, skip, sent_start, where)
    return with_top_k(
        ScoredSequence(logprobs),
        meta,
        f"{url}: {label}, sequence {index}",
        expected,
        sent_start,
        skip,
        top_k,
    )


def with_top_k(
    result: ScoredSequence,
    meta: dict,
    where: str,
    expected: int,
    sent_start: int,
    skip: int,
    top_k: int,
) -> ScoredSequence:
    """`result` with its top-k log-probs from `meta["input_top_logprobs"]` (entries
    `skip..expected-1`) as `[n, top_k]` tensors, checked entry by entry (the first bad one
    named); unchanged when `top_k` is 0."""
    if top_k <= 0:
        return result
    tops = meta.get("input_top_logprobs")
    if not isinstance(tops, list) or len(tops) != expected:
        raise TeacherError(f"{where}: input_top_logprobs missing or of the wrong length")
    rows_ids, rows_lps = [], []
    for k in range(skip, expected):
        row = tops[k]
        pos = sent_start + k
        if not isinstance(row, list) or len(row) != top_k:
            got = len(row) if isinstance(row, list) else repr(row)
            raise TeacherError(f"{where}: token {pos}: {got} top log-probs, expected {top_k}")
        ids_k, lps_k = [], []
        for e in row:
            if not isinstance(e, list | tuple) or len(e) < 2 or not _is_logprob(e[0]):
                raise TeacherError(f"{where}: token {pos}: bad top log-prob entry {e!r}")
            if not isinstance(e[1], int) or isinstance(e[1], bool) or not 0 <= e[1] < 2**63:
                raise TeacherError(f"{where}: token {pos}: bad top token id {e[1]!r}")
            ids_k.append(e[1])
            lps_k.append(float(e[0]))
        rows_ids.append(ids_k)
        rows_lps.append(lps_k)
    shape = (len(rows_ids), top_k)
    result.top_ids = torch.tensor(rows_ids, dtype=torch.int64).reshape(shape)
    result.top_logprobs = torch.tensor(rows_lps, dtype=torch.float32).reshape(shape)
    if not torch.isfinite(result.top_logprobs).all():  # a finite double past float32's range
        t = int((~torch.isfinite(result.top_logprobs)).any(-1).nonzero()[0, 0])
        raise TeacherError(f"{where}: token {sent_start + skip + t}: top log-prob out of range")
    return result


def check_generation(answer: Any, url: str, label: str, j: int, index: int, n: int) -> Generation:
    """Turn item `j` of a sampling answer into a `Generation`, or raise `TeacherError`."""
    item = check_item(answer, url, label, j, n)
    meta = item["meta_info"]
    where = f"{url}: {label}, prompt {index}"
    out_ids = item.get("output_ids")
    entries = meta.get("output_token_logprobs")
    finish = meta.get("finish_reason")
    raise_if_aborted(item, url, label, index, "prompt")
    if not isinstance(finish, dict) or finish.get("type") not in ("stop", "length"):
        raise TeacherError(f"{where}: unexpected finish_reason {finish!r}")
    if not isinstance(out_ids, list) or not isinstance(entries, list):
        raise TeacherError(f"{where}: output_ids / output_token_logprobs missing")
    if len(entries) != len(out_ids):
        raise TeacherError(
            f"{where}: {len(entries)} output_token_logprobs for {len(out_ids)} output tokens"
        )
    logprobs = []
    for t, (e, tok) in enumerate(zip(entries, out_ids)):
        if not isinstance(e, list | tuple) or len(e) < 2 or e[1] != tok:
            raise TeacherError(f"{where}: output token {t}: entry {e!r} does not match id {tok}")
        if not _is_logprob(e[0]):
            raise _not_a_logprob(where, f"output token {t} (id {tok})", e[0])
        logprobs.append(float(e[0]))
    return Generation(
        list(out_ids), logprobs, finish, meta.get("weight_version"), meta.get("routed_experts")
    )


def _checked_logprobs(
    entries: list, ids: list[int], skip: int, sent_start: int, where: str
) -> list[float]:
    """Entry-by-entry check of `input_token_logprobs[skip:]`; raises on the first bad one."""
    logprobs = []
    for k in range(skip, len(entries)):
        e = entries[k]
        pos = sent_start + k
        if not isinstance(e, list | tuple) or len(e) < 2:
            raise TeacherError(f"{where}: token {pos}: malformed entry {e!r}")
        if e[1] != ids[pos] and e[1] != 0:
            # SGLang reports ids >= vocab_size - 1 as 0 (logprob_result_processor.py)
            raise TeacherError(f"{where}: token {pos}: answer is for id {e[1]!r}, sent {ids[pos]}")
        if not _is_logprob(e[0]):
            raise _not_a_logprob(where, f"token {pos} (id {ids[pos]})", e[0])
        logprobs.append(float(e[0]))
    return logprobs


def _fast_logprobs(entries: list, skip: int, ids: list[int], start: int) -> list[float] | None:
    """The log-probs of `entries[skip:]` if they are well-formed `[logprob, id, ...]`
    entries for `ids[start:]`, checked in bulk with C-level loops: one list of values, one
    of ids compared with the ids sent, a sum (non-finite if any value is NaN or +-inf; a
    null or a string raises) and a max (a positive value). None when anything is off:
    the caller's entry-by-entry pass then finds the first bad entry and names it."""
    try:
        tail = entries[skip:]
        vals = [e[0] for e in tail]
        if not ids_match([e[1] for e in tail], ids[start:]):
            return None
        if vals and not (math.isfinite(sum(vals)) and max(vals) <= MAX_LOGPROB):
            return None
    except (TypeError, IndexError, KeyError):
        return None
    return vals


def _not_a_logprob(where: str, token: str, value: Any) -> TeacherError:
    return TeacherError(f"{where}: {token} has log-prob {value!r}; expected a finite number <= 0")


def _is_logprob(x: Any) -> bool:
    return (
        isinstance(x, int | float)
        and not isinstance(x, bool)
        and math.isfinite(x)
        and x <= MAX_LOGPROB
    )
