"""The low-level HTTP client of SGLang servers (or of one sglang-router in front of them).

    client = SGLangClient(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], name="math")
    client.wait_healthy(timeout=600)                   # polls GET /health_generate
    scored = client.score([[1, 5, 9, 7]], starts=[1])  # log p(token i | before) for i >= 1
    scored[0].logprobs                                  # 3 floats
    outs = client.generate([[1, 5]], {"max_new_tokens": 8, "temperature": 1.0})
    client.post_all("/update_weights_from_disk", {"model_path": d})   # every URL

The contract is SGLang 0.5.23's HTTP API, and the client is tested against SGLang itself
(`tests/test_real_sglang.py`). Scoring posts batches of
`batch_size` sequences as one prefill-only `/generate` request
(`sampling_params.max_new_tokens = 0`, `return_logprob`, `top_logprobs_num`, and
`logprob_start_len = s - 1` with `s` the earliest start of the batch: sglang-router 0.3.2
accepts only one value per request, not a list); `meta_info.input_token_logprobs` then
starts with a `null` entry for token `s - 1`, entry `j >= 1` is the log-prob of token
`s - 1 + j`, and each sequence keeps the entries from its own start on.

- With several URLs each request goes to the one with the fewest requests in flight
  (ties round robin); a retry goes to another URL, at once if that server is answering.
  A server that failed to connect, timed out or dropped a request is skipped for a
  cooldown (1 s, doubling while it keeps failing), then probed with `GET /health` before
  it gets work again (`ServerSet`): a dead, hung or slow replica does not slow the
  others. SGLang's `/health` runs a one-token generation (it answers after >= ~1 s, up
  to 20 s when unhealthy), so the probe's timeout is the connect timeout (10 s), not an
  instant. One sglang-router URL works the same way (it spreads the load itself).
- At most `max_in_flight` requests are in flight (a thread pool; HTTP waits release
  the GIL), so scoring is batched *and* concurrent.
- Connections are kept alive and reused (urllib3's pools, one per URL: `http_pool`).
  Each request has a `timeout` (seconds the server may stay silent while the request is
  sent or the answer awaited and read; connecting has its own shorter one). Connection
  errors, dropped connections, timeouts, 5xx, 408 and 429 answers (sglang-router's full
  queue; its `Retry-After` is honoured) and aborted requests (SGLang answers HTTP 200 with
  `finish_reason.type == "abort"`) are retried up to `max_retries` times with exponential
  backoff and jitter; another 4xx answer (a bad request: retrying cannot help) is not.
- `api_key`: sent as `Authorization: Bearer KEY` (servers started with `--api-key`).
- Every answer is checked before use: one object per sequence, the leading `null`, one
  `[logprob, token_id, ...]` per token with the token ids that were sent, and every
  log-prob a finite number <= 0 (no null, NaN, +-inf); SGLang reports input ids >=
  vocab_size - 1 as 0, which is accepted (`fast_answers.ids_match`). A malformed answer is a bug of the
  server and is not retried. Scoring answers in SGLang's compact layout are checked on a
  flat decoding of their log-prob and top-k arrays (`fast_answers.fast_scored`: ~30% less
  client CPU, 3x less with top-k); any other layout, or any doubt, gets the full decoding
  and the entry-by-entry check. JSON has no NaN: SGLang (orjson) writes NaN and inf as
  `null`, other servers may write `NaN`/`Infinity`; both are caught.
- Every failure raises `TeacherError` naming the server URL, the request number and the
  sequence index; callers (`SGLangTeacher`, `SGLangRolloutEngine`) add their own name.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from megatron_mopd.errors import ConfigError, RetryableAnswer, TeacherError
from megatron_mopd.sglang.answers import (
    Generation,
    ScoredSequence,
    check_generation,
    check_scoring_answer,
)
from megatron_mopd.sglang.http_pool import (
    TRANSPORT_ERRORS,
    Answer,
    ConnectionPool,
    decode_answer,
    dumps_json,
    error_text,
    is_timeout,
)

_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic GC while building or reading large JSON answers.

    Decoding one answer creates ~10^5 small lists; in a process holding torch and
    transformers (~10^6 tracked objects) the collections this triggers cost 5-10x the
    decoding itself (measured: 14 ms -> 1 ms for a 240 kB answer). The containers made
    here hold no cycles. Thread-safe: the GC resumes when the last user leaves.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


class _Cancelled(Exception):
    """Another request of the same call failed: stop retrying this one."""


# A 429 (too many requests: sglang-router's queue is full) or 408 is worth asking again;
# every other 4xx is a bad request that retrying cannot fix.
RETRYABLE_4XX = (408, 429)


class ServerSet:
    """The client's server URLs: each request goes to the least busy one, minus those
    cooling down.

    A server whose request failed to connect, timed out or was dropped is skipped for a
    cooldown that doubles with each consecutive failure (`cooldown_seconds` up to 30x
    that); its first success ends it. After a cooldown the server is on probation: the
    client checks `GET /health` (with the short connect timeout) before sending it work,
    so a hung server costs a probe per cooldown, not a request's full timeout. A replica
    that died mid-run thus costs one failed request, not every other one. When every
    server is cooling down, the one whose cooldown ends first is used: nothing waits for a
    cooldown. Thread-safe.
    """

    def __init__(self, urls: list[str], cooldown_seconds: float = 1.0) -> None:
        self.urls = urls
        self.cooldown_seconds = cooldown_seconds
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # url -> monotonic time its cooldown ends
        self._fails: dict[str, int] = {}  # url -> consecutive failures
        self._probed: set[str] = set()  # failed before, answered a probe since
        self._busy: dict[str, int] = {}  # url -> requests in flight

    def acquire(self) -> str:
        """The server for the next request, counted busy until `release`: of those not
        cooling down, the one with the fewest requests in flight, ties in round-robin
        order (so a slower or busier replica gets less, and equal ones alternate)."""
        with self._lock:
            now = time.monotonic()
            start = next(self._rr)
            order = [self.urls[(start + i) % len(self.urls)] for i in range(len(self.urls))]
            ready = [u for u in order if self._until.get(u, 0.0) <= now]
            if ready:
                url = min(ready, key=lambda u: self._busy.get(u, 0))
            else:
                url = min(self.urls, key=lambda u: self._until.get(u, 0.0))
            self._busy[url] = self._busy.get(url, 0) + 1
            return url

    def release(self, url: str) -> None:
        """A request to `url` (from `acquire`) has ended."""
        with self._lock:
            self._busy[url] -= 1

    def any_available(self) -> bool:
        """True if some server is not cooling down."""
        with self._lock:
            now = time.monotonic()
            return any(self._until.get(u, 0.0) <= now for u in self.urls)

    def on_probation(self, url: str) -> bool:
        """True if `url` failed before and has not answered a probe since."""
        with self._lock:
            return url in self._fails and url not in self._probed

    def probed(self, url: str) -> None:
        """`url` answered a probe: send it work again (its failures still count)."""
        with self._lock:
            if url in self._fails:
                self._probed.add(url)

    def failed(self, url: str) -> None:
        """`url` failed to connect, timed out or dropped the connection."""
        with self._lock:
            self._probed.discard(url)
            n = self._fails.get(url, 0) + 1
            self._fails[url] = n
            wait = self.cooldown_seconds * min(2 ** (n - 1), 30)
            self._until[url] = time.monotonic() + wait

    def succeeded(self, url: str) -> None:
        """`url` answered."""
        if url in self._fails:
            with self._lock:
                self._fails.pop(url, None)
                self._until.pop(url, None)
                self._probed.discard(url)


def api_key_from_env(var: str | None, key: str) -> str | None:
    """The API key held by environment variable `var` (config key `key` names it), or None
    when `var` is None. The key itself never sits in a recipe."""
    import os

    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"{key}={var!r}: the environment variable {var} is not set (or empty)")
    return value


class SGLangClient:
    """HTTP client of one or several SGLang(-compatible) servers (see the module doc)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 8.0,
        max_in_flight: int = 16,
        cooldown_seconds: float = 1.0,
        name: str = "sglang",
        api_key: str | None = None,
    ) -> None:
        """`api_key`: sent as `Authorization: Bearer KEY` on every request (servers started
        with SGLang's `--api-key`)."""
        if not urls:
            raise TeacherError(f"{name}: no server URL given")
        self.urls = [u.rstrip("/") for u in urls]
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise TeacherError(f"{name}: server URL {u!r} must start with http:// or https://")
        self.name = name
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_seconds = float(backoff_seconds)
        self.max_backoff_seconds = float(max_backoff_seconds)
        self.max_in_flight = max(1, int(max_in_flight))
        self._servers = ServerSet(self.urls, cooldown_seconds)
        self._probe_timeout = min(connect_timeout, self.timeout)
        self._pool: ThreadPoolExecutor | None = None
        self._http = ConnectionPool(
            self.timeout,
            min(connect_timeout, self.timeout),
            max_idle=self.max_in_flight + 4,
            api_key=api_key,
        )

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close connections and the worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._http.close()

    def __enter__(self) -> SGLangClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        label: str = "request",
        url: str | None = None,
        cancel: threading.Event | None = None,
        parse: Callable[[Answer, str], Any] | None = None,
        refused_ok: bool = False,
    ) -> tuple[Any, str]:
        """Send one request with retries; return (decoded JSON or text, URL that answered).

        Retried: connection errors, timeouts, 5xx, 408 and 429 answers (after the server's
        `Retry-After` when it gives one) and answers whose `parse` raises `RetryableAnswer`.
        Another 4xx raises `TeacherError`, or with `refused_ok` is returned decoded like a
        success (for calls whose refusals the caller reads, e.g. weight updates).

        `url` pins the server (no round robin); otherwise each attempt takes the next URL
        that is not cooling down (`ServerSet`).
        `parse(answer, url)`, if given, turns the successful `Answer` (undecoded) into what
        is returned; it runs with the GC paused, and what it decodes is freed before the GC
        resumes, so its ~10^4 small lists are never traversed by a collection (`gc_paused`).
        """
        content = dumps_json(body) if body is not None else None
        attempts = self.max_retries + 1
        last = ""
        last_url = url or self.urls[0]
        for attempt in range(attempts):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            target = url or self._pick()
            last_url = target
            down = False  # the server did not answer: another one may
            resp = None
            try:
                resp = self._http.send(method, target, path, content)
            except TRANSPORT_ERRORS as e:
                down = True
                if is_timeout(e):
                    last = f"timed out after {self.timeout:g} s"
                else:
                    last = f"connection error ({type(e).__name__}: {e})"
            finally:
                if url is None:
                    self._servers.release(target)
            wait_hint = None  # the server's Retry-After
            if resp is not None:
                self._servers.succeeded(target)
                refused = refused_ok and resp.status < 500 and resp.status not in RETRYABLE_4XX
                if resp.status < 400 or refused:
                    try:
                        with gc_paused():
                            if parse is None:
                                return decode_answer(resp), target
                            return parse(resp, target), target
                    except RetryableAnswer as e:
                        last = str(e)
                else:
                    message = error_text(resp)
                    if resp.status < 500 and resp.status not in RETRYABLE_4XX:
                        raise TeacherError(
                            f"{target}{path}: {label} was refused with HTTP {resp.status}: "
                            f"{message}"
                        )
                    last = f"HTTP {resp.status}: {message}"
                    wait_hint = resp.retry_after
            if down:
                self._servers.failed(target)
            if attempt + 1 < attempts and (url or not down or not self._servers.any_available()):
                # no backoff when the next attempt goes to another, answering server
                delay = min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt)
                delay *= 0.5 + random.random() / 2
                if wait_hint is not None:
                    delay = min(max(delay, wait_hint), self.max_backoff_seconds)
                time.sleep(delay)
        raise TeacherError(
            f"{last_url}{path}: {label} failed after {attempts} attempt(s) "
            f"(max_retries={self.max_retries}); last error: {last}"
        )

    def _pick(self) -> str:
        """The next server to send work to (`ServerSet.acquire`); one on probation must first
        answer `GET /health` within the connect timeout, else it cools down again and the
        next server is tried. (With one server there is nothing to spare it for.)"""
        for _ in range(len(self.urls)):
            target = self._servers.acquire()
            if len(self.urls) == 1 or not self._servers.on_probation(target):
                return target
            try:
                resp = self._http.send("GET", target, "/health", None, timeout=self._probe_timeout)
                healthy = resp.status == 200
            except TRANSPORT_ERRORS:
                healthy = False
            if healthy:
                self._servers.probed(target)
                return target
            self._servers.release(target)
            self._servers.failed(target)
        return self._servers.acquire()  # all failing: the request itself will say so

    def post_all(self, path: str, body: Any, label: str | None = None) -> list[Any]:
        """POST `body` to every URL (e.g. a weight update), one after the other."""
        return [
            self.request("POST", path, body, label=label or f"POST {path}", url=u)[0]
            for u in self.urls
        ]

    def wait_healthy(self, timeout: float = 600.0, interval: float = 0.5) -> None:
        """Poll `GET /health_generate` on every URL until each answers 200.

        Raises `TeacherError` naming the URL that was still not healthy at the deadline.
        """
        deadline = time.monotonic() + timeout
        for url in self.urls:
            last = "no answer"
            while True:
                left = deadline - time.monotonic()
                try:
                    resp = self._http.send(
                        "GET", url, "/health_generate", None, timeout=max(0.1, min(left, 30.0))
                    )
                    if resp.status == 200:
                        break
                    last = f"HTTP {resp.status}"
                except TRANSPORT_ERRORS as e:
                    last = f"{type(e).__name__}: {e}"
                if time.monotonic() + interval > deadline:
                    raise TeacherError(
                        f"{url} did not become healthy within {timeout:g} s "
                        f"(GET /health_generate: {last})"
                    )
                time.sleep(interval)

    def model_info(self, url: str | None = None) -> dict:
        """`GET /model_info` of one server (the first URL by default)."""
        info, _ = self.request("GET", "/model_info", url=url or self.urls[0], label="model_info")
        return info

    def server_info(self, url: str | None = None) -> dict:
        """`GET /server_info` of one server (the first URL by default; `/get_server_info`,
        its deprecated name, where that is missing): SGLang's server arguments
        (`enable_deterministic_inference`, `tp_size`, `dtype`, ...)."""
        url = url or self.urls[0]
        info, _ = self.request("GET", "/server_info", url=url, label="server_info", refused_ok=True)
        if not isinstance(info, dict) or set(info) <= {"detail", "error"}:
            info, _ = self.request("GET", "/get_server_info", url=url, label="get_server_info")
        if not isinstance(info, dict):
            raise TeacherError(f"{url}/server_info: not a JSON object")
        return info

    def _map(
        self,
        n_items: int,
        batch_size: int,
        run: Callable[[int, int, int, threading.Event], list],
        progress: Callable[[int], None] | None,
    ) -> list:
        """Run `run(request_no, lo, hi, cancel)` over batches concurrently, in order."""
        results: list[list | None] = [None] * len(range(0, n_items, max(1, int(batch_size))))
        for r, lo, hi, part in self._map_iter(n_items, batch_size, run):
            results[r] = part
            if progress:
                progress(hi - lo)
        return [x for part in results for x in part]

    def _map_iter(
        self,
        n_items: int,
        batch_size: int,
        run: Callable[[int, int, int, threading.Event], list],
    ) -> Iterator[tuple[int, int, int, list]]:
        """`run(request_no, lo, hi, cancel)` over batches of `batch_size` items, up to
        `max_in_flight` at once: yields `(request_no, lo, hi, result)` as each completes.
        The first failure cancels the rest and raises; so does closing the iterator."""
        batch_size = max(1, int(batch_size))
        bounds = [(lo, min(lo + batch_size, n_items)) for lo in range(0, n_items, batch_size)]
        cancel = threading.Event()
        if len(bounds) <= 1 or self.max_in_flight == 1:
            for r, (lo, hi) in enumerate(bounds):
                yield r, lo, hi, run(r, lo, hi, cancel)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="sglang-http")
        futures: dict[Future, int] = {
            self._pool.submit(run, r, lo, hi, cancel): r for r, (lo, hi) in enumerate(bounds)
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in sorted(done, key=futures.__getitem__):
                    r = futures[f]
                    yield r, *bounds[r], f.result()  # raises the first failure
        except BaseException:
            cancel.set()
            for f in pending:
                f.cancel()
            raise

    # ---------------------------------------------------------------- scoring

    def score(
        self,
        seqs: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
        top_k: int = 0,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
        index_offset: int = 0,
    ) -> list[ScoredSequence]:
        """Log-probs of tokens `starts[i]..L-1` of each sequence (default start 1: all
        tokens but the first), one prefill-only request per `batch_size` sequences.
        Error messages number sequences from `index_offset`."""
        seqs = [s if type(s) is list else list(s) for s in seqs]  # JSON arrays
        starts_l = [1] * len(seqs) if starts is None else [int(s) for s in starts]
        if len(starts_l) != len(seqs):
            raise ValueError(f"{len(starts_l)} starts for {len(seqs)} sequences")
        for i, (s, st) in enumerate(zip(seqs, starts_l)):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if not 1 <= st <= len(s):
                raise ValueError(f"sequence {i}: start {st} outside [1, {len(s)}]")

        def run(r: int, lo: int, hi: int, cancel: threading.Event) -> list[ScoredSequence]:
            # one logprob_start_len for the batch (sglang-router takes no per-item list):
            # the earliest start; each item's extra leading entries are dropped
            common = min(starts_l[lo:hi]) - 1
            body = {
                "input_ids": seqs[lo:hi],
                "sampling_params": {
                    "max_new_tokens": 0,
                    "temperature": 1.0,
                    "skip_special_tokens": False,
                },
                "return_logprob": True,
                "logprob_start_len": common,
                "top_logprobs_num": top_k,
                "return_text_in_logprobs": False,
            }
            a, b = index_offset + lo, index_offset + hi - 1
            label = f"scoring request for sequences {a}..{b}"

            def parse(resp: Answer, url: str) -> list[ScoredSequence]:
                return check_scoring_answer(
                    resp, url, label, seqs[lo:hi], starts_l[lo:hi], common, top_k, a
                )

            checked, _ = self.request(
                "POST", "/generate", body, label=label, cancel=cancel, parse=parse
            )
            return checked

        return self._map(len(seqs), batch_size, run, progress)

    # ---------------------------------------------------------------- sampling

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: dict | Sequence[dict],
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
        extra: dict | None = None,
    ) -> list[Generation]:
        """Sample one continuation per prompt with `return_logprob` (output tokens only).

        `extra` adds top-level request fields (e.g. `{"return_routed_experts": True}`).

        `sampling_params` is SGLang's: one dict shared by all prompts (sent in batches of
        `batch_size`), or one dict per prompt (e.g. per-prompt `sampling_seed`s), sent one
        prompt per request since sglang-router accepts only one `sampling_params` object
        per request; the server batches concurrent requests itself.
        """
        results: dict[int, list[Generation]] = {}
        for lo, hi, gens in self.generate_iter(prompts, sampling_params, batch_size, extra):
            results[lo] = gens
            if progress:
                progress(hi - lo)
        return [g for lo in sorted(results) for g in results[lo]]

    def generate_iter(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: dict | Sequence[dict],
        batch_size: int = 16,
        extra: dict | None = None,
    ) -> Iterator[tuple[int, int, list[Generation]]]:
        """`generate`'s requests as they complete: yields `(lo, hi, generations of
        prompts[lo:hi])`, in completion order, covering every prompt once."""
        prompts = [list(p) for p in prompts]
        per_item = not isinstance(sampling_params, dict)
        if per_item and len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")

        def run(r: int, lo: int, hi: int, cancel: threading.Event) -> list[Generation]:
            single = per_item  # then hi == lo + 1
            body = {
                "input_ids": prompts[lo] if single else prompts[lo:hi],
                "sampling_params": sampling_params[lo] if single else sampling_params,
                "return_logprob": True,
                "logprob_start_len": -1,
                "return_text_in_logprobs": False,
                **(extra or {}),
            }
            label = f"generate request {r} (prompts {lo}..{hi - 1})"

            def parse(resp: Answer, url: str) -> list[Generation]:
                answer = decode_answer(resp)
                if single:
                    answer = [answer]
                return [
                    check_generation(answer, url, label, j, lo + j, hi - lo) for j in range(hi - lo)
                ]

            checked, _ = self.request(
                "POST", "/generate", body, label=label, cancel=cancel, parse=parse
            )
            return checked

        for _, lo, hi, gens in self._map_iter(len(prompts), 1 if per_item else batch_size, run):
            yield lo, hi, gens
