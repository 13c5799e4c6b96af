"""The fast decoding of scoring answers (`sglang.fast_answers.fast_scored`) against the full
decoding and entry-by-entry check (`sglang.answers.check_scored`): the same log-probs and
top-k rows on SGLang's layout, and None (the slow path, which names the error) for every
kind of malformed answer."""

from __future__ import annotations

import json
import random

import orjson
import torch
from sglang_helpers import scoring_item

from megatron_mopd.sglang.answers import check_scored
from megatron_mopd.sglang.fast_answers import fast_scored


def scoring_answer(seqs, sent_start, top_k=0, **meta):
    """A batch answer as SGLang writes it (orjson, compact), with other meta_info fields."""
    items = []
    for i, ids in enumerate(seqs):
        item = scoring_item(ids, sent_start, top_k, seed=i)
        item["meta_info"].update(meta, id=f"req-{i}", prompt_tokens=len(ids))
        items.append({"text": "", "output_ids": [], **item})
    return items


def full_check(items, seqs, sent_start, starts, top_k=0):
    """(log-probs, top ids, top log-probs) of each sequence by the entry-by-entry check."""
    out = [
        check_scored(it, "u", "l", j, j, seqs[j], sent_start, starts[j], top_k)
        for j, it in enumerate(items)
    ]
    return [(o.logprobs, *_lists(o.top_ids, o.top_logprobs)) for o in out]


def _lists(ids, lps):
    """The top-k tensors as lists (None stays None), after checking their types."""
    if ids is None:
        assert lps is None
        return None, None
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32
    assert ids.dim() == 2 and ids.shape == lps.shape
    return ids.tolist(), lps.tolist()


def fast_check(data, seqs, sent_start, starts, top_k=0):
    """The same triples by the fast path, or None."""
    got = fast_scored(data, seqs, sent_start, starts, top_k)
    if got is None:
        return None
    _, logprobs, tops = got
    return [
        (lp, *_lists(*(top if tops else (None, None))))
        for lp, top in zip(logprobs, tops or logprobs)
    ]


def test_fast_path_agrees_with_the_entry_by_entry_check():
    """The same log-probs (and top-k rows) as the full check, on SGLang's layout; other
    layouts (spaces, newlines) are decoded right or left to the full path."""
    rng = random.Random(0)
    for sent_start in (0, 3):
        for top_k in (0, 1, 5):
            seqs = [[rng.randrange(200_000) for _ in range(rng.randint(8, 40))] for _ in range(5)]
            starts = [rng.randint(sent_start + 1, len(s)) for s in seqs]
            items = scoring_answer(seqs, sent_start, top_k, weight_version="w", e2e_latency=0.1)
            want = full_check(items, seqs, sent_start, starts, top_k)
            got = fast_scored(orjson.dumps(items), seqs, sent_start, starts, top_k)
            assert got is not None, (sent_start, top_k)
            assert fast_check(orjson.dumps(items), seqs, sent_start, starts, top_k) == want
            assert [it["meta_info"]["weight_version"] for it in got[0]] == ["w"] * 5
            if top_k:
                assert all(len(row) == top_k for _, ids, _ in want for row in ids)
            for text in (json.dumps(items), json.dumps(items, indent=2)):
                fast = fast_check(text.encode(), seqs, sent_start, starts, top_k)
                assert fast is None or fast == want


def test_top_k_arrays_before_the_token_arrays():
    """The cut does not assume an order of the two keys within an item."""
    seqs = [[4 + (5 * i + j) % 90 for i in range(10)] for j in range(3)]
    items = scoring_answer(seqs, 0, 3)
    for it in items:
        meta = it["meta_info"]
        it["meta_info"] = {"input_top_logprobs": meta.pop("input_top_logprobs"), **meta}
    want = full_check(items, seqs, 0, [1, 1, 1], 3)
    assert fast_check(orjson.dumps(items), seqs, 0, [1, 1, 1], 3) == want


