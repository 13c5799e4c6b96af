"""The SGLang-compatible server (`mopd serve`) over real HTTP on loopback.

Log-probs must equal a plain transformers forward within 1e-5, laid out as SGLang lays
them out (SGLANG_API.md): a leading null, one `[logprob, id, text]` per token.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from sglang_helpers import (
    InProcessServer,
    random_seqs,
    raw_exchange,
    reference_logprobs,
    start_serve_subprocess,
)

from megatron_mopd.toy.tiny import make_tiny_hf_model

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("m") / "teacher"), seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = InProcessServer(model_dir, seed=0)
    yield srv
    srv.stop()


def post(url: str, body: dict, status: int = 200):
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def score_body(ids, start=0, top_k=0):
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": start,
        "top_logprobs_num": top_k,
    }


def test_scoring_matches_transformers(server, model_dir):
    seqs = random_seqs(5, 2, 40, seed=1)
    ref = reference_logprobs(model_dir, seqs)
    out = post(server.url, score_body(seqs))
    assert isinstance(out, list) and len(out) == len(seqs)
    for s, r, item in zip(seqs, ref, out):
        meta = item["meta_info"]
        entries = meta["input_token_logprobs"]
        assert len(entries) == len(s)
        assert entries[0][0] is None and entries[0][1] == s[0]  # the leading null
        assert [e[1] for e in entries] == s
        got = [e[0] for e in entries[1:]]
        assert max(abs(a - b) for a, b in zip(got, r)) < TOL
        assert meta["finish_reason"] == {"type": "length", "length": 0}
        assert meta["prompt_tokens"] == len(s) and meta["completion_tokens"] == 0
        assert meta["cached_tokens"] == 0 and meta["weight_version"] == "default"
        assert item["output_ids"] == [] and meta["output_token_logprobs"] == []


def test_single_request_and_start_offset(server, model_dir):
    s = random_seqs(1, 12, 12, seed=2)[0]
    ref = reference_logprobs(model_dir, [s])[0]
    item = post(server.url, score_body(s, start=5))
    entries = item["meta_info"]["input_token_logprobs"]
    # SGLang: entries from logprob_start_len on, the first one null even when start > 0
    assert len(entries) == len(s) - 5 and entries[0][0] is None
    assert [e[1] for e in entries] == s[5:]
    assert max(abs(e[0] - r) for e, r in zip(entries[1:], ref[5:])) < TOL
    # start == length: nothing; -1: output tokens only
    assert post(server.url, score_body(s, start=len(s)))["meta_info"]["input_token_logprobs"] == []
    assert post(server.url, score_body(s, start=-1))["meta_info"]["input_token_logprobs"] == []


def test_top_logprobs(server, model_dir):
    import transformers

    s = random_seqs(1, 10, 10, seed=3)[0]
    item = post(server.url, score_body(s, top_k=3))
    tops = item["meta_info"]["input_top_logprobs"]
    assert len(tops) == len(s) and tops[0] is None
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([s])).logits[0], -1)
    vals, ids = lp.topk(3, dim=-1)
    for i in range(1, len(s)):
        assert [e[1] for e in tops[i]] == ids[i - 1].tolist()
        assert max(abs(e[0] - v) for e, v in zip(tops[i], vals[i - 1].tolist())) < TOL


def _reference_full(model_dir, ids, temperature=1.0):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits / temperature, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_are_consistent(server, model_dir, temperature):
    prompts = [[1, 10, 11, 12], [1, 20]]
    body = {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": 6, "temperature": temperature, "sampling_seed": 7},
        "return_logprob": True,
    }
    out = post(server.url, body)
    again = post(server.url, body)
    for p, item, item2 in zip(prompts, out, again):
        ids = item["output_ids"]
        assert ids == item2["output_ids"]  # seeded: reproducible
        meta = item["meta_info"]
        assert [e[1] for e in meta["output_token_logprobs"]] == ids
        assert meta["completion_tokens"] == len(ids) and meta["prompt_tokens"] == len(p)
        assert meta["input_token_logprobs"] == []  # logprob_start_len -1: output only
        # SGLang: log_softmax(logits / temperature) of the sampled token
        lp = _reference_full(model_dir, p + ids, temperature)
        for t, e in enumerate(meta["output_token_logprobs"]):
            assert abs(e[0] - lp[len(p) + t - 1, ids[t]].item()) < TOL
        fr = meta["finish_reason"]
        assert fr == {"type": "length", "length": 6} or (
            fr["type"] == "stop" and fr["matched"] == ids[-1]
        )


def test_greedy_stop_token_and_batch_params(server, model_dir):
    prompt = [1, 30, 31]
    greedy = post(
        server.url,
        {"input_ids": prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 0}},
    )
    first = greedy["output_ids"][0]
    lp = _reference_full(model_dir, prompt)
    assert first == int(lp[-1].argmax())
    # stop at that token: it is kept, and finish_reason names it
    out = post(
        server.url,
        {
            "input_ids": [prompt, prompt],
            "sampling_params": [
                {"max_new_tokens": 5, "temperature": 0, "stop_token_ids": [first]},
                {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
            ],
            "return_logprob": True,
        },
    )
    assert out[0]["output_ids"] == [first]
    assert out[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert len(out[1]["output_ids"]) == 2
    # greedy: unscaled log-prob
    assert abs(out[0]["meta_info"]["output_token_logprobs"][0][0] - lp[-1, first].item()) < TOL


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"input_ids": [1, 999]}, "token id 999"),
        ({"input_ids": []}, "input_ids"),
        ({"text": None}, "exactly one"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        ({"input_ids": [1, 2], "stream": True}, "stream"),
        (
            {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5},
            "logprob_start_len",
        ),
        ({"input_ids": [[1, 2], [3]], "sampling_params": [{}]}, "sampling_params"),
    ],
)
def test_bad_requests_get_400(server, body, needle):
    r = httpx.post(server.url + "/generate", json=body, timeout=30)
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]


def test_not_json_and_unknown_path(server):
    r = httpx.post(server.url + "/generate", content=b"{nope", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/nope", timeout=30).status_code == 404


def refused(answer: bytes) -> tuple[int, str]:
    """(status, error message) of a raw answer that closes the connection."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert "Connection: close" in lines, lines
    return int(lines[0].split()[1]), json.loads(body)["error"]["message"]


