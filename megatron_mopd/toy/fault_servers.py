"""Servers for fault injection: `mopd serve` subprocesses, a misbehaving HTTP proxy, and
requests no server of ours should choke on.

Used by the SGLang tests (`tests/sglang_helpers.py` re-exports them) and the fault
campaign (`tools/faults.py`). Everything binds 127.0.0.1. Subprocesses run under coreutils
`timeout`, so they die even if their parent is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
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

from megatron_mopd.toy.recipe_runs import REPO

PY = sys.executable
HARD_TIMEOUT_S = 300  # a subprocess server never outlives this (by default)


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

    def __init__(
        self,
        argv: list[str],
        log_path: str,
        env: dict | None = None,
        hard_timeout: float = HARD_TIMEOUT_S,
    ):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = ["timeout", "-k", "5", str(int(hard_timeout)), *argv]
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

    def kill(self) -> None:
        """SIGKILL the server itself (not `timeout` first: no chance to clean up)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.p.pid).children(recursive=True):
                child.kill()
        self.p.kill()
        self.p.wait(10)
        self.log.close()

    def output(self) -> str:
        """What the process printed so far."""
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()


def start_serve_subprocess(
    hf_dir: str, log_path: str, *extra: str, hard_timeout: float = HARD_TIMEOUT_S
) -> tuple[Proc, str]:
    """`mopd serve` on a free port (1 torch thread); returns (process, url) once healthy."""
    port = free_port()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = Proc(
        [PY, "-m", "megatron_mopd", "serve", "--hf", hf_dir, "--port", str(port)]
        + ["--num-threads", "1", *extra],
        log_path,
        env=env,
        hard_timeout=hard_timeout,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health_generate", 120, proc.p)
    except BaseException:
        proc.stop()
        raise
    return proc, url


# --------------------------------------------------------------------------------------
# a fault-injecting proxy

Action = str | tuple | None


class FlakyProxy:
    """An HTTP proxy to `target` that misbehaves on purpose, request by request.

    `plan(n, method, path)` is called for the n-th request (from 0) and returns
    None/"pass" (forward), "500" (answer 500), "429" (answer 429 with `Retry-After: 0`, as
    sglang-router does when its queue is full), "drop" (close the connection without an
    answer), ("sleep", seconds) (wait, then forward), ("hang", seconds) (wait, then close
    the connection: never forwarded), ("mutate", fn) (forward, then
    answer `fn(json_body)` serialised with stdlib json, so NaN/Infinity literals appear)
    or ("raw", fn) (forward, then answer the bytes `fn(body_bytes)`). `seen` records
    (method, path, body) of every request. `target` may be changed while it runs (a
    restarted server); a target that does not answer gives 502.
    """

    def __init__(self, target: str, plan: Callable[[int, str, str], Action] | None = None):
        self.target = target.rstrip("/")
        self.plan = plan or (lambda n, m, p: None)
        self.seen: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=120)
        self._httpd = _ProxyServer(("127.0.0.1", 0), _proxy_handler(self))
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


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True


def _proxy_handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
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
            if isinstance(action, tuple) and action[0] == "hang":  # no answer, not forwarded
                time.sleep(action[1])
                self.close_connection = True
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
            except httpx.HTTPError as e:  # the target is down (killed, restarting)
                self._reply(502, json.dumps({"error": {"message": f"proxy: {e!r}"}}).encode())
                return
            except RuntimeError:  # stopped meanwhile (a client that timed out left)
                self.close_connection = True
                return
            body = resp.content
            if isinstance(action, tuple) and action[0] == "mutate":
                body = json.dumps(action[1](resp.json())).encode()
            if isinstance(action, tuple) and action[0] == "raw":
                body = action[1](body)
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

    return Handler


# --------------------------------------------------------------------------------------
# requests no server of ours should choke on


def raw_exchange(url: str, head: str, body: bytes = b"", half_close: bool = False) -> bytes:
    """Send `head` (request line and headers, no blank line) and `body` on a fresh
    connection; return everything the server sent until it closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


def hostile_requests(url: str) -> list[tuple[str, int, int]]:
    """Oversized and malformed requests to `url` (an SGLang-compatible server), then
    whether it still answers: [(what, wanted status, got status)]. A declared 1 GiB body
    is sent with 10 bytes of it (the server must refuse it unread). None of them reaches
    the engine, so a run using the server is not disturbed."""
    post = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
    raw_cases = [
        ("1 GiB Content-Length", f"{post}\r\nContent-Length: {2**30}", b"0123456789", False, 413),
        (
            "chunked body",
            f"{post}\r\nTransfer-Encoding: chunked",
            b"3\r\n{}\n\r\n0\r\n\r\n",
            False,
            411,
        ),
        ("negative Content-Length", f"{post}\r\nContent-Length: -1", b"", False, 400),
        ("body shorter than declared", f"{post}\r\nContent-Length: 50", b'{"input_ids"', True, 400),
    ]
    out = []
    for what, head, body, half, want in raw_cases:
        try:
            got = _status(raw_exchange(url, head, body, half))
        except OSError:
            got = 0
        out.append((what, want, got))
    json_cases = [
        ("not JSON", b"{nope", 400),
        ("JSON but not an object", b"[1, 2", 400),
        ("input_ids of strings", json.dumps({"input_ids": ["a"]}).encode(), 400),
        (
            "unknown sampling field",
            json.dumps({"input_ids": [1], "sampling_params": {"n": 2}}).encode(),
            400,
        ),
    ]
    for what, body, want in json_cases:
        try:
            got = httpx.post(url + "/generate", content=body, timeout=30).status_code
        except httpx.HTTPError:
            got = 0
        out.append((what, want, got))
    # still serving: GET /health and /model_info answer without running the engine, so
    # the check does not join (and change the numerics of) a batch a run is waiting for
    for path in ("/health", "/model_info"):
        try:
            got = httpx.get(url + path, timeout=30).status_code
        except httpx.HTTPError:
            got = 0
        out.append((f"GET {path} afterwards", 200, got))
    return out