def _bad_answers(seqs, top_k=0):
    """(name, answer bytes) pairs, each wrong in one way the fast path must not accept."""

    def mutated(fn, key="input_token_logprobs"):
        items = scoring_answer(seqs, 0, top_k)
        fn([it["meta_info"][key] for it in items], items)
        return orjson.dumps(items)

    def at(j, k, f, v):
        def fn(entries, items):
            entries[j][k][f] = v

        return fn

    nan_literal = json.dumps(scoring_answer(seqs, 0, top_k)).replace("-0.03,", "NaN,", 1)
    bad = [
        ("null value", mutated(at(1, 3, 0, None))),
        ("positive", mutated(at(2, 5, 0, 0.5))),
        ("string value", mutated(at(0, 2, 0, "x"))),
        ("wrong id", mutated(at(1, 4, 1, 7))),
        ("no leading null", mutated(at(2, 0, 0, -1.0))),
        ("text with brackets", mutated(at(0, 3, 2, "]],[["))),
        ("dropped entry", mutated(lambda e, it: e[1].pop())),
        ("extra entry", mutated(lambda e, it: e[2].append([-0.5, 9, None]))),
        ("short entry", mutated(lambda e, it: e[1][2].pop())),
        ("long entry", mutated(lambda e, it: e[1][2].append(None))),
        ("missing item", mutated(lambda e, it: it.pop())),
        ("no logprobs", mutated(lambda e, it: it[1]["meta_info"].pop("input_token_logprobs"))),
        ("NaN literal", nan_literal.encode()),
        ("inf as null (orjson)", mutated(at(0, 4, 0, float("inf")))),
    ]
    if not top_k:
        return bad

    def top(j, row, e, f, v):
        def fn(tops, items):
            tops[j][row][e][f] = v

        return fn

    def ragged(tops, items):  # one row short, the next long: same total
        tops[1][3].append(tops[1][2].pop())

    return bad + [
        ("top: null value", mutated(top(0, 2, 1, 0, None), "input_top_logprobs")),
        ("top: positive", mutated(top(1, 4, 0, 0, 0.25), "input_top_logprobs")),
        ("top: inf", mutated(top(2, 1, 2, 0, float("inf")), "input_top_logprobs")),
        ("top: float id", mutated(top(0, 5, 0, 1, 3.0), "input_top_logprobs")),
        ("top: bool id", mutated(top(0, 5, 0, 1, True), "input_top_logprobs")),
        ("top: text", mutated(top(1, 1, 1, 2, "a"), "input_top_logprobs")),
        ("top: ragged rows", mutated(ragged, "input_top_logprobs")),
        ("top: short row", mutated(lambda t, it: t[0][3].pop(), "input_top_logprobs")),
        ("top: missing row", mutated(lambda t, it: t[2].pop(), "input_top_logprobs")),
        ("top: no leading null", mutated(lambda t, it: t[1].pop(0), "input_top_logprobs")),
        ("top: missing", mutated(lambda t, it: it[0]["meta_info"].pop("input_top_logprobs"))),
    ]


def test_fast_path_refuses_what_is_wrong():
    """Every malformed answer leaves the fast path (None); a key-like string in another
    field does not confuse the cut."""
    seqs = [[4 + (3 * i + j) % 90 for i in range(12)] for j in range(3)]
    starts = [1, 1, 1]
    for top_k in (0, 4):
        for name, data in _bad_answers(seqs, top_k):
            assert fast_scored(data, seqs, 0, starts, top_k) is None, (top_k, name)
        items = scoring_answer(seqs, 0, top_k)
        items[0]["text"] = '"input_token_logprobs":[[1,2,3]] "input_top_logprobs":[null,[[1]]]'
        items[1]["meta_info"]["note"] = 'x"input_token_logprobs":[[null]]'
        fast = fast_check(orjson.dumps(items), seqs, 0, starts, top_k)
        assert fast is None or fast == full_check(items, seqs, 0, starts, top_k)


def test_top_k_ids_and_values_outside_the_tensor_types():
    """An id outside [0, 2**63) or a value past float32's range leaves the fast path, and
    the entry-by-entry check names the token, not a raw conversion error."""
    import pytest

    from megatron_mopd.errors import TeacherError

    seqs = [[4 + (3 * i + j) % 90 for i in range(12)] for j in range(2)]
    for field, value, message in (
        (1, 2**63, "bad top token id"),
        (1, -3, "bad top token id"),
        (0, -1e300, "top log-prob out of range"),
    ):
        items = scoring_answer(seqs, 0, 3)
        items[1]["meta_info"]["input_top_logprobs"][4][2][field] = value
        data = orjson.dumps(items)
        assert fast_scored(data, seqs, 0, [1, 1], 3) is None, value
        with pytest.raises(TeacherError, match=f"u: l, sequence 1: token 4: {message}"):
            full_check(items, seqs, 0, [1, 1], 3)
