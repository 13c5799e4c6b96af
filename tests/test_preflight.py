"""Tokenizer pre-flight: teachers must tokenize as the student does (teachers/preflight.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_mopd.errors import TeacherError
from megatron_mopd.teachers.preflight import (
    TokenizerMismatchError,
    check_server_tokenizer,
    compare_tokenizers,
    compare_with_server,
    load_tokenizer,
    probe_strings,
    server_status,
)
from megatron_mopd.toy.tiny import make_char_tokenizer


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    make_char_tokenizer(str(root / "student"), vocab_size=128)
    make_char_tokenizer(str(root / "same"), vocab_size=128)
    # same size, but 'é' takes the id the student leaves unused (<extra_0>)
    make_char_tokenizer(str(root / "accent"), extra_chars="é", vocab_size=128)
    make_char_tokenizer(str(root / "bigger"), vocab_size=130)
    return {k: load_tokenizer(str(root / k)) for k in ("student", "same", "accent", "bigger")}


def test_matching_tokenizers_pass(toks):
    compare_tokenizers(toks["student"], toks["same"], "math")
    probes = probe_strings(toks["student"])
    assert any("<eos>" in p for p in probes) and any("\t" in p for p in probes)
    assert any(any(ord(c) > 0x3000 for c in p) for p in probes)


def test_different_tokenizer_refused_naming_first_token(toks):
    with pytest.raises(TokenizerMismatchError) as e:
        compare_tokenizers(toks["student"], toks["accent"], "math")
    msg = str(e.value)
    assert msg.startswith("teacher 'math': tokenizer differs from the student's")
    idx = toks["accent"].convert_tokens_to_ids("é")
    assert f"id {idx} is '<extra_0>' for the student but 'é' for the teacher" in msg
    # the first probe with an 'é' ("naïve café ..."): 'é' is at position 9
    assert f"position 9: student id 3 ('<unk>') vs teacher id {idx} ('é')" in msg


def test_vocab_size_mismatch(toks):
    with pytest.raises(TokenizerMismatchError, match="vocabulary size student 128 vs teacher 130"):
        compare_tokenizers(toks["student"], toks["bigger"], "code")


def test_special_ids_mismatch(toks, tmp_path):
    make_char_tokenizer(str(tmp_path / "t"), vocab_size=128)
    other = load_tokenizer(str(tmp_path / "t"))
    other.eos_token = "<extra_0>"
    idx = other.convert_tokens_to_ids("<extra_0>")
    with pytest.raises(
        TokenizerMismatchError,
        match=rf"teacher 'code'.*eos_token_id student 2 \('<eos>'\) vs teacher {idx} \('<extra_0>'\)",
    ):
        compare_tokenizers(toks["student"], other, "code")


# ------------------------------------------------------------------------- over HTTP


class StubServer:
    """A minimal SGLang-like server: /health_generate, /model_info and text scoring with a
    given tokenizer, whose `tokenizer_path` is not readable here."""

    def __init__(self, tokenizer, healthy: bool = True):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/health_generate":
                    self._send(200 if stub.healthy else 503, {})
                elif self.path == "/model_info":
                    self._send(
                        200,
                        {
                            "model_path": "/cluster/models/teacher",
                            "tokenizer_path": "/cluster/models/teacher",
                            "is_generation": True,
                            "weight_version": "default",
                        },
                    )
                else:
                    self._send(404, {})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                texts = body["text"]
                out = []
                for text in texts if isinstance(texts, list) else [texts]:
                    ids = stub.tokenizer(text)["input_ids"]
                    names = stub.tokenizer.convert_ids_to_tokens(ids)
                    entries = [
                        [None if i == 0 else -1.0, t, n] for i, (t, n) in enumerate(zip(ids, names))
                    ]
                    out.append({"text": "", "meta_info": {"input_token_logprobs": entries}})
                self._send(200, out if isinstance(texts, list) else out[0])

        self.tokenizer, self.healthy, self.requests = tokenizer, healthy, []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_path_matches_and_refuses(toks):
    good, bad = StubServer(toks["same"]), StubServer(toks["accent"])
    try:
        info = server_status(good.url, timeout=10)
        assert info["tokenizer_path"] == "/cluster/models/teacher"
        how = check_server_tokenizer(toks["student"], good.url, "math", info, timeout=10)
        assert "probes tokenized by the server match" in how
        body = good.requests[-1]
        assert body["sampling_params"]["max_new_tokens"] == 0
        assert body["return_logprob"] is True and body["logprob_start_len"] == 0
        # one probe per request, `text` a string (sglang-router refuses a list with 422)
        assert [r["text"] for r in good.requests] == probe_strings(toks["student"])

        with pytest.raises(TokenizerMismatchError) as e:
            check_server_tokenizer(
                toks["student"], bad.url, "math", server_status(bad.url), timeout=10
            )
        idx = toks["accent"].convert_tokens_to_ids("é")
        assert "teacher 'math': tokenizer differs" in str(e.value)
        assert f"position 9: student id 3 ('<unk>') vs teacher at {bad.url} id {idx} ('é')" in str(
            e.value
        )
    finally:
        good.close()
        bad.close()


def test_proxy_variables_are_not_used(toks, monkeypatch):
    """As the SGLang client: with HTTP(S)_PROXY pointing nowhere, the checks still go
    straight to the server."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    good = StubServer(toks["same"])
    try:
        info = server_status(good.url, timeout=10)
        how = check_server_tokenizer(toks["student"], good.url, "math", info, timeout=10)
        assert "probes tokenized by the server match" in how
    finally:
        good.close()


def test_server_down_or_unhealthy_names_the_url(toks):
    stub = StubServer(toks["same"], healthy=False)
    try:
        with pytest.raises(TeacherError, match=rf"{stub.url}/health_generate answered HTTP 503"):
            server_status(stub.url, timeout=10)
    finally:
        stub.close()
    with pytest.raises(TeacherError, match=rf"{stub.url}/health_generate: ConnectError"):
        server_status(stub.url, timeout=2)


def test_server_status_waits_for_a_starting_server(toks):
    stub = StubServer(toks["same"], healthy=False)
    timer = threading.Timer(0.3, lambda: setattr(stub, "healthy", True))
    timer.start()
    try:
        assert server_status(stub.url, timeout=5, wait_seconds=20)["is_generation"] is True
    finally:
        timer.cancel()
        stub.close()


def test_mopd_serve_answers_text_probes(tmp_path, toks):
    """The project's own server (`mopd serve`) speaks both paths of the contract."""
    server_mod = pytest.importorskip("megatron_mopd.server.app")
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model("qwen3", str(tmp_path / "m"), seed=0)
    server = server_mod.SGLangCompatibleServer(hf, port=0)
    server.start(background_load=False)
    try:
        info = server_status(server.url, timeout=30)
        how = check_server_tokenizer(toks["student"], server.url, "t", info, timeout=30)
        assert "read locally" in how  # its tokenizer_path is this folder
        compare_with_server(toks["student"], server.url, "t", timeout=30)  # and over HTTP
        with pytest.raises(TokenizerMismatchError, match="position 9"):
            compare_with_server(toks["accent"], server.url, "t", timeout=30)
    finally:
        server.shutdown()
