"""Weight sync into real SGLang 0.5.23, every mode (`rollout.weight_sync`).

The session's server "w" (`conftest.real_sglang`, with `--api-key`) takes the updates;
a counting proxy in front of it sees every request. A TP2 Megatron student is synced
with `disk`, `tensor` (CPU shared memory) and `distributed` (a gloo group with the
server), in buckets of 0.1 MiB, and after each sync the server's log-probs equal
transformers' forward of the weights it should hold.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import REAL_API_KEY
from multirank import start_workers
from sglang_helpers import FlakyProxy, free_port, random_seqs, reference_logprobs
from sglang_real import post

from megatron_mopd.config import RolloutConfig
from megatron_mopd.rollout import sglang as sglang_rollout
from megatron_mopd.rollout.sglang import SGLangRolloutEngine
from megatron_mopd.rollout.weight_sync import buckets
from megatron_mopd.sglang.client import SGLangClient
from megatron_mopd.toy.tiny import make_tiny_hf_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "real_sync_cases.py")
BUCKET_MB = 0.1


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("MOPD_TEST_KEY", REAL_API_KEY)


@pytest.fixture
def server_w(real_sglang, key_env):
    """Server "w", set back to `model_a` after the test."""
    server = real_sglang["w"]
    yield server
    body = {"model_path": real_sglang["model_a"], "weight_version": "default"}
    assert post(server, "/update_weights_from_disk", body).status_code == 200


def test_buckets_group_in_order_under_the_limit():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5, 40])]
    got = [[name for name, _ in b] for b in buckets(iter(named), 25 * 4)]
    assert got == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"], ["t6"]]  # 30 and 40 alone


def test_flatten_bucket_copies_and_releases():
    """Each tensor lands at its aligned offset with its dtype and shape, and is released
    from the bucket once copied; back to back (align 0) there is no padding."""
    from megatron_mopd.rollout.sglang_transfer import flatten_bucket

    made = [
        ("a", torch.arange(6.0).view(2, 3)),
        ("b", torch.tensor([1, 2])),
        ("c", torch.ones(3, dtype=torch.bfloat16)),
    ]
    bucket = [(n, t.clone()) for n, t in made]
    flat, views = flatten_bucket(bucket, align=64, shared=True)
    assert bucket == [None, None, None] and flat.is_shared()
    for (name, view), (ref_name, ref) in zip(views, made):
        assert name == ref_name and view.dtype == ref.dtype and torch.equal(view, ref)
    assert [v.data_ptr() - flat.data_ptr() for _, v in views] == [0, 64, 128]
    flat, _ = flatten_bucket([("a", torch.ones(6)), ("b", torch.ones(3))], align=0, shared=False)
    assert flat.numel() == 36


@pytest.mark.multirank
def test_every_sync_mode_from_tp2(server_w, tmp_path):
    proxy = FlakyProxy(server_w.url)
    try:
        launch = start_workers(
            WORKER,
            nproc=2,
            args=["--hf", server_w.model_dir, "--run-dir", str(tmp_path / "run")]
            + ["--url", proxy.url, "--port", str(free_port()), "--bucket-mb", str(BUCKET_MB)],
            timeout=300,
        )
        rank0, _ = launch.wait()
    finally:
        proxy.stop()
    for step, mode in enumerate(("disk", "tensor", "distributed"), start=1):
        got = rank0[mode]
        print(f"{mode}: max |diff| {got['max_diff']:.2e}, {got['seconds']:.2f} s")
        assert got["version"] == (f"step_{step}",) * 3, mode
        assert got["max_diff"] < 1e-5, mode
    seen = [(path.split("?")[0], body) for _, path, body in proxy.seen]
    paths = [p for p, _ in seen]
    n_tensor = paths.count("/update_weights_from_tensor")
    dist = [b for p, b in seen if p == "/update_weights_from_distributed"]
    # the same buckets both ways, more than one, each within the limit (or one tensor)
    assert n_tensor == len(dist) > 1
    for body in dist:
        sizes = [torch.Size(s).numel() * 4 for s in body["shapes"]]
        assert sum(sizes) <= BUCKET_MB * 2**20 or len(sizes) == 1
        assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is False
    # each in-memory mode inside one session, then one flush after draining
    assert paths.count("/begin_weight_update") == paths.count("/end_weight_update") == 2
    assert paths.count("/flush_cache") == 3
    assert paths.count("/init_weights_update_group") == 1
    assert paths.count("/destroy_weights_update_group") == 1


def test_one_payload_per_server_tp_rank(server_w, monkeypatch):
    """`tensor` mode serialises each bucket once per server TP rank (CUDA IPC handles may
    not be deserialised twice); the TP1 server reads payload 0 of the 2."""
    calls = []
    real = sglang_rollout.serialize_named_tensors
    monkeypatch.setattr(
        sglang_rollout, "serialize_named_tensors", lambda b: calls.append(1) or real(b)
    )
    from safetensors.torch import load_file

    other = make_tiny_hf_model(
        "qwen3_moe", os.path.join(os.path.dirname(server_w.log_path), "o"), seed=9
    )
    named = list(load_file(os.path.join(other, "model.safetensors")).items())
    proxy = FlakyProxy(server_w.url)
    cfg = RolloutConfig(backend="sglang", urls=[proxy.url], api_key_env="MOPD_TEST_KEY")
    engine = SGLangRolloutEngine(cfg)
    try:
        engine.update_weights_from_tensor(buckets(iter(named), 2**18), "v2", tp_size=2)
    finally:
        engine.close()
        proxy.stop()
    bodies = [b for _, p, b in proxy.seen if p == "/update_weights_from_tensor"]
    assert len(calls) == 2 * len(bodies)
    assert all(len(b["serialized_named_tensors"]) == 2 for b in bodies)
    seqs = random_seqs(4, 3, 30, seed=8)
    with SGLangClient([server_w.url], api_key=REAL_API_KEY) as c:
        scored = c.score(seqs)
    ref = reference_logprobs(other, seqs)
    assert max(abs(a - b) for s, r in zip(scored, ref) for a, b in zip(s.logprobs, r)) < 1e-5


def test_update_while_requests_run_flushes_after_they_drain(server_w, real_sglang):
    """An update while a long generation runs: the weights change, and the prefix cache is
    flushed once the generation has finished (SGLang defers `/flush_cache?timeout=`), not
    refused as an update with `flush_cache: true` would be."""
    other = make_tiny_hf_model(
        "qwen3_moe", os.path.join(os.path.dirname(server_w.log_path), "o2"), seed=11
    )
    cfg = RolloutConfig(backend="sglang", urls=[server_w.url], api_key_env="MOPD_TEST_KEY")
    engine = SGLangRolloutEngine(cfg)
    done = {}

    def generate():
        long = {"max_new_tokens": 120, "temperature": 1.0, "ignore_eos": True}
        engine.client.generate([[1, 5, 9]], long)
        done["t"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(1.0)
    try:
        engine.update_weights_from_disk(other, "drained")
        returned = time.monotonic()
    finally:
        worker.join()
        engine.close()
    assert returned >= done["t"]  # the flush waited for the running request
    seqs = random_seqs(4, 3, 30, seed=12)
    with SGLangClient([server_w.url], api_key=REAL_API_KEY) as c:
        scored = c.score(seqs)
        assert c.model_info()["weight_version"] == "drained"
    ref = reference_logprobs(other, seqs)
    assert max(abs(a - b) for s, r in zip(scored, ref) for a, b in zip(s.logprobs, r)) < 1e-5
