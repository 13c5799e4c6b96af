"""The fast decoding of SGLang scoring answers: log-prob arrays decoded as flat lists.

Most of the client's CPU per scoring request went to building and walking one small
`[logprob, id, null]` list per token (and per top-k entry: k per token). Here each item's
`input_token_logprobs` array (and, with top-k, its `input_top_logprobs` array) is cut out
of the answer's bytes and replaced by the item's number in the rest, which is decoded as
usual. The arrays, stripped of their brackets, are decoded together as one flat list
`[lp, id, null, lp, id, null, ...]` and checked with C-level slices and counts. The rest
must decode with each placeholder in its item's `meta_info`, so a cut in the wrong place
(a key inside a string, say) is noticed.

SGLang reports input ids >= vocab_size - 1 as 0 (`ids_match`): a reported 0 for a higher
id sent is accepted, in this path and the full one.

Anything unexpected (another layout, a bad value, NaN literals, ragged top-k rows)
returns None: the caller (`answers.check_scoring_answer`) then decodes the whole
answer and checks it entry by entry, naming what is wrong. Entry boundaries inside a row
are not checked one by one: entries that are not triples but whose flattened values, ids
and nulls all fall in place would pass, each value still paired with its own id.

Measured on a 32 x 256-token answer (`mopd serve`, as SGLang writes it: orjson,
compact), client CPU per sequence: log-probs only ~0.07 ms (from ~0.10); top-8 ~0.6 ms
(from ~2.2).

The top-k rows come back as `[n, k]` tensors, built with one numpy conversion of all the
answer's values and one of its ids (no per-row lists). Client CPU per sequence of a
32-sequence answer kept from mid-sequence, against the per-row lists plus the
`torch.tensor` of them the batch needed (best of 3, a busy 2-core host): 64 tokens, k =
128 (a full toy vocabulary) 3.5 ms (from 4.9); 256 tokens, k = 8: 0.62 ms (from 1.27).
Most of what is left is orjson decoding the arrays.
"""

from __future__ import annotations

import itertools
import math
from operator import methodcaller

import numpy as np
import torch

from megatron_mopd.sglang.http_pool import loads_json

MAX_LOGPROB = 1e-4  # a log-prob above this is not a log-prob (float32 rounding allowed)

_TOKENS = b'"input_token_logprobs"'  # [[null, id, null], [lp, id, null], ...]
_TOPS = b'"input_top_logprobs"'  # [null, [[lp, id, null] x k], ...]
_END = {_TOKENS: b"]]", _TOPS: b"]]]"}
_NAME = {_TOKENS: "input_token_logprobs", _TOPS: "input_top_logprobs"}
_BRACKETS = b"[]"
_chain = itertools.chain.from_iterable


def fast_scored(
    data: bytes, seqs: list[list[int]], sent_start: int, starts: list[int], top_k: int = 0
) -> tuple[list, list[list[float]], list[tuple[torch.Tensor, torch.Tensor]] | None] | None:
    """Decode and check a scoring answer of `len(seqs)` items sent with
    `logprob_start_len = sent_start`: (the items, each sequence's log-probs from its own
    start on, each sequence's (top ids, top log-probs) rows or None without top-k), or
    None to take the slow path."""
    n = len(seqs)
    keys = (_TOKENS, _TOPS) if top_k > 0 else (_TOKENS,)
    cut = _cut_arrays(data, keys)
    if cut is None:
        return None
    rest, arrays = cut
    if any(len(arrays[k]) != n for k in keys):
        return None
    try:
        items = loads_json(rest)
        # "[[lp,id,null],...],[[...]]" -> "[lp,id,null,...,lp,id,null]"
        flat = loads_json(b"[" + b",".join(arrays[_TOKENS]).translate(None, _BRACKETS) + b"]")
    except ValueError:
        return None
    if not isinstance(items, list) or len(items) != n:
        return None
    try:
        for j, item in enumerate(items):
            meta = item["meta_info"]
            for key in keys:
                mark = meta[_NAME[key]]
                if type(mark) is not int or mark != j:
                    return None
        logprobs = _token_logprobs(flat, seqs, sent_start, starts)
        tops = _top_rows(arrays[_TOPS], seqs, sent_start, starts, top_k) if top_k > 0 else None
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    if logprobs is None or (top_k > 0 and tops is None):
        return None
    return items, logprobs, tops


def _cut_arrays(data: bytes, keys: tuple[bytes, ...]) -> tuple[bytes, dict] | None:
    """(`data` with each array under one of `keys` replaced by its number among that
    key's arrays, {key: [array bytes, in order]}), or None if an array cannot be cut.

    An array holds no string, so it ends at the last closing pattern (`]]`, or `]]]` for
    top-k) before the next '"' (found with memchr; a forward search for the pattern stops
    at every ']' and costs 5x more)."""
    parts: list[bytes] = []
    arrays: dict[bytes, list[bytes]] = {k: [] for k in keys}
    nxt = {k: data.find(k) for k in keys}
    pos = 0
    while True:
        live = [(at, k) for k, at in nxt.items() if at >= 0]
        if not live:
            break
        at, key = min(live)
        at += len(key)
        b = data.find(b"[", at)
        if b < 0 or data[at:b].strip() != b":":
            return None
        q = data.find(b'"', b)
        end = _END[key]
        e = data.rfind(end, b, len(data) if q < 0 else q)
        if e < 0:
            return None
        parts += (data[pos:b], str(len(arrays[key])).encode())
        arrays[key].append(data[b : e + len(end)])
        pos = e + len(end)
        nxt[key] = data.find(key, pos)
    parts.append(data[pos:])
    return b"".join(parts), arrays


