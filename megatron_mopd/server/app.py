"""An SGLang-compatible HTTP server on CPU: the subset of SGLang's API this project uses.

Not the reference: the SGLang paths are tested against real SGLang 0.5.23 (`make sglang`,
`tests/test_real_*.py`). This server is kept for what the real one cannot do here:
fault-injection tests that need a server started, killed or restarted within a test
(a real start costs 20-50 s of CPU on these machines; this one starts in-process in
under a second), the many client tests behind a misbehaving proxy, and machines without
SGLang. Where it differs from SGLang 0.5.23, knowingly: `/health` answers at once
(SGLang's runs a one-token generation, >= ~1 s); `sampling_seed` is always honoured
(SGLang: only with `--enable-deterministic-inference`); there is no weight-update session
(`/begin_weight_update`), no tensor or distributed update, no prefix cache, no abort, and
no API key; input ids are reported as sent (SGLang reports ids >= vocab_size - 1 as 0).

    server = SGLangCompatibleServer("/path/to/hf_dir", host="127.0.0.1", port=30000)
    server.start()            # binds, then loads the model in the background
    ...                       # /health and /health_generate answer 503 until it is loaded
    server.shutdown()

`mopd serve --hf HF_DIR --port P` runs it in the foreground (see `commands/serve.py`).
The contract is SGLang 0.5.23's HTTP API; endpoints:

| endpoint | behaviour |
| --- | --- |
| `POST /generate` | scoring (`max_new_tokens: 0`) and sampling; one request or a batch |
| `GET /health`, `GET /health_generate` | 200 when ready (the latter runs a 1-token generation; SGLang's `/health` does too), 503 while loading |
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
them at the sampling temperature: the same at temperature 1, which MOPD samples at).
`return_routed_experts: true` (MoE models) adds `meta_info.routed_experts` as SGLang 0.5.23
encodes it (`--enable-return-routed-experts`): base64 of int32 `[prompt + output - 1,
layers, top_k]`, the experts the engine routed each fed token to (routing replay, R3).
Features the project does not use (streaming, `token_ids_logprob`, penalties, `min_p`,
grammars, `n > 1`, LoRA, images) get a 400 naming the field rather than being silently
ignored. Errors: 400 `{"error": {"message": ...}}`; a body over `max_body_bytes`
(`--max-body-bytes`, default 64 MiB) is 413 without being read, a chunked body 411, a
bad or short `Content-Length` 400, each answered with `Connection: close`. Parsing and
answer building live in `protocol.py`; this module holds the HTTP server and the batcher.

Batching: handler threads put parsed requests on a queue; one worker thread takes what
is there, waits up to `batch_wait_ms` only while more admitted requests are on their
way (a lone request runs at once), runs all scoring items in one `HFEngine.score` call
and all sampling items in one `HFEngine.generate` call (up to `max_batch_tokens` padded
tokens per forward), and wakes the handlers. Concurrent clients share forward passes.
Sampling batches are not continuous: a request arriving mid-generation waits for the
running batch to finish.

Built on the standard library's `ThreadingHTTPServer` (HTTP/1.1, keep-alive) rather than
FastAPI/uvicorn: the project needs no ASGI stack, and the per-request cost is small next
to a forward pass. Fault injection for tests lives in the tests (a flaky proxy), not here.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_mopd.server.protocol import BadRequest, Item, parse_generate, run_batch
from megatron_mopd.sglang.client import gc_paused
from megatron_mopd.sglang.http_pool import dumps_json, loads_json
from megatron_mopd.types import SamplingParams

log = logging.getLogger("megatron_mopd.server.app")
# the largest request body accepted (413 above it): a scoring batch of 64 sequences of
# 32k tokens is ~15 MiB of JSON
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class Job:
    """The items of one HTTP request, waiting for the batcher."""

    items: list[Item]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def tokens(self) -> int:
        return sum(len(it.input_ids) + it.sampling.max_new_tokens for it in self.items)


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


# --------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without TCP_NODELAY the body waits ~40 ms
        # for the client's delayed ACK (Nagle), as SGLang's server (uvicorn) does not
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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
        except _RefusedBody as e:
            # the body was not read: the connection cannot carry another request
            self.close_connection = True
            status, payload = e.status, {"error": {"message": str(e), "code": e.status}}
        except BadRequest as e:
            status, payload = 400, {"error": {"message": str(e), "code": 400}}
        except Exception as e:  # noqa: BLE001 - a bug must still answer the client
            log.exception("error on %s %s", method, path)
            status, payload = 500, {"error": {"message": f"internal error: {e}", "code": 500}}
        self._send(status, payload)

    def _read_body(self) -> Any:
        limit = self.server.app.max_body_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise _RefusedBody(411, "chunked request bodies are not accepted: send Content-Length")
        declared = (self.headers.get("Content-Length") or "0").strip()
        if not declared.isdigit():
            raise _RefusedBody(400, f"Content-Length {declared[:40]!r} is not a byte count")
        length = int(declared)
        if length > limit:
            raise _RefusedBody(
                413,
                f"the request body has {length} bytes, more than this server accepts "
                f"({limit} bytes, --max-body-bytes)",
            )
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            raise _RefusedBody(400, f"the body ended after {len(raw)} of {length} bytes")
        if not raw:
            return {}
        try:
            with gc_paused():
                return loads_json(raw)
        except ValueError as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None

    def _send(self, status: int, payload: Any) -> None:
        if isinstance(payload, str | bytes):
            data = payload.encode() if isinstance(payload, str) else payload
            ctype = "text/plain; charset=utf-8"
        else:
            data = dumps_json(payload)
            ctype = "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _RefusedBody(Exception):
    """A request body refused before (or while) reading it: answered with `status`, then
    the connection is closed (what is left of the body is never read)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: SGLangCompatibleServer


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
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.hf_dir = hf_dir
        self.max_body_bytes = max_body_bytes
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
                from megatron_mopd.rollout.hf_engine import HFEngine

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
            # sampling_seed is always applied here (SGLang: only with this server flag)
            "enable_deterministic_inference": True,
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
