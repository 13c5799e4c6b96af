"""An SGLang-compatible HTTP server on CPU: the subset of SGLang's API this project uses.

    server = SGLangCompatibleServer("/path/to/hf_dir", host="127.0.0.1", port=30000)
    server.start()            # binds, then loads the model in the background
    ...                       # /health and /health_generate answer 503 until it is loaded
    server.shutdown()

`mopd serve --hf HF_DIR --port P` runs it in the foreground (see `commands/serve.py`).
The contract is /work/shared/SGLANG_API.md (sglang 0.5.23); endpoints:

| endpoint | behaviour |
| --- | --- |
| `POST /generate` | scoring (`max_new_tokens: 0`) and sampling; one request or a batch |
| `GET /health`, `GET /health_generate` | 200 when ready (the latter runs a 1-token generation), 503 while loading |
| `GET /model_info` (`/get_model_info`, `/server_info`) | `model_path`, `tokenizer_path`, `is_generation`, `weight_version`, ... |
| `POST /update_weights_from_disk` | `{model_path, weight_version?}` -> `{success, message, num_paused_requests}` |
| `GET/POST /flush_cache` | 200 (there is no prefix cache to flush) |

`/generate` request fields: `input_ids` (list, or list of lists for a batch) or `text`;
`sampling_params` (one object shared by the batch, or one per item) with `max_new_tokens`
(default 128), `temperature`, `top_p`, `top_k`, `stop`, `stop_token_ids`, `ignore_eos`,
`sampling_seed`, `skip_special_tokens`, `no_stop_trim`; `return_logprob`,
`logprob_start_len` (default -1: output tokens only), `top_logprobs_num`,
`return_text_in_logprobs`, `rid`. Response per item: `{"text", "output_ids", "meta_info"}`
with `meta_info` = `id`, `finish_reason` (`{"type": "length", "length": n}` or
`{"type": "stop", "matched": id_or_str}`), `prompt_tokens`, `completion_tokens`,
`cached_tokens` (always 0), `weight_version`, and with `return_logprob`:
`input_token_logprobs` (`[logprob, token_id, text]` from `logprob_start_len` on, the
first logprob `null` as SGLang does), `output_token_logprobs`, and with
`top_logprobs_num > 0` `input_top_logprobs` / `output_top_logprobs` (first position
`null`; output top-k are rescored by a prefill at temperature 1, where SGLang gives
them at the sampling temperature: the same at temperature 1, which MOPD samples at). Features the project does not use (streaming, `token_ids_logprob`,
penalties, `min_p`, grammars, `n > 1`, LoRA, images) get a 400 naming the field rather
than being silently ignored. Errors: 400 `{"error": {"message": ...}}`.

Batching: handler threads put parsed requests on a queue; one worker thread collects
what arrives within `batch_wait_ms` (up to `max_batch_tokens` tokens), runs all scoring
items in one `HFEngine.score` call and all sampling items in one `HFEngine.generate`
call, and wakes the handlers. Concurrent clients therefore share forward passes.

Built on the standard library's `ThreadingHTTPServer` (HTTP/1.1, keep-alive) rather than
FastAPI/uvicorn: the project needs no ASGI stack, and the per-request cost is small next
to a forward pass. Fault injection for tests lives in the tests (a flaky proxy), not here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_mopd.sglang_client import gc_paused
from megatron_mopd.types import SamplingParams

log = logging.getLogger("megatron_mopd.server")

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


@dataclass
class Job:
    """The items of one HTTP request, waiting for the batcher."""

    items: list[Item]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def tokens(self) -> int:
        return sum(len(it.input_ids) + it.sampling.max_new_tokens for it in self.items)


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
# the batcher


class Batcher:
    """Runs concurrent /generate jobs together as one engine batch.

    Handlers announce themselves with `admitted()` as soon as a request arrives (before
    parsing it). After taking a job, the worker waits up to `batch_wait_ms` for more
    only while other admitted requests have not reached the queue yet, so a lone request
    runs at once and concurrent ones share a forward pass.
    """

    def __init__(self, engine, batch_wait_ms: float = 5.0, max_batch_tokens: int = 16384):
        self.engine = engine
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="mopd-batcher", daemon=True)
        self._thread.start()

    def run(self, items: list[Item], timeout: float | None = None) -> None:
        """Run `items` in the next batch; fills `item.result`. Re-raises engine errors."""
        job = Job(items)
        self._queue.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("the batch did not finish in time")
        if job.error is not None:
            raise job.error

    @contextlib.contextmanager
    def admitted(self):
        """Count a request from its arrival until its answer is ready."""
        with self._admitted_lock:
            self._admitted += 1
        try:
            yield
        finally:
            with self._admitted_lock:
                self._admitted -= 1

    def stop(self) -> None:
        """Finish the current batch and stop the worker thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, tokens = [job], job.tokens
            deadline = time.monotonic() + self.batch_wait
            stop = False
            while tokens < self.max_batch_tokens:
                if self._admitted <= len(jobs) and self._queue.empty():
                    break  # nobody else is on the way
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                tokens += nxt.tokens
            self._execute(jobs)
            if stop:
                return

    def _execute(self, jobs: list[Job]) -> None:
        try:
            items = [it for job in jobs for it in job.items]
            run_batch(self.engine, items)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting handler
            log.exception("batch of %d requests failed", len(jobs))
            for job in jobs:
                job.error = e
        for job in jobs:
            job.done.set()


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
                top_v = [None] + [v[:k] for v in score.top_logprobs[1:]]
                top_i = [None] + [v[:k] for v in score.top_ids[1:]]
                meta["input_top_logprobs"] = _top(engine, top_v, top_i, text)
            else:
                meta["input_top_logprobs"] = []
            if top is not None and output_ids:
                meta["output_top_logprobs"] = _top(
                    engine,
                    [v[:k] for v in top.top_logprobs],
                    [v[:k] for v in top.top_ids],
                    text,
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


# --------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        if self.server.app.verbose:
            log.info("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        batcher = app.batcher if path == "/generate" else None
        try:
            # admitted before the body is read, so the batcher knows it is coming
            with batcher.admitted() if batcher is not None else contextlib.nullcontext():
                body = self._read_body() if method == "POST" else None
                status, payload = app.handle(method, path, body)
        except BadRequest as e:
            status, payload = 400, {"error": {"message": str(e), "code": 400}}
        except Exception as e:  # noqa: BLE001 - a bug must still answer the client
            log.exception("error on %s %s", method, path)
            status, payload = 500, {"error": {"message": f"internal error: {e}", "code": 500}}
        self._send(status, payload)

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            with gc_paused():
                return _loads(raw)
        except ValueError as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None

    def _send(self, status: int, payload: Any) -> None:
        if isinstance(payload, str | bytes):
            data = payload.encode() if isinstance(payload, str) else payload
            ctype = "text/plain; charset=utf-8"
        else:
            data = _dumps(payload)
            ctype = "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: SGLangCompatibleServer


def _loads(raw: bytes) -> Any:
    try:
        import orjson

        return orjson.loads(raw)
    except ImportError:  # pragma: no cover - orjson is normally present
        return json.loads(raw)


def _dumps(payload: Any) -> bytes:
    try:
        import orjson

        return orjson.dumps(payload)
    except ImportError:  # pragma: no cover - orjson is normally present
        return json.dumps(payload).encode()


class SGLangCompatibleServer:
    """The HTTP front of an `HFEngine` (see the module docstring)."""

    def __init__(
        self,
        hf_dir: str,
        host: str = "127.0.0.1",
        port: int = 30000,
        dtype: str = "float32",
        weight_version: str = "default",
        seed: int | None = None,
        batch_wait_ms: float = 5.0,
        max_batch_tokens: int = 16384,
        return_original_logprob: bool = False,
        verbose: bool = False,
        engine=None,
    ) -> None:
        self.hf_dir = hf_dir
        self.verbose = verbose
        self._engine_kwargs = dict(
            dtype=dtype,
            weight_version=weight_version,
            seed=seed,
            max_batch_tokens=max_batch_tokens,
            return_original_logprob=return_original_logprob,
        )
        self.batch_wait_ms = batch_wait_ms
        self.max_batch_tokens = max_batch_tokens
        self.engine = engine
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        self._ready = threading.Event()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.app = self
        self._serve_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The base URL clients use."""
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def load(self) -> None:
        """Load the engine (unless one was given) and start the batcher."""
        try:
            if self.engine is None:
                from megatron_mopd.hf_engine import HFEngine

                self.engine = HFEngine(self.hf_dir, **self._engine_kwargs)
            self.batcher = Batcher(self.engine, self.batch_wait_ms, self.max_batch_tokens)
            self._ready.set()
            log.info("model %s loaded; serving on %s", self.hf_dir, self.url)
        except BaseException as e:
            self.load_error = e
            log.exception("cannot load %s", self.hf_dir)
            raise

    def start(self, background_load: bool = True) -> None:
        """Serve in a background thread; load the model in another (503 until loaded)."""
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, name="mopd-http", daemon=True
        )
        self._serve_thread.start()
        if background_load:
            threading.Thread(target=self._load_quietly, name="mopd-load", daemon=True).start()
        else:
            self.load()

    def _load_quietly(self) -> None:
        try:
            self.load()
        except BaseException:  # noqa: BLE001 - recorded in load_error, reported by /health
            pass

    def serve_forever(self) -> None:
        """Serve in this thread until `shutdown()` is called from another."""
        self._httpd.serve_forever()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (False on timeout)."""
        return self._ready.wait(timeout)

    def shutdown(self) -> None:
        """Stop accepting requests, finish the running batch, close the socket."""
        self._httpd.shutdown()
        if self.batcher is not None:
            self.batcher.stop()
        self._httpd.server_close()

    # ---------------------------------------------------------------- routes

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Answer one request: (status, JSON payload or text)."""
        route = _ROUTES.get(path)
        if route is None:
            return 404, {"error": {"message": f"{method} {path}: no such endpoint", "code": 404}}
        methods, name = route
        if method not in methods:
            return 405, {"error": {"message": f"{path} does not accept {method}", "code": 405}}
        if name not in ("health", "model_info") and not self._ready.is_set():
            return 503, {"error": {"message": "the model is still loading", "code": 503}}
        return getattr(self, f"_route_{name}")(body)

    def _route_health(self, body: Any) -> tuple[int, Any]:
        if self.load_error is not None:
            return 503, {"error": {"message": f"model failed to load: {self.load_error}"}}
        return (200, "") if self._ready.is_set() else (503, "")

    def _route_health_generate(self, body: Any) -> tuple[int, Any]:
        item = Item(
            input_ids=[0],
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
            stop_strs=[],
            ignore_eos=True,
            return_logprob=False,
            logprob_start_len=1,
            top_logprobs_num=0,
            return_text=False,
            rid="health_generate",
        )
        try:
            with self.batcher.admitted():
                self.batcher.run([item], timeout=60)
        except Exception as e:  # noqa: BLE001 - unhealthy, not a crash
            return 503, {"error": {"message": f"health generation failed: {e}"}}
        return 200, ""

    def _route_model_info(self, body: Any) -> tuple[int, Any]:
        engine = self.engine
        return 200, {
            "model_path": engine.model_path if engine else self.hf_dir,
            "served_model_name": engine.model_path if engine else self.hf_dir,
            "tokenizer_path": engine.model_path if engine else self.hf_dir,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version if engine else None,
            "load_format": "auto",
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    def _route_generate(self, body: Any) -> tuple[int, Any]:
        items, is_batch = parse_generate(body, self.engine.vocab_size, self.engine.tokenizer)
        try:
            self.batcher.run(items)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        results = [it.result for it in items]
        return 200, results if is_batch else results[0]

    def _route_update_weights_from_disk(self, body: Any) -> tuple[int, Any]:
        path = body.get("model_path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise BadRequest("'model_path' (an HF folder) is required")
        version = body.get("weight_version")
        fmt = body.get("load_format")
        if fmt not in (None, "auto", "safetensors"):
            return 400, _update_reply(False, f"load_format={fmt!r} is not supported here")
        try:
            self.engine.load_weights_from_disk(path, weight_version=version)
        except (OSError, ValueError) as e:
            return 400, _update_reply(False, f"Failed to update weights: {e}")
        self.hf_dir = path
        return 200, _update_reply(True, "Succeeded to update model weights.")

    def _route_flush_cache(self, body: Any) -> tuple[int, Any]:
        return 200, "Cache flushed.\n"


def _update_reply(success: bool, message: str) -> dict:
    return {"success": success, "message": message, "num_paused_requests": 0}


_ROUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "/health": (("GET",), "health"),
    "/health_generate": (("GET",), "health_generate"),
    "/model_info": (("GET",), "model_info"),
    "/get_model_info": (("GET",), "model_info"),
    "/server_info": (("GET",), "model_info"),
    "/get_server_info": (("GET",), "model_info"),
    "/generate": (("POST",), "generate"),
    "/update_weights_from_disk": (("POST",), "update_weights_from_disk"),
    "/flush_cache": (("GET", "POST"), "flush_cache"),
}
