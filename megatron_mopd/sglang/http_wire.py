"""One HTTP/1.1 client connection on a socket: a request out, the whole answer in.

`http.client` spent ~0.6 ms of CPU per 250 kB scoring answer, mostly in Python: header
parsing through the `email` package, `putheader`, buffered reads. This connection sends
the request line, headers and body in one `sendall` and reads a `Content-Length` body
with `recv_into` straight into its final buffer: ~0.3 ms for the same answer
(tools/bench_scoring.py). It implements the part of RFC 9112 a JSON client needs:

- the answer's body is framed by `Transfer-Encoding: chunked`, by `Content-Length`, or
  by the server closing the connection; a HEAD request and 1xx/204/304 answers have none;
  interim 1xx answers are skipped;
- the connection is kept alive unless the server says `Connection: close`, answers
  HTTP/1.0 without `keep-alive`, or ends the body by closing;
- TLS (`https://`) with the default verifying context, as `http.client` has.

Errors are those of `http.client` so callers tell them apart the same way:
`RemoteDisconnected` (closed before answering: a stale keep-alive connection),
`IncompleteRead` (closed inside the body), `BadStatusLine` / `LineTooLong` /
`HTTPException` (not HTTP), plus `TimeoutError` (no byte for `timeout` seconds) and
other `OSError`s from the socket. Proxies (HTTP(S)_PROXY) are not used.
"""

from __future__ import annotations

import socket
import ssl
from http.client import (
    BadStatusLine,
    HTTPException,
    IncompleteRead,
    LineTooLong,
    RemoteDisconnected,
)

MAX_HEAD_BYTES = 65536  # status line + headers, as http.client's limits allow
_RECV = 262144


class WireAnswer:
    """The parts of an answer the client uses."""

    __slots__ = ("status", "reason", "headers", "data", "will_close")

    def __init__(self, status: int, reason: str, headers: dict[str, str], data: bytes, close: bool):
        self.status, self.reason, self.headers = status, reason, headers
        self.data, self.will_close = data, close


class Connection:
    """A connection to `host:port` (TLS if `tls`); `exchange` one request at a time."""

    def __init__(self, host: str, port: int | None, tls: bool, connect_timeout: float) -> None:
        port = port or (443 if tls else 80)
        self.host_header = (f"[{host}]" if ":" in host else host) + (
            "" if port == (443 if tls else 80) else f":{port}"
        )
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self._buf = bytearray()  # bytes received and not yet consumed

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        timeout: float,
        content_type: str,
        extra_headers: str = "",
    ) -> WireAnswer:
        """Send one request and read its whole answer (the socket stays open unless the
        answer's `will_close`; the caller closes it on any exception). `extra_headers`
        are whole header lines, each ending in CRLF (e.g. an `Authorization`)."""
        if self.sock is None:
            raise HTTPException("the connection is closed")
        self.sock.settimeout(timeout)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host_header}\r\nAccept: */*\r\n"
        head += extra_headers
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode("latin-1") + b"\r\n" + (body or b""))
        while True:
            version, status, reason, headers = self._read_head()
            if not 100 <= status < 200:
                break
        close = version == "HTTP/1.0"
        tokens = headers.get("connection", "").lower()
        if "close" in tokens:
            close = True
        elif "keep-alive" in tokens:
            close = False
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            data = self._read_chunked()
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                length = -1
            if length < 0:
                raise HTTPException(f"bad Content-Length {headers['content-length']!r}")
            data = self._read_exact(length)
        else:
            data, close = self._read_to_close(), True
        if self._buf:  # bytes nobody asked for: the connection is out of step
            close = True
        return WireAnswer(status, reason, headers, data, close)

    # -- reading

    def _read_head(self) -> tuple[str, int, str, dict[str, str]]:
        buf, seen = self._buf, 0
        while (end := buf.find(b"\r\n\r\n", max(0, seen - 3))) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise LineTooLong("header")
            seen = len(buf)
            chunk = self.sock.recv(_RECV)
            if not chunk:
                if buf:
                    raise BadStatusLine(bytes(buf[:100]).decode("latin-1"))
                raise RemoteDisconnected("Remote end closed connection without response")
            buf += chunk
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadStatusLine(lines[0][:100])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPException(f"malformed header line {line[:100]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers

    def _read_exact(self, n: int) -> bytes:
        have = min(n, len(self._buf))
        if have == len(self._buf) and have == n:
            data = bytes(self._buf)
            self._buf.clear()
            return data
        out = bytearray(n)
        view = memoryview(out)
        view[:have] = self._buf[:have]
        del self._buf[:have]
        while have < n:
            got = self.sock.recv_into(view[have:])
            if not got:
                raise IncompleteRead(bytes(out[:have]), n - have)
            have += got
        view.release()
        return bytes(out)

    def _read_line(self) -> bytes:
        buf = self._buf
        while (end := buf.find(b"\r\n")) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise LineTooLong("chunk size or trailer")
            chunk = self.sock.recv(_RECV)
            if not chunk:
                raise IncompleteRead(b"")
            buf += chunk
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise HTTPException(f"bad chunk size {line[:20]!r}") from None
            if size == 0:
                break
            parts.append(self._read_exact(size))
            if self._read_line():
                raise HTTPException("no CRLF after a chunk")
        while self._read_line():  # trailer fields, up to the empty line
            pass
        return b"".join(parts)

    def _read_to_close(self) -> bytes:
        parts = [bytes(self._buf)]
        self._buf.clear()
        while chunk := self.sock.recv(_RECV):
            parts.append(chunk)
        return b"".join(parts)
