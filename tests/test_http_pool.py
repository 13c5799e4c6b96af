"""The SGLang client's HTTP layer (`sglang.http_pool`, over urllib3) against scripted
servers on loopback: the request it sends, each framing of an answer's body, keep-alive
and close, broken answers and timeouts told apart as the retry logic needs, no proxy, TLS;
and through `SGLangClient`: 408/429 with Retry-After, refused_ok, the API key header."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from megatron_mopd.errors import TeacherError
from megatron_mopd.sglang.client import SGLangClient
from megatron_mopd.sglang.http_pool import TRANSPORT_ERRORS, ConnectionPool, is_timeout


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

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def close(self) -> None:
        self.sock.close()


def ok(body: bytes, *extra: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    head = [f"{version} {status}", "Content-Type: application/json", *extra]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in extra):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def pool(**kw) -> ConnectionPool:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("connect_timeout", 5.0)
    kw.setdefault("max_idle", 4)
    return ConnectionPool(**kw)


@pytest.mark.parametrize("pieces", [1, 97])
def test_content_length_answers_keep_the_connection(pieces):
    """Two requests on one connection; the answer arrives whole or in 97 writes (the head
    split across them); the request carries Host, type, length and the API key."""
    big = os.urandom(300_000)
    srv = Scripted([ok(b'{"a": 1}'), ok(big)], pieces=pieces)
    p = pool(api_key="sk-test")
    try:
        a = p.send("POST", srv.url, "/generate", b'{"x": [1, 2]}')
        assert (a.status, a.reason, a.data) == (200, "OK", b'{"a": 1}')
        assert a.content_type == "application/json" and a.retry_after is None
        assert p.send("GET", srv.url, "/x", None).data == big
        assert srv.accepted == 1
        req = srv.requests[0]
        assert req.startswith(b"POST /generate HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in req
        assert b"Content-Type: application/json\r\n" in req
        assert b"Authorization: Bearer sk-test\r\n" in req
        assert b"Content-Length: 13\r\n" in req and req.endswith(b'\r\n\r\n{"x": [1, 2]}')
        assert b"Content-Length" not in srv.requests[1] and b"Content-Type" not in srv.requests[1]
    finally:
        p.close()
        srv.close()


def test_api_key_with_a_line_break_is_refused():
    with pytest.raises(ValueError, match="line break"):
        pool(api_key="sk\r\nX-Evil: 1")


def test_chunked_answer_with_extensions_and_trailers():
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;name=value\r\n[1, \r\n"
        b"6\r\n2, 3]\n\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    srv = Scripted([body, ok(b"next")], pieces=7)
    p = pool()
    try:
        assert p.send("GET", srv.url, "/a", None).data == b"[1, 2, 3]\n"
        assert p.send("GET", srv.url, "/b", None).data == b"next"  # left in step
        assert srv.accepted == 1
    finally:
        p.close()
        srv.close()


@pytest.mark.parametrize(
    "reply, data",
    [
        # no length: the body ends when the server closes
        (("close", b"HTTP/1.1 200 OK\r\n\r\nuntil the end"), b"until the end"),
        (("close", ok(b"x", "Connection: close")), b"x"),
        (("close", ok(b"old", version="HTTP/1.0")), b"old"),
    ],
)
def test_answers_that_close_the_connection(reply, data):
    """The answer is read whole, and the next request opens a new connection."""
    srv = Scripted([reply, ok(b"second")])
    p = pool()
    try:
        assert p.send("GET", srv.url, "/a", None).data == data
        assert p.send("GET", srv.url, "/b", None).data == b"second"
        assert srv.accepted == 2
    finally:
        p.close()
        srv.close()


def test_interim_bodyless_and_error_answers():
    srv = Scripted(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100"),
            b"HTTP/1.1 204 No Content\r\n\r\n",
            ok(b'{"error": {"message": "full"}}', "Retry-After: 2", status="429 Too Many"),
            ok(b"last"),
        ]
    )
    p = pool()
    try:
        assert p.send("GET", srv.url, "/a", None).data == b"after 100"
        assert p.send("GET", srv.url, "/b", None).status == 204
        a = p.send("GET", srv.url, "/c", None)
        assert (a.status, a.retry_after) == (429, 2.0)
        assert p.send("GET", srv.url, "/d", None).data == b"last"
        assert srv.accepted == 1
    finally:
        p.close()
        srv.close()


@pytest.mark.parametrize(
    "reply",
    [
        ("close", b""),  # what a stale keep-alive connection gives
        ("close", ok(b"0123456789")[:-4]),  # closed inside the body
        ("close", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
        ("close", b"SSH-2.0-OpenSSH\r\n\r\n"),  # not HTTP
        ("close", b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000),  # a head without end
        ("close", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ],
)
def test_broken_answers_are_transport_errors_not_timeouts(reply):
    """Every broken answer raises one of TRANSPORT_ERRORS (the client retries them as
    "connection error"), none of them taken for a timeout."""
    srv = Scripted([reply])
    p = pool()
    try:
        with pytest.raises(TRANSPORT_ERRORS) as e:
            p.send("POST", srv.url, "/generate", b"{}")
        assert not is_timeout(e.value), repr(e.value)
    finally:
        p.close()
        srv.close()


def test_a_silent_server_times_out_and_a_refused_one_does_not():
    srv = Scripted([("silent", 2.0)])
    p = pool()
    try:
        t0 = time.monotonic()
        with pytest.raises(TRANSPORT_ERRORS) as e:
            p.send("POST", srv.url, "/generate", b"{}", timeout=0.3)
        assert is_timeout(e.value) and time.monotonic() - t0 < 1.5
    finally:
        srv.close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TRANSPORT_ERRORS) as e:
        p.send("GET", f"http://127.0.0.1:{port}", "/x", None)
    assert not is_timeout(e.value) and "refused" in str(e.value).lower()
    p.close()


def test_proxy_variables_are_not_used(monkeypatch):
    """HTTP(S)_PROXY pointing nowhere: the request still goes straight to the server."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    srv = Scripted([ok(b"direct")])
    p = pool()
    try:
        assert p.send("GET", srv.url, "/x", None).data == b"direct"
        assert srv.requests[0].startswith(b"GET /x HTTP/1.1")  # not a proxy's absolute URL
    finally:
        p.close()
        srv.close()


