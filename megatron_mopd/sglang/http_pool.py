"""HTTP for the SGLang client: keep-alive connections from urllib3, and the JSON encoding and decoding of requests and answers (orjson when installed).

Split from `client.py`, which holds the SGLang protocol (requests, retries, checks);
nothing here knows SGLang. The HTTP/1.1 framing (chunked and `Content-Length` bodies,
keep-alive rules, interim answers, TLS) is urllib3's, a library that requests and pip
are built on, maintained, fuzzed and patched for security; this module only chooses its
settings: no retries or redirects of its own (the client retries, naming the teacher),
no proxy, a short connect timeout and a longer one for the answer.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any, NamedTuple

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError, ReadTimeoutError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

try:  # orjson is much faster on the large log-prob lists; stdlib json is the fallback
    import orjson
except ImportError:  # pragma: no cover - orjson is normally present
    orjson = None

# What `ConnectionPool.send` raises when no answer came: refused, dropped, timed out, not
# HTTP, TLS refused (`is_timeout` tells the timeouts apart).
TRANSPORT_ERRORS = (Urllib3Error, OSError, http.client.HTTPException)


def is_timeout(error: BaseException) -> bool:
    """True if `error` (one of `TRANSPORT_ERRORS`) is a timeout: connecting, or no byte
    from the server for the read timeout. (urllib3's `NewConnectionError`, a refused or
    unreachable address, derives from its connect timeout class but is not one.)"""
    if isinstance(error, NewConnectionError):
        return False
    return isinstance(error, Urllib3Timeout | ReadTimeoutError | TimeoutError)


def dumps_json(body: Any) -> bytes:
    """`body` as JSON bytes (orjson when installed)."""
    if orjson is not None:
        return orjson.dumps(body)
    return json.dumps(body).encode()


def loads_json(data: bytes) -> Any:
    """Strict JSON from bytes (orjson when installed); raises ValueError."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


def decode_answer(resp: Answer) -> Any:
    """JSON (orjson; stdlib json for NaN/Infinity literals) or, if not JSON, the text."""
    data = resp.data
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data)
    except ValueError:
        if "json" in resp.content_type:
            return BadJSON(data[:200].decode(errors="replace"))
        return data.decode(errors="replace")


class BadJSON(str):
    """An answer that claimed to be JSON but was not; fails every check downstream."""


def error_text(resp: Answer) -> str:
    """The message of an error answer (`{"error": {"message": ...}}` or plain text)."""
    try:
        body = json.loads(resp.data)
    except ValueError:
        return resp.data[:300].decode(errors="replace").strip() or resp.reason
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(body)[:300]


class Answer(NamedTuple):
    """A whole HTTP answer."""

    status: int
    reason: str
    content_type: str
    data: bytes
    retry_after: float | None = None  # seconds, from a `Retry-After: N` header


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the delta-seconds form; an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections, per server URL, shared by threads (urllib3's
    `HTTPConnectionPool` / `HTTPSConnectionPool`, one per URL).

    Each request takes an idle connection to its server, or opens one, and gives it back
    once the answer is read in full; a connection that failed or is to be closed is
    dropped, and an idle one the server closed meanwhile (uvicorn closes them after 5 s)
    is noticed and replaced before use. Up to `max_idle` connections per server stay
    open; more may be in use at once (`block=False`).

    CPU per 275 kB answer (about one 32 x 256-token scoring answer; loopback, this
    machine, alternating runs): urllib3 0.46-0.60 ms, the hand-written HTTP/1.1
    connection it replaced 0.29-0.42 ms, httpx 1.5-1.6 ms; per sequence the difference
    to the former is ~0.005 ms, a few per cent of the client's whole cost (JSON
    decoding, checks).

    Timeouts: `connect_timeout` for connecting and for sending the request (urllib3 sends
    under the connect timeout), `timeout` (or the call's) for each wait on the answer,
    i.e. how long the server may stay silent. TLS (`https://`) verifies with the default
    certificate store (`SSL_CERT_FILE` is honoured). `HTTP(S)_PROXY` is never read:
    connections go straight to the URLs. urllib3 neither retries nor follows redirects
    here: the caller decides.

    `send` raises one of `TRANSPORT_ERRORS` when no whole answer came (`is_timeout`
    tells a timeout from a refused or dropped connection).
    """

    def __init__(
        self, timeout: float, connect_timeout: float, max_idle: int, api_key: str | None = None
    ) -> None:
        """`api_key`, when given, goes with every request as `Authorization: Bearer KEY`
        (SGLang's `--api-key`)."""
        if api_key is not None and any(c in api_key for c in "\r\n"):
            raise ValueError("the API key contains a line break")
        self._headers = {"Accept": "*/*"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._pools: dict[str, tuple[urllib3.HTTPConnectionPool, str]] = {}
        self._lock = threading.Lock()

    def send(
        self,
        method: str,
        base: str,
        path: str,
        body: bytes | None,
        timeout: float | None = None,
    ) -> Answer:
        """`method base+path` with `body` (JSON); the whole answer."""
        timeout = self.timeout if timeout is None else timeout
        pool, prefix = self._pool(base)
        resp = pool.urlopen(
            method,
            prefix + path,
            body=body,
            headers=self._headers if body is None else self._json_headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=urllib3.Timeout(connect=min(self.connect_timeout, timeout), read=timeout),
            preload_content=True,
        )
        headers = resp.headers
        return Answer(
            resp.status,
            resp.reason or "",
            headers.get("content-type", ""),
            resp.data,
            _retry_after(headers.get("retry-after")),
        )

    def close(self) -> None:
        """Close the idle connections (those in use are closed when given back)."""
        with self._lock:
            pools = [p for p, _ in self._pools.values()]
            self._pools.clear()
        for p in pools:
            p.close()

    def _pool(self, base: str) -> tuple[urllib3.HTTPConnectionPool, str]:
        """The pool of `base` (made on first use) and its path prefix ("" for most
        servers; a server behind a path prefix keeps it)."""
        got = self._pools.get(base)
        if got is not None:
            return got
        with self._lock:
            if base not in self._pools:
                pool = urllib3.connection_from_url(
                    base,
                    maxsize=self.max_idle,
                    block=False,
                    retries=False,
                    timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.timeout),
                )
                prefix = urllib3.util.parse_url(base).path or ""
                self._pools[base] = (pool, prefix.rstrip("/"))
            return self._pools[base]