def ids_match(reported: list, sent: list[int]) -> bool:
    """True if the ids a server reported are the ids sent, allowing SGLang's clipping:
    SGLang 0.5.23 reports every input id >= vocab_size - 1 as 0 (in
    `logprob_result_processor.py`, meant for image-token hashes). Where ids differ, the
    reported one must be 0 and every sent id reported as 0 must exceed every non-zero id
    reported as itself (one threshold, vocab_size - 1, separates them)."""
    if reported == sent:
        return True
    if len(reported) != len(sent):
        return False
    clipped, kept = [], 0
    for r, s in zip(reported, sent):
        if r == s:
            kept = max(kept, s)
        elif r == 0 and type(r) is int:
            clipped.append(s)
        else:
            return False
    return min(clipped) > kept


def _token_logprobs(
    flat: list, seqs: list[list[int]], sent_start: int, starts: list[int]
) -> list[list[float]] | None:
    """Each sequence's log-probs from the flat `input_token_logprobs` of all items, or
    None. Checked: the leading null of each item, every entry's id (the id sent) and null
    third field (also entries before a sequence's own start), the total length, and the
    values kept (finite, <= MAX_LOGPROB)."""
    out, sent = [], []
    o = 0  # offset of sequence j's entries in `flat`
    for j, ids in enumerate(seqs):
        if flat[o] is not None:  # the leading null
            return None
        lo = o + 3 * (starts[j] - sent_start)  # entry of token `start`
        o += 3 * (len(ids) - sent_start)
        out.append(flat[lo:o:3])
        sent.append(ids[sent_start:])
    if (
        o != len(flat)
        or not ids_match(flat[1::3], list(_chain(sent)))
        or flat[2::3].count(None) != o // 3
        or not math.isfinite(sum(_chain(out)))
        or max(_chain(out), default=0.0) > MAX_LOGPROB
    ):
        return None
    return out


def _top_rows(
    arrays: list[bytes], seqs: list[list[int]], sent_start: int, starts: list[int], k: int
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each sequence's top-k rows from its start on as `[n, k]` tensors (int64 ids,
    float32 log-probs), or None.

    Each item's array must be `[null,[[e],...,[e]],...]` with one row per position after
    the first and exactly `k` entries per row (counted on the bytes: rows are split at
    `]],[[`, entries at `],[`); then all rows of all items are decoded as one flat list
    and checked: ids are ints in [0, 2**63), third fields null, values finite and <=
    MAX_LOGPROB (as float32). The values and ids become one tensor each (one C-level
    conversion per answer, no per-row lists); each sequence gets a copy of its rows."""
    regions = []
    for ids, arr in zip(seqs, arrays):
        if not arr.startswith(b"[null,[["):
            return None
        region = arr[6:-1]  # "[[e],...],...,[[e],...]"
        rows = region.split(b"]],[[")
        if len(rows) != len(ids) - sent_start - 1:
            return None
        if set(map(methodcaller("count", b"],["), rows)) != {k - 1}:
            return None
        regions.append(region)
    flat = loads_json(b"[" + b",".join(regions).translate(None, _BRACKETS) + b"]")
    values, top_ids = flat[0::3], flat[1::3]
    if (
        len(flat) != 3 * k * sum(len(ids) - sent_start - 1 for ids in seqs)
        or flat[2::3].count(None) != len(values)
        or not set(map(type, top_ids)) <= {int}
        or not math.isfinite(sum(values))  # (a null or a text value raises TypeError)
    ):
        return None
    try:  # one array of all values and one of all ids: C-level, 3x torch.tensor's speed
        with np.errstate(over="ignore"):  # a double past float32's range: -inf, refused below
            values = torch.from_numpy(np.array(values, dtype=np.float32))
        top_ids = torch.from_numpy(np.array(top_ids, dtype=np.int64))
    except OverflowError:  # an id past int64
        return None
    if values.numel() and not (
        bool(torch.isfinite(values).all())  # (a finite double past float32's range)
        and float(values.max()) <= MAX_LOGPROB
        and int(top_ids.min()) >= 0
    ):
        return None
    values, top_ids = values.view(-1, k), top_ids.view(-1, k)
    out = []
    base = 0  # row of sequence j's first position (position 1)
    for ids, start in zip(seqs, starts):
        lo = base + start - sent_start - 1  # row of token `start`
        base += len(ids) - sent_start - 1
        out.append((top_ids[lo:base].clone(), values[lo:base].clone()))
    return out
