"""The SGLang client, teacher and rollout backends over real HTTP, with injected faults.

Faults come from a proxy (`FlakyProxy`) between the client and an in-process server:
500s and dropped connections are retried and give the same results as a clean run;
malformed answers (wrong length, null, NaN, +inf, wrong ids, no leading null) are errors
naming the request; a slow server times out; a down teacher is named with its URL and
domain after the configured retries.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from sglang_helpers import (
    FlakyProxy,
    InProcessServer,
    random_seqs,
    reference_logprobs,
    scoring_item,
)

from megatron_mopd.config import RolloutConfig, TeacherConfig
from megatron_mopd.errors import TeacherError
from megatron_mopd.rollout.sglang import SGLangRolloutEngine
from megatron_mopd.sglang.client import SGLangClient
from megatron_mopd.teachers.sglang import SGLangTeacher
from megatron_mopd.toy.tiny import make_tiny_hf_model
from megatron_mopd.types import SamplingParams, ScoreRequest

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("m") / "teacher"), seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = InProcessServer(model_dir, seed=0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def seqs():
    return random_seqs(12, 2, 24, seed=11)


@pytest.fixture(scope="module")
def clean(server, seqs):
    """A clean run, one request at a time: the server then batches exactly what each
    request holds, so a run with the same requests gives bit-identical floats."""
    with SGLangClient([server.url], max_in_flight=1) as c:
        return c.score(seqs, batch_size=3)


def close(a, b, tol=TOL):
    """Same log-probs up to `tol` (batch composition changes the float rounding)."""
    return len(a) == len(b) and all(
        len(x.logprobs) == len(y.logprobs)
        and all(abs(p - q) < tol for p, q in zip(x.logprobs, y.logprobs))
        for x, y in zip(a, b)
    )


@pytest.fixture
def proxy_factory(server):
    proxies = []

    def make(plan=None, target=None):
        p = FlakyProxy(target or server.url, plan)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()


def fast_client(urls, **kw):
    kw.setdefault("backoff_seconds", 0.01)
    kw.setdefault("max_in_flight", 4)
    return SGLangClient(urls, **kw)


# ----------------------------------------------------------------------------- correct


def test_score_matches_transformers(clean, seqs, model_dir):
    ref = reference_logprobs(model_dir, seqs)
    for s, r, got in zip(seqs, ref, clean):
        assert len(got.logprobs) == len(s) - 1
        assert max((abs(a - b) for a, b in zip(got.logprobs, r)), default=0) < TOL


def test_batches_are_concurrent_and_ordered(server, seqs, clean, proxy_factory):
    proxy = proxy_factory(lambda n, m, p: ("sleep", 0.2))
    with fast_client([proxy.url], max_in_flight=4) as c:
        t = time.monotonic()
        out = c.score(seqs, batch_size=3)
        elapsed = time.monotonic() - t
    assert proxy.count() == 4
    assert elapsed < 0.75  # 4 requests of >= 0.2 s each, in flight together
    assert close(out, clean)
    body = proxy.seen[0][2]
    assert body["sampling_params"]["max_new_tokens"] == 0 and body["return_logprob"] is True
    assert len(body["input_ids"]) == 3 and body["logprob_start_len"] == 0


def test_response_starts_and_top_k(server, seqs, model_dir):
    ref = reference_logprobs(model_dir, seqs)
    starts = [max(1, len(s) // 2) for s in seqs]
    with fast_client([server.url]) as c:
        out = c.score(seqs, starts=starts, top_k=2, batch_size=5)
    for s, st, r, o in zip(seqs, starts, ref, out):
        assert len(o.logprobs) == len(s) - st
        assert max((abs(a - b) for a, b in zip(o.logprobs, r[st - 1 :])), default=0) < TOL
        assert o.top_ids.shape == o.top_logprobs.shape == (len(o.logprobs), 2)
        assert o.top_ids.dtype == torch.int64 and o.top_logprobs.dtype == torch.float32
        for lp, tops in zip(o.logprobs, o.top_logprobs.tolist()):
            assert tops[0] >= lp - TOL and tops[0] >= tops[1]


def test_round_robin_over_urls(server, seqs, clean, proxy_factory):
    """Equal servers share the work; one at a time, they alternate exactly."""
    a, b = proxy_factory(), proxy_factory()
    with fast_client([a.url, b.url]) as c:
        out = c.score(seqs, batch_size=2)
    assert a.count() + b.count() == 6 and min(a.count(), b.count()) >= 1
    assert close(out, clean)
    before = a.count(), b.count()
    with fast_client([a.url, b.url], max_in_flight=1) as c:
        assert close(c.score(seqs, batch_size=2), clean)
    assert (a.count() - before[0], b.count() - before[1]) == (3, 3)


def test_a_slow_replica_gets_less(server, seqs, clean, proxy_factory):
    """Each request goes to the server with the fewest in flight: a replica much slower
    gets a small share instead of round robin's half."""
    slow = proxy_factory(lambda n, m, p: ("sleep", 1.0))
    fast = proxy_factory()
    with fast_client([slow.url, fast.url], max_in_flight=4) as c:
        out = c.score(seqs, batch_size=1)  # 12 requests
    assert close(out, clean)
    assert slow.count() + fast.count() == 12 and slow.count() <= 4, (slow.count(), fast.count())


