"""The client's HTTP/1.1 connection (`http_wire`) against scripted servers on loopback:
each framing of an answer's body, keep-alive and close, and every way an answer can be
broken, down to the exception type the retry logic relies on."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from megatron_mopd.sglang.http_pool import ConnectionPool
from megatron_mopd.sglang.http_wire import MAX_HEAD_BYTES, Connection


class Scripted:
    """A loopback server that answers each request it reads with the next scripted reply:
    bytes (sent in `pieces` writes, then the connection stays open), ("close", bytes)
    (sent, then the connection closed) or ("silent", s) (nothing for s seconds).
    `requests` holds the raw bytes of each request (head + Content-Length body);
    `accepted` counts connections."""

    def __init__(
        self,
        replies: list,
        pieces: int = 1,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ):
        self.replies, self.pieces, self.tls, self.host = list(replies), pieces, tls, host
        self.requests: list[bytes] = []
        self.accepted = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):  # the client refused the certificate
                    conn.close()
                    continue
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while self.replies:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                reply = self.replies.pop(0)
                if isinstance(reply, tuple) and reply[0] == "silent":
                    time.sleep(reply[1])
                    return
                close = isinstance(reply, tuple)
                data = reply[1] if close else reply
                step = max(1, -(-len(data) // self.pieces))
                for i in range(0, len(data), step):
                    conn.sendall(data[i : i + step])
                    if self.pieces > 1:
                        time.sleep(0.001)
                if close:
                    return

    def connect(self, timeout: float = 5.0) -> Connection:
        return Connection(self.host, self.port, self.tls is not None, timeout)

    def close(self) -> None:
        self.sock.close()


def ok(body: bytes, *extra: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    head = [f"{version} {status}", "Content-Type: application/json", *extra]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in extra):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def exchange(conn: Connection, body: bytes | None = b"{}", method: str = "POST"):
    return conn.exchange(method, "/generate", body, 5.0, "application/json")


@pytest.mark.parametrize("pieces", [1, 97])
def test_content_length_answers_keep_the_connection(pieces):
    """Two requests on one connection; the answer arrives whole or in 97 writes (the head
    split byte-wise across them); the request carries Host, type and length."""
    big = os.urandom(300_000)
    srv = Scripted([ok(b'{"a": 1}'), ok(big)], pieces=pieces)
    try:
        conn = srv.connect()
        a = exchange(conn, b'{"x": [1, 2]}')
        assert (a.status, a.reason, a.data, a.will_close) == (200, "OK", b'{"a": 1}', False)
        assert a.headers["content-type"] == "application/json"
        b = exchange(conn)
        assert b.data == big and not b.will_close
        assert srv.accepted == 1
        req = srv.requests[0]
        assert req.startswith(b"POST /generate HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in req
        assert b"Content-Length: 13\r\n" in req and req.endswith(b'\r\n\r\n{"x": [1, 2]}')
        conn.close()
    finally:
        srv.close()


def test_chunked_answer_with_extensions_and_trailers():
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;name=value\r\n[1, \r\n"
        b"6\r\n2, 3]\n\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    srv = Scripted([body, ok(b"next")], pieces=7)
    try:
        conn = srv.connect()
        a = exchange(conn)
        assert a.data == b"[1, 2, 3]\n" and not a.will_close
        assert exchange(conn).data == b"next"  # the connection was left in step
    finally:
        srv.close()


@pytest.mark.parametrize(
    "reply, data",
    [
        # no length: the body ends when the server closes
        (("close", b"HTTP/1.1 200 OK\r\n\r\nuntil the end"), b"until the end"),
        (ok(b"x", "Connection: close"), b"x"),
        (ok(b"old", version="HTTP/1.0"), b"old"),
    ],
)
def test_answers_that_close_the_connection(reply, data):
    srv = Scripted([reply])
    try:
        a = exchange(srv.connect())
        assert a.data == data and a.will_close
    finally:
        srv.close()


def test_http10_keep_alive_interim_and_bodyless_answers():
    srv = Scripted(
        [
            ok(b"kept", "Connection: keep-alive", version="HTTP/1.0"),
            b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100"),
            b"HTTP/1.1 204 No Content\r\n\r\n",
            ok(b"", "Content-Length: 9"),  # HEAD: a length, no body
            ok(b"last"),
        ]
    )
    try:
        conn = srv.connect()
        a = exchange(conn)
        assert (a.data, a.will_close) == (b"kept", False)
        assert exchange(conn).data == b"after 100"
        assert exchange(conn).status == 204
        assert exchange(conn, None, "HEAD").data == b""
        assert exchange(conn, None, "GET").data == b"last"
        assert b"Content-Length" not in srv.requests[-1]
    finally:
        srv.close()


def test_unasked_bytes_after_an_answer_close_the_connection():
    srv = Scripted([ok(b"a") + b"HTTP/1.1 200 OK\r\n"])
    try:
        assert exchange(srv.connect()).will_close
    finally:
        srv.close()


@pytest.mark.parametrize(
    "reply, error",
    [
        (("close", b""), http.client.RemoteDisconnected),
        (("close", ok(b"0123456789")[:-4]), http.client.IncompleteRead),
        (
            ("close", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
            http.client.IncompleteRead,
        ),  # fmt: skip
        (("close", b"SSH-2.0-OpenSSH\r\n\r\n"), http.client.BadStatusLine),
        (
            ("close", b"HTTP/1.1 200 OK\r\nX: " + b"y" * (MAX_HEAD_BYTES + 10)),
            http.client.LineTooLong,
        ),  # fmt: skip
        (("close", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"), http.client.HTTPException),
        (("close", b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n"), http.client.HTTPException),
        (
            ("close", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            http.client.HTTPException,
        ),  # fmt: skip
    ],
)
def test_broken_answers_raise_http_client_errors(reply, error):
    """The exception types of http.client: RemoteDisconnected (an OSError) is what a
    stale keep-alive connection gives, and the client retries all of them."""
    srv = Scripted([reply])
    try:
        with pytest.raises(error):
            exchange(srv.connect())
    finally:
        srv.close()


def test_a_silent_server_times_out():
    srv = Scripted([("silent", 2.0)])
    try:
        conn = srv.connect()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.exchange("POST", "/generate", b"{}", 0.3, "application/json")
        assert time.monotonic() - t0 < 1.5
    finally:
        srv.close()


def test_pool_reuses_and_replaces_connections():
    """Through the pool: a keep-alive answer's connection is reused, a closing one is not."""
    srv = Scripted([ok(b"1"), ok(b"2", "Connection: close"), ok(b"3"), ok(b"4")])
    pool = ConnectionPool(timeout=5, connect_timeout=5, max_idle=4)
    try:
        url = f"http://127.0.0.1:{srv.port}"
        got = [pool.send("GET", url, "/x", None).data for _ in range(4)]
        assert got == [b"1", b"2", b"3", b"4"]
        assert srv.accepted == 2
    finally:
        pool.close()
        srv.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_literal_urls():
    """`http://[::1]:port`: the pool connects to the address, Host keeps the brackets."""
    try:
        srv = Scripted([ok(b"six")], host="::1")
    except OSError as e:  # IPv6 compiled in but not configured on loopback
        pytest.skip(f"no IPv6 loopback: {e}")
    pool = ConnectionPool(timeout=5, connect_timeout=5, max_idle=1)
    try:
        assert pool.send("GET", f"http://[::1]:{srv.port}", "/x", None).data == b"six"
        assert f"Host: [::1]:{srv.port}\r\n".encode() in srv.requests[0]
    finally:
        pool.close()
        srv.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_verifies_and_talks(tmp_path, monkeypatch):
    """TLS with the default verifying context: a server whose certificate is trusted (via
    SSL_CERT_FILE) answers; the same server is refused when it is not."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = Scripted([ok(b"secret"), ok(b"again")], tls=ctx)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            srv.connect()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        conn = srv.connect()
        assert exchange(conn).data == b"secret"
        assert exchange(conn).data == b"again"
    finally:
        srv.close()
