"""Helpers of the SGLang tests: servers on loopback, a fault-injecting proxy, references.

Every server a test starts stops by itself: in-process servers are daemon threads shut
down by the fixture; subprocesses (`mopd serve`, `sglang-router`) run under coreutils
`timeout`, so they die even if pytest is killed, and fixtures terminate them by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
HARD_TIMEOUT_S = 300  # a subprocess server never outlives this


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until GET `url` answers 200; fail early if `proc` exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up within {deadline_s} s")


class Proc:
    """A subprocess under `timeout`, stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], log_path: str, env: dict | None = None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = ["timeout", "-k", "5", str(HARD_TIMEOUT_S), *argv]
        self.p = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env or os.environ.copy()
        )

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()
        return self.p.returncode

    def output(self) -> str:
        """What the process printed so far."""
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()


def start_serve_subprocess(hf_dir: str, log_path: str, *extra: str) -> tuple[Proc, str]:
    """`mopd serve` on a free port (1 torch thread); returns (process, url) once healthy."""
    port = free_port()
    proc = Proc(
        [PY, "-m", "megatron_mopd", "serve", "--hf", hf_dir, "--port", str(port)]
        + ["--num-threads", "1", *extra],
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health_generate", 120, proc.p)
    except BaseException:
        proc.stop()
        raise
    return proc, url


def start_router(worker_urls: list[str], log_path: str) -> tuple[Proc | None, str]:
    """The real sglang-router in front of `worker_urls`; (None, reason) if it cannot start."""
    port = free_port()
    try:
        import sglang_router  # noqa: F401
    except ImportError as e:
        return None, f"sglang-router is not installed ({e})"
    if shutil.which("timeout") is None:
        return None, "coreutils `timeout` is missing"
    proc = Proc(
        [PY, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls]
        + ["--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port)]
        # its metrics exporter binds 0.0.0.0:29000 by default: loopback, and a port of its
        # own so that two routers (or another user's) can run at once
        + ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        + ["--log-level", "warn"],
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 60, proc.p)
        wait_routable(url, 90)
    except (RuntimeError, TimeoutError) as e:
        out = proc.output()[-500:]
        proc.stop()
        return None, f"sglang-router did not start: {e}; output: {out}"
    return proc, url


def wait_routable(url: str, deadline_s: float) -> None:
    """Until a router passes a one-token scoring request to a worker: it answers 503
    ("no available workers") until its health checks of the workers have passed, which
    against real SGLang (whose GET /health runs a generation) takes a few seconds."""
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}}
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        try:
            r = httpx.post(url + "/generate", json=body, timeout=30)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} routed no request within {deadline_s} s ({last})")


class InProcessServer:
    """`SGLangCompatibleServer` on a free loopback port in this process."""

    def __init__(self, hf_dir: str, engine=None, **kw: Any):
        from megatron_mopd.server.app import SGLangCompatibleServer

        self.server = SGLangCompatibleServer(hf_dir, port=0, engine=engine, **kw)
        self.server.start(background_load=False)
        self.url = self.server.url

    def stop(self) -> None:
        """Shut the server down (idempotent)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None


# --------------------------------------------------------------------------------------
# a fault-injecting proxy

Action = str | tuple | None


class FlakyProxy:
    """An HTTP proxy to `target` that misbehaves on purpose, request by request.

    `plan(n, method, path)` is called for the n-th request (from 0) and returns
    None/"pass" (forward), "500" (answer 500), "429" (answer 429 with `Retry-After: 0`, as
    sglang-router does when its queue is full), "drop" (close the connection without an
    answer), ("sleep", seconds) (wait, then forward) or ("mutate", fn) (forward, then
    answer `fn(json_body)` serialised with stdlib json, so NaN/Infinity literals appear).
    `seen` records (method, path, body) of every request.
    """

    def __init__(self, target: str, plan: Callable[[int, str, str], Action] | None = None):
        self.target = target.rstrip("/")
        self.plan = plan or (lambda n, m, p: None)
        self.seen: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=120)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with proxy._lock:
                    n = len(proxy.seen)
                    proxy.seen.append((method, self.path, json.loads(raw) if raw else None))
                action = proxy.plan(n, method, self.path)
                if action == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "500":
                    self._reply(500, b'{"error": {"message": "injected failure"}}')
                    return
                if action == "429":
                    self._reply(429, b'{"error": {"message": "queue full"}}', {"Retry-After": "0"})
                    return
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                headers = {"Content-Type": "application/json"} if raw else {}
                if self.headers.get("Authorization"):
                    headers["Authorization"] = self.headers["Authorization"]
                try:
                    resp = proxy._http.request(
                        method, proxy.target + self.path, content=raw or None, headers=headers
                    )
                except RuntimeError:  # stopped meanwhile (a client that timed out left)
                    self.close_connection = True
                    return
                body = resp.content
                if isinstance(action, tuple) and action[0] == "mutate":
                    body = json.dumps(action[1](resp.json())).encode()
                self._reply(resp.status_code, body)

            def _reply(self, status: int, body: bytes, extra: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    for k, v in (extra or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def count(self, path: str = "/generate") -> int:
        """How many requests to `path` arrived."""
        return sum(1 for _, p, _ in self.seen if p == path)

    def stop(self) -> None:
        """Shut the proxy down."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._http.close()


# --------------------------------------------------------------------------------------
# references


def reference_logprobs(hf_dir: str, seqs: list[list[int]]) -> list[list[float]]:
    """log p(ids[i] | ids[:i]) for i >= 1 with a plain transformers forward, one sequence
    at a time (no padding, no batching)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), dim=-1)
            out.append([lp[i - 1, s[i]].item() for i in range(1, len(s))])
    return out


def random_seqs(n: int, lo: int, hi: int, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    """`n` random token sequences with lengths in [lo, hi] (ids 4..vocab-1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]


def scoring_item(ids: list[int], sent_start: int, top_k: int = 0, seed: int = 0) -> dict:
    """A well-formed answer item for `ids` sent with `logprob_start_len = sent_start`, as
    SGLang builds it: a leading null entry, then `[logprob, id, null]` per token, and with
    `top_k`, `input_top_logprobs` = null then k `[logprob, id, null]` per position."""
    import random

    rng = random.Random(seed)
    entries = [[-0.01 * (k + 1), t, None] for k, t in enumerate(ids[sent_start:])]
    entries[0][0] = None
    meta: dict = {"input_token_logprobs": entries}
    if top_k:
        rows = [
            sorted(
                ([-rng.random() * 9, rng.randrange(150_000), None] for _ in range(top_k)),
                reverse=True,
            )  # fmt: skip
            for _ in entries[1:]
        ]
        meta["output_token_logprobs"] = []
        meta["input_top_logprobs"] = [None, *rows]
        meta["output_top_logprobs"] = []
    return {"meta_info": meta}