def test_a_dead_replica_is_skipped_then_retried(server, seqs, clean, proxy_factory):
    """Of two URLs, one drops every request: after its first failure it cools down and
    the other serves everything, without backoff sleeps (one retry each is enough); once
    the replica answers again it gets its share back."""
    state = {"dead": True}
    a = proxy_factory(lambda n, m, p: "drop" if state["dead"] else None)
    b = proxy_factory()
    with fast_client([a.url, b.url], max_retries=1, max_in_flight=1, cooldown_seconds=0.05,
                     backoff_seconds=5.0) as c:  # fmt: skip
        t0 = time.monotonic()
        out = c.score(seqs, batch_size=1)  # 12 requests
        assert time.monotonic() - t0 < 5.0  # no 5 s backoff was slept
        assert close(out, clean)
        assert b.count() == 12 and a.count() <= 2  # round robin alone: 6 to each
        state["dead"] = False
        time.sleep(1.6)  # past any cooldown (at most 30 x 0.05 s)
        seen = a.count()
        assert close(c.score(seqs, batch_size=1), clean)
        assert a.count() - seen >= 5  # back in the rotation


def test_a_hung_replica_costs_one_timeout(server, seqs, clean, proxy_factory):
    """A replica that hangs on everything: one request times out on it; after that each
    cooldown ends with a short `/health` probe (which times out too), never with work
    sent to it, so no other request waits for the full timeout."""
    a = proxy_factory(lambda n, m, p: ("sleep", 3.0))
    b = proxy_factory()
    with fast_client([a.url, b.url], max_retries=1, max_in_flight=1, timeout=1.0,
                     connect_timeout=0.1, cooldown_seconds=0.05) as c:  # fmt: skip
        out = c.score(seqs, batch_size=1)  # 12 requests, cooldowns end during the run
    assert close(out, clean)
    assert a.count("/generate") == 1 and a.count("/health") >= 1
    assert b.count() == 12


def test_teacher_scores_response_tokens(server, seqs, model_dir):
    ref = reference_logprobs(model_dir, seqs)
    cfg = TeacherConfig(backend="sglang", domains=["math"], urls=[server.url], batch_size=4)
    teacher = SGLangTeacher("math_teacher", cfg)
    try:
        reqs = [ScoreRequest(s, max(1, len(s) - 3)) for s in seqs]
        res = teacher.score(reqs)
        for req, r, out in zip(reqs, ref, res):
            want = r[req.response_start - 1 :]
            assert len(out.logprobs) == len(req.input_ids) - req.response_start
            assert max((abs(a - b) for a, b in zip(out.logprobs, want)), default=0) < TOL
        topk = teacher.score(reqs[:2], top_k=3)
        assert topk[0].top_ids.shape == (len(topk[0].logprobs), 3)
    finally:
        teacher.close()