def test_a_path_prefix_is_kept():
    srv = Scripted([ok(b"[]")])
    p = pool()
    try:
        p.send("GET", srv.url + "/sglang/a", "/generate", None)
        assert srv.requests[0].startswith(b"GET /sglang/a/generate HTTP/1.1")
    finally:
        p.close()
        srv.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_literal_urls():
    """`http://[::1]:port`: the pool connects to the address, Host keeps the brackets."""
    try:
        srv = Scripted([ok(b"six")], host="::1")
    except OSError as e:  # IPv6 compiled in but not configured on loopback
        pytest.skip(f"no IPv6 loopback: {e}")
    p = pool(max_idle=1)
    try:
        assert p.send("GET", srv.url, "/x", None).data == b"six"
        assert f"Host: [::1]:{srv.port}\r\n".encode() in srv.requests[0]
    finally:
        p.close()
        srv.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_verifies_and_talks(tmp_path, monkeypatch):
    """TLS with the default verifying store: a server whose certificate is not trusted is
    refused; trusted (via SSL_CERT_FILE), it answers on one kept-alive connection."""
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
        with pytest.raises(TRANSPORT_ERRORS) as e:
            pool().send("GET", srv.url, "/x", None)
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        p = pool()
        assert p.send("GET", srv.url, "/x", None).data == b"secret"
        assert p.send("GET", srv.url, "/y", None).data == b"again"
        assert srv.accepted == 2  # the refused handshake, then one connection
        p.close()
    finally:
        srv.close()


# ------------------------------------------------------------- through SGLangClient


@pytest.mark.parametrize("status", ["408 Request Timeout", "429 Too Many Requests"])
def test_408_and_429_are_retried_after_retry_after(status):
    """A 408/429 is retried after the server's Retry-After (here 0.5 s, above the 0.01 s
    backoff): the same connection, the answer of the second attempt."""
    srv = Scripted([ok(b'{"error": {"message": "busy"}}', "Retry-After: 0.5", status=status),
                    ok(b'{"fine": true}')])  # fmt: skip
    try:
        with SGLangClient([srv.url], backoff_seconds=0.01, max_retries=1) as c:
            t0 = time.monotonic()
            assert c.request("GET", "/x")[0] == {"fine": True}
            assert time.monotonic() - t0 >= 0.45
        assert len(srv.requests) == 2
    finally:
        srv.close()


def test_4xx_refused_or_returned_with_refused_ok():
    """A 400 is not retried: an error naming URL, path, status and message, or with
    `refused_ok` the decoded answer for the caller to read."""
    refusal = ok(b'{"success": false, "message": "bad weights"}', status="400 Bad Request")
    srv = Scripted([refusal, refusal])
    try:
        with SGLangClient([srv.url], backoff_seconds=0.01, max_retries=3) as c:
            with pytest.raises(TeacherError) as e:
                c.request("POST", "/update_weights_from_disk", {}, label="weight update")
            msg = str(e.value)
            assert srv.url + "/update_weights_from_disk" in msg and "HTTP 400" in msg, msg
            assert "weight update was refused" in msg and "bad weights" in msg
            got, url = c.request("POST", "/update_weights_from_disk", {}, refused_ok=True)
            assert got == {"success": False, "message": "bad weights"} and url == srv.url
        assert len(srv.requests) == 2
    finally:
        srv.close()


def test_a_dropped_answer_is_retried_as_a_connection_error():
    srv = Scripted([("close", b""), ok(b"[1]")])
    try:
        with SGLangClient([srv.url], backoff_seconds=0.01, max_retries=1, api_key="k") as c:
            assert c.request("GET", "/x")[0] == [1]
        assert srv.accepted == 2
        assert all(b"Authorization: Bearer k\r\n" in r for r in srv.requests)
    finally:
        srv.close()
    with SGLangClient([srv.url], backoff_seconds=0.01, max_retries=0) as c:
        with pytest.raises(TeacherError) as e:
            c.request("GET", "/x", label="probe")
    msg = str(e.value)
    assert srv.url + "/x: probe failed after 1 attempt" in msg and "connection error" in msg
