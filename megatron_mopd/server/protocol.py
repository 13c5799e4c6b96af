"""What SGLang's `/generate` means, for our server (`server/app.py`): parsing a request into
items, running items on an `HFEngine`, and building SGLang-shaped answers.

Field names, defaults and answer shapes follow sglang 0.5.23 (its source:
`srt/managers/io_struct.py`, `srt/sampling/sampling_params.py`,
`srt/managers/scheduler_components/logprob_result_processor.py`). See `server/app.py`'s
docstring for the list of supported fields.
"""

from __future__ import annotations

import base64
import math
import uuid
from dataclasses import dataclass
from typing import Any

from megatron_mopd.sglang.client import gc_paused
from megatron_mopd.types import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default (srt/sampling/sampling_params.py)

# sampling_params keys that change results and that this server does not implement,
# with the value that means "off"
_UNSUPPORTED_SAMPLING = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "n": 1,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "stop_regex": None,
    "beam_width": None,
}
_IGNORED_SAMPLING = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_SUPPORTED_SAMPLING = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "sampling_seed",
    "stream_interval",
    "custom_params",
}
# top-level /generate keys that change results and are not implemented ("off" value)
_UNSUPPORTED_TOP = {
    "stream": False,
    "token_ids_logprob": None,
    "lora_path": None,
    "image_data": None,
    "audio_data": None,
    "video_data": None,
    "input_embeds": None,
    "return_hidden_states": False,
}


class BadRequest(ValueError):
    """A malformed request: answered with 400 and this message."""


# --------------------------------------------------------------------------------------
# request parsing


@dataclass
class Item:
    """One sequence of a /generate request, parsed and checked."""

    input_ids: list[int]
    sampling: SamplingParams
    stop_strs: list[str]
    ignore_eos: bool
    return_logprob: bool
    logprob_start_len: int  # resolved: len(input_ids) when -1
    top_logprobs_num: int
    return_text: bool
    rid: str
    result: dict | None = None
    return_routed_experts: bool = False  # SGLang's top-level field (routing replay, R3)