def test_rollout_engine_generate_and_update_weights(server, model_dir, tmp_path):
    srv = InProcessServer(model_dir, seed=0)
    cfg = RolloutConfig(backend="sglang", urls=[srv.url], batch_size=2, retry_backoff_seconds=0.01)
    engine = SGLangRolloutEngine(cfg)
    try:
        prompts = [[1, 10, 11], [1, 12], [1, 10, 11]]
        sp = SamplingParams(max_new_tokens=5, seed=3)
        rolls = engine.generate(prompts, sp)
        assert [r.response_ids for r in engine.generate(prompts, sp)] == [
            r.response_ids for r in rolls
        ]  # seeded
        assert rolls[0].response_ids != rolls[2].response_ids or len(rolls[0].response_ids) < 3
        for p, r in zip(prompts, rolls):
            assert r.prompt_ids == p and len(r.rollout_logprobs) == len(r.response_ids)
            assert r.finish_reason in ("stop", "length") and r.weight_version == "default"
            ref = reference_logprobs(model_dir, [p + r.response_ids])[0][len(p) - 1 :]
            assert max(abs(a - b) for a, b in zip(r.rollout_logprobs, ref)) < TOL
        unseeded = engine.generate(prompts[:2], SamplingParams(max_new_tokens=3))
        assert len(unseeded) == 2
        assert engine.weight_version == "default"
        other = make_tiny_hf_model("qwen3_moe", str(tmp_path / "new"), seed=9)
        engine.update_weights_from_disk(other, "7")
        assert engine.weight_version == "7"
        again = engine.generate(prompts[:1], sp)[0]
        assert again.weight_version == "7"
        ref = reference_logprobs(other, [prompts[0] + again.response_ids])[0][2:]
        assert max(abs(a - b) for a, b in zip(again.rollout_logprobs, ref)) < TOL
    finally:
        engine.close()
        srv.stop()


def test_rollout_engine_streams_pieces_equal_to_generate(server, model_dir):
    """generate_stream: pieces of >= batch_size prompts (the last may be smaller) covering
    every prompt once, as requests complete; joined in index order they equal generate's
    rollouts (seeds are the whole call's, whatever the completion order)."""
    srv = InProcessServer(model_dir, seed=0)
    cfg = RolloutConfig(backend="sglang", urls=[srv.url], batch_size=3)
    engine = SGLangRolloutEngine(cfg)
    try:
        prompts = [[1, 10 + i % 4, 11] for i in range(10)]
        sp = SamplingParams(max_new_tokens=4, seed=5)
        pieces = list(engine.generate_stream(prompts, sp))
        sizes = [len(idx) for idx, _ in pieces]
        assert sorted(i for idx, _ in pieces for i in idx) == list(range(10))
        assert all(n >= 3 for n in sizes[:-1]) and sum(sizes) == 10 and len(pieces) > 1
        joined = dict(i_r for idx, rolls in pieces for i_r in zip(idx, rolls))
        want = engine.generate(prompts, sp)
        assert [joined[i].response_ids for i in range(10)] == [r.response_ids for r in want]
        assert [joined[i].prompt_ids for i in range(10)] == prompts
        assert list(engine.generate_stream([], sp)) == []
    finally:
        engine.close()
        srv.stop()


# ----------------------------------------------------------------------------- faults


def test_500_and_dropped_connections_are_retried(server, seqs, clean, proxy_factory):
    bad = {0: "500", 2: "drop", 3: "500", 5: "drop"}
    proxy = proxy_factory(lambda n, m, p: bad.get(n))
    with fast_client([proxy.url], max_retries=3, max_in_flight=1) as c:
        out = c.score(seqs, batch_size=3)
    assert proxy.count() == 4 + len(bad)
    assert [o.logprobs for o in out] == [o.logprobs for o in clean]  # bit-identical