def test_request_bodies_are_bounded(server, monkeypatch):
    """A body over the cap is refused with 413 before being read (the client announced
    1 GB and sent 10 bytes); chunked, non-numeric and short bodies get 4xx; each answer
    closes its connection and the server keeps serving."""
    monkeypatch.setattr(server.server, "max_body_bytes", 4096)
    post_head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
    cases = [
        (f"{post_head}\r\nContent-Length: {10**9}", b"0123456789", False, 413),
        (f"{post_head}\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n", False, 411),
        (f"{post_head}\r\nContent-Length: -5", b"", False, 400),
        (f"{post_head}\r\nContent-Length: 100", b'{"input_ids": [1', True, 400),
    ]
    messages = []
    for head, body, half_close, want in cases:
        status, message = refused(raw_exchange(server.url, head, body, half_close))
        assert status == want, (head, message)
        messages.append(message)
    assert messages[0] == (
        f"the request body has {10**9} bytes, more than this server accepts "
        "(4096 bytes, --max-body-bytes)"
    )
    assert "Content-Length" in messages[1] and "'-5'" in messages[2]
    assert messages[3] == "the body ended after 16 of 100 bytes"
    # a body at the cap is read (and parsed); the server still scores
    at_cap = json.dumps(score_body([1, 5, 9])).encode().ljust(4096)
    r = httpx.post(server.url + "/generate", content=at_cap, timeout=30)
    assert r.status_code == 200 and r.json()["meta_info"]["prompt_tokens"] == 3, r.text
    over = httpx.post(server.url + "/generate", content=at_cap + b" ", timeout=30)
    assert over.status_code == 413
    assert post(server.url, score_body([1, 5, 9]))["meta_info"]["prompt_tokens"] == 3


def test_control_endpoints(server, model_dir):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200
    info = httpx.get(server.url + "/model_info", timeout=30).json()
    assert info["model_path"] == model_dir and info["is_generation"] is True
    assert info["weight_version"] == "default"
    assert httpx.post(server.url + "/flush_cache", timeout=30).status_code == 200
    assert httpx.get(server.url + "/flush_cache", timeout=30).status_code == 200


def test_update_weights_from_disk(tmp_path, model_dir):
    other = make_tiny_hf_model("qwen3_moe", str(tmp_path / "other"), seed=5)
    srv = InProcessServer(model_dir)
    try:
        s = random_seqs(1, 16, 16, seed=4)[0]
        before = post(srv.url, score_body(s))["meta_info"]["input_token_logprobs"]
        r = httpx.post(
            srv.url + "/update_weights_from_disk",
            json={"model_path": other, "weight_version": "step-1"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        item = post(srv.url, score_body(s))
        after = item["meta_info"]["input_token_logprobs"]
        assert item["meta_info"]["weight_version"] == "step-1"
        assert max(abs(a[0] - b[0]) for a, b in zip(after[1:], before[1:])) > 1e-2
        ref = reference_logprobs(other, [s])[0]
        assert max(abs(a[0] - b) for a, b in zip(after[1:], ref)) < TOL
        info = httpx.get(srv.url + "/model_info", timeout=30).json()
        assert info["weight_version"] == "step-1" and info["model_path"] == other
        bad = httpx.post(
            srv.url + "/update_weights_from_disk", json={"model_path": str(tmp_path)}, timeout=30
        )
        assert bad.status_code == 400 and bad.json()["success"] is False
        assert "config.json" in bad.json()["message"]
    finally:
        srv.stop()


def test_concurrent_requests_share_batches(server, model_dir):
    """Concurrent single requests are batched by the server and answered correctly."""
    from concurrent.futures import ThreadPoolExecutor

    seqs = random_seqs(16, 5, 30, seed=9)
    ref = reference_logprobs(model_dir, seqs)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda s: post(server.url, score_body(s)), seqs))
    for r, item in zip(ref, outs):
        got = [e[0] for e in item["meta_info"]["input_token_logprobs"][1:]]
        assert max(abs(a - b) for a, b in zip(got, r)) < TOL


def test_mopd_serve_subprocess_health_and_sigterm(model_dir, tmp_path):
    """`mopd serve` as a process: healthy, scores, and exits 0 on SIGTERM."""
    proc, url = start_serve_subprocess(
        model_dir, str(tmp_path / "serve.log"), "--max-body-bytes", "2000"
    )
    try:
        # the flag's cap: 413 for a body over it, then the server keeps serving
        head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2001"
        assert refused(raw_exchange(url, head, b"{"))[0] == 413
        item = post(url, score_body([1, 5, 9]))
        assert item["meta_info"]["input_token_logprobs"][0][0] is None
        assert all(math.isfinite(e[0]) for e in item["meta_info"]["input_token_logprobs"][1:])
    finally:
        code = proc.stop()
    assert code == 0, proc.output()
    assert "stopped" in proc.output()
