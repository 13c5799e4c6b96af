"""HTTP for the SGLang client: a pool of keep-alive connections (`http_wire`), and the JSON encoding and decoding of requests and answers (orjson when installed).

Split from `client.py`, which holds the SGLang protocol (requests, retries,
checks); nothing here knows SGLang.
"""

from __future__ import annotations

import json
import select
import threading
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from megatron_mopd.sglang.http_wire import Connection

try:  # orjson is much faster on the large log-prob lists; stdlib json is the fallback
    import orjson
except ImportError:  # pragma: no cover - orjson is normally present
    orjson = None


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
    """Keep-alive HTTP/1.1 connections (`http_wire.Connection`), per server, shared by threads.

    Each request takes an idle connection to its server, or opens one, and gives it back
    once the answer is read in full; a connection that failed, timed out or is to be
    closed is dropped. An idle connection the server closed meanwhile (uvicorn closes
    them after 5 s) shows as readable and is dropped before use, as httpcore does.
    Per 250 kB scoring answer, the connection costs ~0.3 ms of CPU, stdlib http.client
    ~0.6 ms and httpx ~1.2 ms: HTTP was the largest part of the client's overhead per
    scoring request (tools/bench_scoring.py).

    `send` raises `TimeoutError` (connecting, or no byte for `timeout` seconds while
    sending or reading), `OSError` or `http.client.HTTPException` (refused, dropped, ...).
    """

    def __init__(
        self, timeout: float, connect_timeout: float, max_idle: int, api_key: str | None = None
    ) -> None:
        """`api_key`, when given, goes with every request as `Authorization: Bearer KEY`
        (SGLang's `--api-key`)."""
        if api_key is not None and any(c in api_key for c in "\r\n"):
            raise ValueError("the API key contains a line break")
        self._headers = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[str, list[Connection]] = {}
        self._prefix: dict[str, str] = {}  # base URL -> its path ("" for most servers)
        self._lock = threading.Lock()
        self._closed = False

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
        conn = self._take(base)
        if conn is None:
            conn = self._connect(base, min(self.connect_timeout, timeout))
        try:
            resp = conn.exchange(
                method, self._prefix[base] + path, body, timeout, "application/json", self._headers
            )
        except BaseException:
            conn.close()
            raise
        answer = Answer(
            resp.status,
            resp.reason,
            resp.headers.get("content-type", ""),
            resp.data,
            _retry_after(resp.headers.get("retry-after")),
        )
        if resp.will_close:
            conn.close()
        else:
            self._give(base, conn)
        return answer

    def close(self) -> None:
        """Close the idle connections (those in use are closed when given back)."""
        with self._lock:
            self._closed = True
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            c.close()

    def _connect(self, base: str, connect_timeout: float) -> Connection:
        u = urlsplit(base)
        self._prefix[base] = u.path.rstrip("/")  # a server behind a path prefix
        return Connection(u.hostname or "", u.port, u.scheme == "https", connect_timeout)

    def _take(self, base: str) -> Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(base)
                conn = idle.pop() if idle else None
            if conn is None or _still_open(conn):
                return conn
            conn.close()

    def _give(self, base: str, conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(base, [])
            if not self._closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()


def _still_open(conn: Connection) -> bool:
    """An idle keep-alive connection is usable if nothing is readable on it: readable
    means the server closed it (EOF) or sent something unasked."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False