def test_retries_exhausted_name_the_url(proxy_factory):
    proxy = proxy_factory(lambda n, m, p: "500")
    with fast_client([proxy.url], max_retries=2) as c, pytest.raises(TeacherError) as e:
        c.score([[1, 2, 3]])
    assert proxy.count() == 3
    assert proxy.url in str(e.value) and "HTTP 500" in str(e.value) and "3 attempt" in str(e.value)


def test_4xx_is_not_retried(server):
    with fast_client([server.url], max_retries=3) as c, pytest.raises(TeacherError) as e:
        c.score([[1, 500, 3]])
    assert "HTTP 400" in str(e.value) and "token id 500" in str(e.value)


def _mutate_entry(seq_index, token, value):
    def fn(body):
        body[seq_index]["meta_info"]["input_token_logprobs"][token][0] = value
        return body

    return fn


def _drop_last(body):
    body[1]["meta_info"]["input_token_logprobs"].pop()
    return body


def _no_leading_null(body):
    body[0]["meta_info"]["input_token_logprobs"][0][0] = -1.0
    return body


def _wrong_id(body):
    body[2]["meta_info"]["input_token_logprobs"][2][1] += 1
    return body


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (_drop_last, "sequence 4: 5 input_token_logprobs"),
        (_mutate_entry(0, 2, None), "sequence 3: token 2"),
        (_mutate_entry(1, 1, float("nan")), "has log-prob nan"),
        (_mutate_entry(2, 3, float("inf")), "has log-prob inf"),
        (_mutate_entry(2, 3, 0.5), "has log-prob 0.5"),
        (_no_leading_null, "leading null"),
        (_wrong_id, "answer is for id"),
    ],
)
def test_malformed_answers_are_errors(server, proxy_factory, mutate, needle):
    seqs = [[1, 2, 3, 4, 5, 6]] * 6
    proxy = proxy_factory(lambda n, m, p: ("mutate", mutate) if n == 1 else None)
    with fast_client([proxy.url], max_in_flight=1) as c, pytest.raises(TeacherError) as e:
        c.score(seqs, batch_size=3)
    msg = str(e.value)
    assert needle in msg and proxy.url in msg and "sequences 3..5" in msg, msg


def test_malformed_answer_fails_the_teacher(server, proxy_factory):
    proxy = proxy_factory(lambda n, m, p: ("mutate", _mutate_entry(0, 2, float("nan"))))
    cfg = TeacherConfig(backend="sglang", domains=["code"], urls=[proxy.url])
    teacher = SGLangTeacher("coder", cfg, wait=False)
    with pytest.raises(TeacherError) as e:
        teacher.score([ScoreRequest([1, 2, 3, 4], 1)])
    assert "'coder'" in str(e.value) and "code" in str(e.value) and "nan" in str(e.value)


def test_slow_server_times_out(proxy_factory):
    proxy = proxy_factory(lambda n, m, p: ("sleep", 1.5))
    with (
        fast_client([proxy.url], timeout=0.3, max_retries=1) as c,
        pytest.raises(TeacherError) as e,
    ):
        t = time.monotonic()
        c.score([[1, 2, 3]])
    assert time.monotonic() - t < 1.4
    assert "timed out after 0.3 s" in str(e.value) and proxy.url in str(e.value)


def test_down_teacher_is_named_with_url_and_domain():
    from sglang_helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = TeacherConfig(
        backend="sglang",
        domains=["math", "physics"],
        urls=[url],
        max_retries=2,
        retry_backoff_seconds=0.01,
    )
    teacher = SGLangTeacher("math_teacher", cfg, wait=False)
    with pytest.raises(TeacherError) as e:
        teacher.score([ScoreRequest([1, 2, 3], 1)])
    msg = str(e.value)
    assert "'math_teacher'" in msg and "math, physics" in msg and url in msg
    assert "3 attempt" in msg and "connection error" in msg
    # and at start-up: the health wait names it too
    cfg.startup_timeout_seconds = 0.5
    with pytest.raises(TeacherError) as e:
        SGLangTeacher("math_teacher", cfg)
    assert "health_generate" in str(e.value) and url in str(e.value)


