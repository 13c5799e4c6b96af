"""The real sglang-router (a server we did not write) in front of two of our servers.

The SGLang client, `SGLangTeacher`, `SGLangRolloutEngine` and `mopd score` go through it
over HTTP exactly as they would on a GPU cluster. Skipped, with the reason, when the
router cannot start here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sglang_helpers import (
    REPO,
    FlakyProxy,
    InProcessServer,
    random_seqs,
    reference_logprobs,
    start_router,
)

from megatron_mopd.config import RolloutConfig, TeacherConfig
from megatron_mopd.rollout.sglang import SGLangRolloutEngine
from megatron_mopd.sglang.client import SGLangClient
from megatron_mopd.teachers.sglang import SGLangTeacher
from megatron_mopd.toy.tiny import make_tiny_hf_model
from megatron_mopd.types import SamplingParams, ScoreRequest

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model("llama", str(tmp_path_factory.mktemp("m") / "teacher"), seed=2)


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """Two servers, a counting proxy in front of each, the router in front of both."""
    servers = [InProcessServer(model_dir, seed=i) for i in range(2)]
    proxies = [FlakyProxy(s.url) for s in servers]
    log = str(tmp_path_factory.mktemp("router") / "router.log")
    router, url = start_router([p.url for p in proxies], log)
    try:
        if router is None:
            pytest.skip(url)
        yield url, proxies, servers
    finally:
        if router is not None:
            router.stop()
        for p in proxies:
            p.stop()
        for s in servers:
            s.stop()


def test_scoring_through_router(cluster, model_dir):
    url, proxies, _ = cluster
    seqs = random_seqs(16, 2, 30, seed=3)
    before = [p.count() for p in proxies]
    with SGLangClient([url], max_in_flight=4, backoff_seconds=0.05) as c:
        c.wait_healthy(30)
        out = c.score(seqs, starts=[1 + i % 2 for i in range(16)], top_k=1, batch_size=2)
    ref = reference_logprobs(model_dir, seqs)
    for i, (r, o) in enumerate(zip(ref, out)):
        assert max((abs(a - b) for a, b in zip(o.logprobs, r[i % 2 :])), default=0) < TOL
    spread = [p.count() - b for p, b in zip(proxies, before)]
    assert sum(spread) >= 8 and min(spread) >= 1, spread  # round robin over both workers


def test_teacher_and_rollout_through_router(cluster, model_dir, tmp_path):
    url, proxies, servers = cluster
    teacher = SGLangTeacher("t", TeacherConfig(backend="sglang", domains=["d"], urls=[url]))
    reqs = [ScoreRequest([1, 5, 6, 7, 8], 3), ScoreRequest([1, 9, 9], 1)]
    res = teacher.score(reqs)
    ref = reference_logprobs(model_dir, [r.input_ids for r in reqs])
    assert max(abs(a - b) for a, b in zip(res[0].logprobs, ref[0][2:])) < TOL
    teacher.close()

    cfg = RolloutConfig(backend="sglang", urls=[url], retry_backoff_seconds=0.05)
    engine = SGLangRolloutEngine(cfg)
    try:
        rolls = engine.generate([[1, 5], [1, 6], [1, 7]], SamplingParams(max_new_tokens=4, seed=1))
        assert all(len(r.rollout_logprobs) == len(r.response_ids) > 0 for r in rolls)
        # weight updates reach both workers (read from the router's GET /workers)
        assert sorted(engine.workers.urls) == sorted(p.url for p in proxies)
        new = make_tiny_hf_model("llama", str(tmp_path / "new"), seed=8)
        engine.update_weights_from_disk(new, "v2")
        assert all(s.server.engine.weight_version == "v2" for s in servers)
        rolls = engine.generate([[1, 5], [1, 6]], SamplingParams(max_new_tokens=3, seed=2))
        assert {r.weight_version for r in rolls} == {"v2"}
        engine.update_weights_from_disk(model_dir, "default")  # restore for other tests
    finally:
        engine.close()


def test_mopd_score_through_router(cluster, model_dir, tmp_path):
    url, _, _ = cluster
    seqs = random_seqs(5, 2, 12, seed=4)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    r = subprocess.run(
        [sys.executable, "-m", "megatron_mopd", "score", "--url", url,
         "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
         "--batch-size", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ref = reference_logprobs(model_dir, seqs)
    for want, line in zip(ref, (tmp_path / "out.jsonl").read_text().splitlines()):
        got = json.loads(line)["logprobs"]
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < TOL