def parse_generate(body: Any, vocab_size: int, tokenizer=None) -> tuple[list[Item], bool]:
    """Parse a /generate body into items; returns (items, is_batch). Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key, off in _UNSUPPORTED_TOP.items():
        if body.get(key, off) not in (off, None):
            raise BadRequest(f"{key!r} is not supported by this server (mopd serve)")
    ids = body.get("input_ids")
    text = body.get("text")
    if (ids is None) == (text is None):
        raise BadRequest("give exactly one of 'input_ids' and 'text'")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise BadRequest("'input_ids' must be a non-empty list of token ids or of lists")
        is_batch = isinstance(ids[0], list)
        seqs = ids if is_batch else [ids]
    else:
        if tokenizer is None:
            raise BadRequest("'text' needs a tokenizer; this model folder has none: send input_ids")
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'text' must be a string or a non-empty list of strings")
        seqs = [tokenizer.encode(t) for t in texts]
    n = len(seqs)
    for i, seq in enumerate(seqs):
        where = f"input_ids[{i}]" if is_batch else "input_ids"
        if not isinstance(seq, list) or not seq:
            raise BadRequest(f"{where} must be a non-empty list of token ids")
        for t in seq:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise BadRequest(f"{where}: token id {t!r} is not an integer in [0, {vocab_size})")

    sps = _per_item(body.get("sampling_params"), n, "sampling_params", dict, {})
    return_logprob = _per_item(body.get("return_logprob"), n, "return_logprob", bool, False)
    starts = _per_item(body.get("logprob_start_len"), n, "logprob_start_len", int, -1)
    topk = _per_item(body.get("top_logprobs_num"), n, "top_logprobs_num", int, 0)
    rids = _per_item(body.get("rid"), n, "rid", str, None)
    return_text = bool(body.get("return_text_in_logprobs") or False)

    items = []
    for i in range(n):
        sampling, stop_strs, ignore_eos = _parse_sampling(sps[i], i if is_batch else None)
        if stop_strs and tokenizer is None:
            raise BadRequest("'stop' strings need a tokenizer; this model folder has none")
        length = len(seqs[i])
        start = starts[i]
        if start == -1 or not return_logprob[i]:
            start = length
        if not 0 <= start <= length:
            raise BadRequest(
                f"logprob_start_len={starts[i]} is outside [-1, {length}] for an input of "
                f"{length} tokens"
            )
        if topk[i] < 0:
            raise BadRequest(f"top_logprobs_num={topk[i]} must be >= 0")
        items.append(
            Item(
                input_ids=list(seqs[i]),
                sampling=sampling,
                stop_strs=stop_strs,
                ignore_eos=ignore_eos,
                return_logprob=return_logprob[i],
                logprob_start_len=start,
                top_logprobs_num=min(topk[i], vocab_size),
                return_text=return_text,
                rid=rids[i] or uuid.uuid4().hex,
                return_routed_experts=bool(body.get("return_routed_experts") or False),
            )
        )
    return items, is_batch


def _per_item(value: Any, n: int, name: str, kind: type, default: Any) -> list:
    """A field given once for the whole batch or once per item, as a list of n values."""
    if value is None:
        return [default] * n
    if isinstance(value, list) and kind is not list:
        if len(value) != n:
            raise BadRequest(f"{name!r} has {len(value)} entries for a batch of {n}")
        values = value
    else:
        values = [value] * n
    out = []
    for v in values:
        if v is None:
            v = default
        elif kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise BadRequest(f"{name!r} must be an integer, got {v!r}")
        elif kind is bool and not isinstance(v, bool):
            raise BadRequest(f"{name!r} must be true or false, got {v!r}")
        elif kind in (dict, str) and not isinstance(v, kind):
            raise BadRequest(f"{name!r} must be a {kind.__name__}, got {v!r}")
        out.append(v)
    return out


def _parse_sampling(sp: dict, index: int | None) -> tuple[SamplingParams, list[str], bool]:
    where = "sampling_params" if index is None else f"sampling_params[{index}]"
    for key, value in sp.items():
        if key in _UNSUPPORTED_SAMPLING:
            if value not in (_UNSUPPORTED_SAMPLING[key], None):
                raise BadRequest(f"{where}.{key}={value!r} is not supported by this server")
        elif key not in _SUPPORTED_SAMPLING and key not in _IGNORED_SAMPLING:
            raise BadRequest(f"{where}: unknown key {key!r}")

    def num(key: str, default: float) -> float:
        v = sp.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadRequest(f"{where}.{key}={v!r} must be a finite number")
        return float(v)

    def integer(key: str, default: int | None) -> int | None:
        v = sp.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadRequest(f"{where}.{key}={v!r} must be an integer")
        return v

    max_new = integer("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    temperature = num("temperature", 1.0)
    top_p = num("top_p", 1.0)
    top_k = integer("top_k", -1)
    if max_new < 0:
        raise BadRequest(f"{where}.max_new_tokens={max_new} must be at least 0")
    if temperature < 0:
        raise BadRequest(f"{where}.temperature={temperature} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"{where}.top_p={top_p} must be in (0, 1]")
    if top_k != -1 and top_k < 1:
        raise BadRequest(f"{where}.top_k={top_k} must be -1 (disable) or at least 1")
    stop = sp.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"{where}.stop must be a string or a list of strings")
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise BadRequest(f"{where}.stop_token_ids must be a list of token ids")
    ignore_eos = sp.get("ignore_eos") or False
    if not isinstance(ignore_eos, bool):
        raise BadRequest(f"{where}.ignore_eos must be true or false")
    sampling = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=list(stop_ids),
        seed=integer("sampling_seed", None),
    )
    return sampling, stop, ignore_eos


# --------------------------------------------------------------------------------------
# running items


def run_batch(engine, items: list[Item]) -> None:
    """Score and sample a list of items with one engine call each; fills `item.result`."""
    scored = [it for it in items if it.return_logprob and it.logprob_start_len < len(it.input_ids)]
    sampled = [it for it in items if it.sampling.max_new_tokens > 0]
    scores = {}
    if scored:
        top_k = max(it.top_logprobs_num for it in scored)
        outs = engine.score(
            [it.input_ids for it in scored], [it.logprob_start_len for it in scored], top_k
        )
        scores = {id(it): out for it, out in zip(scored, outs)}
    gens: dict = {}
    tops: dict = {}
    if sampled:
        outs = engine.generate(
            [it.input_ids for it in sampled],
            [it.sampling for it in sampled],
            stop_strs=[it.stop_strs for it in sampled],
            ignore_eos=[it.ignore_eos for it in sampled],
            return_routed_experts=any(it.return_routed_experts for it in sampled),
        )
        gens = {id(it): out for it, out in zip(sampled, outs)}
        if any(it.top_logprobs_num for it in sampled):
            # top-k of each sampled position: rescore prompt + output in one prefill
            full = [it.input_ids + gens[id(it)].output_ids for it in sampled]
            outs = engine.score(
                full,
                [len(it.input_ids) for it in sampled],
                max(it.top_logprobs_num for it in sampled),
            )
            tops = {id(it): out for it, out in zip(sampled, outs)}
    version = engine.weight_version
    with gc_paused():
        for it in items:
            it.result = _response(
                engine, it, scores.get(id(it)), gens.get(id(it)), tops.get(id(it)), version
            )


def _response(engine, it: Item, score, gen, top, version: str) -> dict:
    """The SGLang-shaped response object of one item."""
    text = it.return_text
    output_ids = list(gen.output_ids) if gen is not None else []
    if gen is None or gen.finish_reason == "length":
        finish = {"type": "length", "length": len(output_ids)}
    else:
        finish = {"type": "stop", "matched": gen.matched}
    meta: dict[str, Any] = {
        "id": it.rid,
        "finish_reason": finish,
        "prompt_tokens": len(it.input_ids),
        "completion_tokens": len(output_ids),
        "cached_tokens": 0,
        "weight_version": version,
    }
    if it.return_routed_experts and gen is not None and gen.routed_experts is not None:
        # SGLang's encoding: base64 of int32 [prompt + output - 1, layers, top_k]
        meta["routed_experts"] = base64.b64encode(gen.routed_experts.numpy().tobytes()).decode()
    if it.return_logprob:
        k = it.top_logprobs_num
        start = it.logprob_start_len
        in_ids = it.input_ids[start:]
        if in_ids:
            vals = list(score.logprobs)
            vals[0] = None  # SGLang: the first entry is null whatever the start
            meta["input_token_logprobs"] = _triples(engine, vals, in_ids, text)
        else:
            meta["input_token_logprobs"] = []
        out_vals = list(gen.logprobs) if gen is not None else []
        meta["output_token_logprobs"] = _triples(engine, out_vals, output_ids, text)
        if k:
            if in_ids:
                # the engine's rows start at position max(start, 1); SGLang nulls the
                # first entry whatever the start, so a start > 0 drops its first row
                skip = 1 if start > 0 else 0
                top_v = [None] + score.top_logprobs[skip:, :k].tolist()
                top_i = [None] + score.top_ids[skip:, :k].tolist()
                meta["input_top_logprobs"] = _top(engine, top_v, top_i, text)
            else:
                meta["input_top_logprobs"] = []
            if top is not None and output_ids:
                meta["output_top_logprobs"] = _top(
                    engine, top.top_logprobs[:, :k].tolist(), top.top_ids[:, :k].tolist(), text
                )
            else:
                meta["output_top_logprobs"] = []
    return {"text": engine.decode(output_ids), "output_ids": output_ids, "meta_info": meta}


def _triples(engine, vals: list, ids: list[int], text: bool) -> list[list]:
    if text:
        return [[v, t, engine.decode([t], skip_special_tokens=False)] for v, t in zip(vals, ids)]
    return [[v, t, None] for v, t in zip(vals, ids)]


def _top(engine, vals: list, ids: list, text: bool) -> list:
    return [None if v is None else _triples(engine, v, i, text) for v, i in zip(vals, ids)]