def test_wait_healthy_waits_for_loading(model_dir):
    """/health_generate is 503 while the model loads; wait_healthy waits it out."""
    import threading

    import httpx

    from megatron_mopd.server.app import SGLangCompatibleServer

    srv = SGLangCompatibleServer(model_dir, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()  # not loaded yet
    try:
        assert httpx.get(srv.url + "/health_generate", timeout=5).status_code == 503
        threading.Timer(0.3, srv.load).start()
        with fast_client([srv.url]) as c:
            c.wait_healthy(timeout=60, interval=0.05)
            out = c.score([[1, 2, 3]])
        assert len(out[0].logprobs) == 2 and all(math.isfinite(x) for x in out[0].logprobs)
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------- checks, HTTP


@pytest.mark.parametrize(
    "bad, needle",
    [
        (None, "has log-prob None"),
        (float("nan"), "has log-prob nan"),
        (float("inf"), "has log-prob inf"),
        (float("-inf"), "has log-prob -inf"),
        (0.5, "has log-prob 0.5"),
        ("x", "has log-prob 'x'"),
        ("id", "answer is for id"),
        ("short", "malformed entry"),
    ],
)
def test_bulk_check_names_the_first_bad_token(bad, needle):
    """The bulk (C-level) check of a long answer rejects every kind of bad entry, and the
    error names the sequence and the *first* bad token, wherever it is."""
    from megatron_mopd.sglang.answers import check_scored

    ids = [4 + (7 * i) % 120 for i in range(300)]
    good = scoring_item(ids, 9)
    got = check_scored(good, "http://u", "req", 0, 42, ids, 9, 10, 0).logprobs
    assert got == [e[0] for e in good["meta_info"]["input_token_logprobs"][1:]]
    for first in (10, 150, 299):  # token positions (entry = position - 9)
        item = scoring_item(ids, 9)
        entries = item["meta_info"]["input_token_logprobs"]
        for pos in (first, min(first + 5, 299)):  # a second bad one after the first
            e = entries[pos - 9]
            if bad == "id":
                e[1] += 1
            elif bad == "short":
                del e[1:]
            else:
                e[0] = bad
        with pytest.raises(TeacherError) as err:
            check_scored(item, "http://u", "req", 0, 42, ids, 9, 10, 0)
        msg = str(err.value)
        assert f"sequence 42: token {first}" in msg and needle in msg and "http://u" in msg, msg
    # entries before the sequence's own start are not its log-probs: not checked
    item = scoring_item(ids, 9)
    item["meta_info"]["input_token_logprobs"][3][0] = float("nan")
    assert len(check_scored(item, "http://u", "req", 0, 42, ids, 9, 20, 0).logprobs) == 280


def test_a_server_off_the_fast_path_is_named_once(server, seqs, clean, proxy_factory, caplog):
    """Answers the fast path does not take (here: token texts in the third fields, as
    with `return_text_in_logprobs`) are right but slower to check: one warning names
    the server, however many answers it sends."""

    def with_texts(body):
        for item in body:
            for e in item["meta_info"]["input_token_logprobs"]:
                e[2] = "t"
        return body

    proxy = proxy_factory(lambda n, m, p: ("mutate", with_texts))
    with caplog.at_level("WARNING", logger="megatron_mopd.sglang.answers"):
        with fast_client([proxy.url], max_in_flight=1) as c:
            out = c.score(seqs, batch_size=3)  # 4 answers
    assert [o.logprobs for o in out] == [o.logprobs for o in clean]
    warned = [r.getMessage() for r in caplog.records if "compact JSON layout" in r.getMessage()]
    assert len(warned) == 1 and proxy.url in warned[0]


def test_scoring_takes_the_fast_path_on_our_server(server, seqs, monkeypatch):
    """Answers of `mopd serve` (orjson, like SGLang) are decoded by the fast path, with and
    without top-k, and give exactly what the full decoding gives."""
    from megatron_mopd.sglang import answers as sglang_answers

    taken = []
    real = sglang_answers.fast_scored
    monkeypatch.setattr(
        sglang_answers, "fast_scored", lambda *a: taken.append(real(*a)) or taken[-1]
    )
    starts = [max(1, len(s) // 2) for s in seqs]
    with SGLangClient([server.url], max_in_flight=1) as c:
        fast = [c.score(seqs, starts, top_k=k, batch_size=4) for k in (0, 3)]
        assert len(taken) == 6 and all(t is not None for t in taken)
        monkeypatch.setattr(sglang_answers, "fast_scored", lambda *a: None)
        slow = [c.score(seqs, starts, top_k=k, batch_size=4) for k in (0, 3)]
    plain = [[(o.logprobs, _tolist(o.top_ids), _tolist(o.top_logprobs)) for o in k] for k in fast]
    assert plain == [
        [(o.logprobs, _tolist(o.top_ids), _tolist(o.top_logprobs)) for o in k] for k in slow
    ]
    assert all(o.top_ids.shape == (len(o.logprobs), 3) for o in fast[1])
    assert all(len(o.logprobs) == len(s) - st for o, s, st in zip(fast[1], seqs, starts))


def _tolist(t):
    return None if t is None else t.tolist()


class _CountingServer:
    """A stub HTTP/1.1 server answering `[]`, recording the client port of each request;
    with `close_after`, it closes each connection after answering (no `Connection:
    close` header: the client learns it only from the socket)."""

    def __init__(self, close_after: bool = False):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.ports: list[int] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                srv.ports.append(self.client_address[1])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")
                self.close_connection = close_after

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.mark.parametrize("close_after", [False, True])
def test_connections_are_kept_alive_and_stale_ones_dropped(close_after):
    """Requests reuse one connection; one the server closed while idle is not reused (no
    retry is spent on it: max_retries=0)."""
    stub = _CountingServer(close_after)
    try:
        with fast_client([stub.url], max_retries=0) as c:
            for _ in range(4):
                assert c.request("GET", "/x")[0] == []
                time.sleep(0.05)  # lets a close by the server arrive
        assert len(stub.ports) == 4
        assert len(set(stub.ports)) == (4 if close_after else 1)
    finally:
        stub.stop()


# ----------------------------------------------------------------------------- GPU paths


@pytest.mark.gpu
def test_weight_sync_against_real_sglang():
    """On a GPU node: MOPD_SGLANG_URL points at a real SGLang server of MOPD_SGLANG_MODEL.
    Exercises update_weights_from_tensor with CUDA IPC handles and the NCCL init +
    update_weights_from_distributed path end to end (on CPU, tests/test_real_weight_sync.py
    runs both against real SGLang with shared memory and gloo)."""
    import os

    import torch

    url, model = os.environ.get("MOPD_SGLANG_URL"), os.environ.get("MOPD_SGLANG_MODEL")
    if not (torch.cuda.is_available() and url and model):
        pytest.skip("needs CUDA, MOPD_SGLANG_URL and MOPD_SGLANG_MODEL")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model).cuda()
    engine = SGLangRolloutEngine(RolloutConfig(backend="sglang", urls=[url]))
    named = [(n, p.detach()) for n, p in hf.named_parameters()]
    engine.update_weights_from_tensor([named], "tensor-1")
    assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].weight_version == (
        "tensor-1"
    )
    engine.init_weights_update_group("127.0.0.1", 29555, backend="nccl")
    engine.update_weights_from_distributed([named], "nccl-1")
    assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].weight_version == (
        "nccl-1"
    )
