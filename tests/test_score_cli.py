"""`mopd score`: JSONL in, log-probs out, from an SGLang-compatible server over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sglang_helpers import REPO, FlakyProxy, InProcessServer, free_port, random_seqs
from sglang_helpers import reference_logprobs as ref_lp

from megatron_mopd.toy.tiny import make_tiny_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model("qwen3", str(tmp_path_factory.mktemp("m") / "teacher"), seed=1)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = InProcessServer(model_dir)
    yield srv
    srv.stop()


def mopd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_mopd", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_score_writes_logprobs(server, model_dir, tmp_path):
    seqs = random_seqs(9, 1, 30, seed=5)
    write_jsonl(tmp_path / "in.jsonl", [{"input_ids": s} for s in seqs] + [""])
    # through a proxy that fails some requests: retried, same answer
    proxy = FlakyProxy(server.url, lambda n, m, p: "500" if n in (1, 3) else None)
    try:
        r = mopd(
            "score", "--url", proxy.url, "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out.jsonl"), "--batch-size", "2", "--top-k", "2",
        )  # fmt: skip
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == len(seqs)
    ref = ref_lp(model_dir, seqs)
    for s, want, line in zip(seqs, ref, lines):
        rec = json.loads(line)
        assert len(rec["logprobs"]) == len(s) - 1
        assert all(abs(a - b) < 1e-5 for a, b in zip(rec["logprobs"], want))
        assert len(rec["top_ids"]) == len(s) - 1 and all(len(t) == 2 for t in rec["top_ids"])
    assert "wrote 9 records" in r.stderr


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"input_ids": [1, 2]}', "{oops"], "in.jsonl:2: not valid JSON"),
        (['{"input_ids": [1, 2]}', "", '{"ids": [1]}'], 'in.jsonl:3: missing "input_ids"'),
        (['{"input_ids": [1, "a"]}'], "in.jsonl:1: \"input_ids\"[1]='a' is not an integer"),
        (['{"input_ids": []}'], 'in.jsonl:1: "input_ids" is empty'),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(server, tmp_path, lines, needle):
    write_jsonl(tmp_path / "in.jsonl", lines)
    r = mopd(
        "score", "--url", server.url, "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "out.jsonl"),
    )  # fmt: skip
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_file_and_server_errors(server, tmp_path):
    r = mopd("score", "--url", server.url, "--input", str(tmp_path / "nope.jsonl"),
             "--output", str(tmp_path / "o.jsonl"))  # fmt: skip
    assert r.returncode == 2 and "nope.jsonl: no such file" in r.stderr
    assert "Traceback" not in r.stderr
    write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1, 999]}])  # id outside the vocab
    r = mopd("score", "--url", server.url, "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "o.jsonl"))  # fmt: skip
    assert r.returncode == 2 and "HTTP 400" in r.stderr and "token id 999" in r.stderr
    assert "Traceback" not in r.stderr
    down = f"http://127.0.0.1:{free_port()}"
    r = mopd("score", "--url", down, "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "o.jsonl"), "--wait", "0.5")  # fmt: skip
    assert r.returncode == 2 and down in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_mismatch_of_megatron_against_the_server(server, model_dir, tmp_path):
    """The intended use of the three commands: the same tokens through `mopd logprobs`
    (the Megatron student) and `mopd score` (a server of the same weights), then `mopd
    mismatch`: the two agree to float rounding and IcePop would discard nothing."""
    seqs = random_seqs(6, 2, 40, seed=8)
    write_jsonl(tmp_path / "in.jsonl", [{"input_ids": s} for s in seqs])
    inp = str(tmp_path / "in.jsonl")
    r = mopd("logprobs", "--hf", model_dir, "--input", inp, "--output", str(tmp_path / "pi.jsonl"),
             timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = mopd("score", "--url", server.url, "--input", inp, "--output", str(tmp_path / "mu.jsonl"))
    assert r.returncode == 0, r.stderr
    r = mopd("mismatch", str(tmp_path / "pi.jsonl"), str(tmp_path / "mu.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["sequences"] == 6 and m["tokens"] == sum(len(s) - 1 for s in seqs)
    assert 0 < m["max_abs_diff"] < 1e-4  # two implementations, same weights
    assert m["discard_low"] == 0 == m["discard_high"]
