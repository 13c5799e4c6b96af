"""The SGLang client, teacher and rollout engine against real SGLang 0.5.23 on CPU.

The servers are the session's (`conftest.real_sglang`: "a", "b" and "w" serve the tiny
Qwen3-MoE `model_a` in fp32). The references are independent: transformers' forward of
the same weights for scoring, Megatron's log-probs of the sampled tokens for log mu.
What SGLang does differently from our own server is tested here against SGLang itself:
`input_token_logprobs` ids >= vocab_size - 1 reported as 0, seeds ignored without
`--enable-deterministic-inference`, `/health` running a generation, aborted requests
answered with HTTP 200, a 429 from a proxy in its place, servers behind `--api-key`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import httpx
import pytest
import torch
from conftest import REAL_API_KEY
from sglang_helpers import FlakyProxy, random_seqs, reference_logprobs
from sglang_real import get, post

from megatron_mopd.config import RolloutConfig, TeacherConfig
from megatron_mopd.errors import ConfigError, TeacherError
from megatron_mopd.rollout.sglang import SGLangRolloutEngine
from megatron_mopd.sglang.client import SGLangClient
from megatron_mopd.teachers.sglang import SGLangTeacher
from megatron_mopd.types import SamplingParams, ScoreRequest

VOCAB = 128  # the tiny models' vocabulary (= the tokenizer's size)


@pytest.fixture(scope="module")
def seqs():
    # ids across the whole vocabulary, the last one (VOCAB - 1) included
    out = random_seqs(16, 3, 48, vocab=VOCAB, seed=3)
    out[0][1] = VOCAB - 1
    return out


@pytest.fixture(scope="module")
def reference(real_sglang, seqs):
    return reference_logprobs(real_sglang["model_a"], seqs)


def mopd(*args: str) -> None:
    """`mopd ARGS` in this process; it must exit 0."""
    from megatron_mopd import cli

    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    assert e.value.code == 0


def max_diff(scored, reference) -> float:
    assert [len(s.logprobs) for s in scored] == [len(r) for r in reference]
    return max(abs(a - b) for s, r in zip(scored, reference) for a, b in zip(s.logprobs, r))


def test_scoring_equals_transformers(real_sglang, seqs, reference, caplog):
    """Batched, concurrent scoring of real SGLang's answers: log-probs within 1e-5 of
    transformers' fp32 forward, through the fast path (no warning about the layout,
    although SGLang reports id VOCAB - 1 as 0)."""
    with caplog.at_level(logging.WARNING), SGLangClient([real_sglang["a"].url]) as c:
        scored = c.score(seqs, batch_size=5)
    assert max_diff(scored, reference) < 1e-5
    assert not [r for r in caplog.records if "compact" in r.getMessage()]


def test_top_k_equals_transformers(real_sglang, seqs):
    """Top-5 ids and log-probs at each position from a later start equal transformers'."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(real_sglang["model_a"]).eval()
    starts = [max(1, len(s) // 2) for s in seqs]
    with SGLangClient([real_sglang["b"].url]) as c:
        scored = c.score(seqs, starts=starts, top_k=5, batch_size=4)
    worst = 0.0
    with torch.no_grad():
        for s, st, out in zip(seqs, starts, scored):
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0], dim=-1)[st - 1 : len(s) - 1]
            values, ids = lp.topk(5, dim=-1)
            assert out.top_ids.dtype == torch.int64 and torch.equal(out.top_ids, ids)
            worst = max(worst, (out.top_logprobs - values).abs().max().item())
    assert worst < 1e-5


def test_full_top_k_answer_decodes_to_its_json_values(real_sglang, seqs):
    """A full top-k answer (k = the vocabulary) of real SGLang, decoded by the fast path
    and by the entry-by-entry check, gives int64 / float32 `[n, k]` tensors equal to the
    answer's own JSON values (the ids exactly, the values as float32)."""
    from megatron_mopd.sglang.answers import check_scored
    from megatron_mopd.sglang.fast_answers import fast_scored

    batch = seqs[:6]
    starts = [max(1, len(s) // 2) for s in batch]
    body = {
        "input_ids": batch,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": VOCAB,
        "return_text_in_logprobs": False,
    }
    resp = post(real_sglang["b"], "/generate", body)
    assert resp.status_code == 200, resp.text[:300]
    items = json.loads(resp.content)
    fast = fast_scored(resp.content, batch, 0, starts, VOCAB)
    assert fast is not None  # SGLang's compact layout takes the fast path
    for j, (s, st) in enumerate(zip(batch, starts)):
        rows = items[j]["meta_info"]["input_top_logprobs"][st:]
        want_ids = torch.tensor([[e[1] for e in row] for row in rows], dtype=torch.int64)
        want_lps = torch.tensor([[e[0] for e in row] for row in rows], dtype=torch.float32)
        assert want_ids.shape == (len(s) - st, VOCAB)
        assert sorted(want_ids[0].tolist()) == list(range(VOCAB))  # the whole vocabulary
        slow = check_scored(items[j], "u", "l", j, j, s, 0, st, VOCAB)
        for ids, lps in (fast[2][j], (slow.top_ids, slow.top_logprobs)):
            assert ids.dtype == torch.int64 and lps.dtype == torch.float32
            assert torch.equal(ids, want_ids) and torch.equal(lps, want_lps)


def test_teacher_over_real_sglang(real_sglang, seqs, reference):
    teacher = SGLangTeacher("t", TeacherConfig(backend="sglang", urls=[real_sglang["a"].url]))
    requests = [ScoreRequest(input_ids=s, response_start=len(s) - 2) for s in seqs]
    results = teacher.score(requests)
    teacher.close()
    for res, ref in zip(results, reference):
        assert len(res.logprobs) == 2
        assert max(abs(a - b) for a, b in zip(res.logprobs, ref[-2:])) < 1e-5


def test_mopd_score_command(real_sglang, seqs, reference, tmp_path, capsys):
    """`mopd score`, without and with `--top-k`, against transformers."""
    import transformers

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    for top_k in (0, 3):
        out = tmp_path / f"out{top_k}.jsonl"
        mopd(
            "score", "--url", real_sglang["b"].url, "--input", str(src), "--output", str(out),
            "--top-k", str(top_k),
        )  # fmt: skip
        got = [json.loads(line) for line in out.read_text().splitlines()]
        lps = [g["logprobs"] for g in got]
        assert max(abs(a - b) for g, r in zip(lps, reference) for a, b in zip(g, r)) < 1e-5
    model = transformers.AutoModelForCausalLM.from_pretrained(real_sglang["model_a"]).eval()
    with torch.no_grad():
        for s, g in zip(seqs, got):
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0, :-1], dim=-1)
            values, ids = lp.topk(3, dim=-1)
            assert g["top_ids"] == ids.tolist()
            assert (torch.tensor(g["top_logprobs"]) - values).abs().max() < 1e-5


def test_rollouts_match_megatron(real_sglang, tmp_path, capsys):
    """Real SGLang samples; Megatron (`mopd logprobs`, fp32) scores the same tokens:
    log mu and log pi agree within 1e-4 on every sampled token."""
    engine = SGLangRolloutEngine(RolloutConfig(backend="sglang", urls=[real_sglang["a"].url]))
    prompts = [[1, 5 + i, 9, 30 + i] for i in range(8)]
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=[2]))
    engine.close()
    assert all(r.response_ids for r in rollouts)
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"input_ids": r.prompt_ids + r.response_ids}) + "\n" for r in rollouts)
    )
    out = tmp_path / "pi.jsonl"
    mopd("logprobs", "--hf", real_sglang["model_a"], "--input", str(src), "--output", str(out))
    worst, tokens = 0.0, 0
    for r, line in zip(rollouts, out.read_text().splitlines()):
        pi = json.loads(line)["logprobs"][len(r.prompt_ids) - 1 :]
        assert len(pi) == len(r.rollout_logprobs)
        worst = max(worst, max(abs(a - b) for a, b in zip(pi, r.rollout_logprobs)))
        tokens += len(pi)
    print(f"{tokens} sampled tokens: max |log pi - log mu| = {worst:.2e}")
    assert worst < 1e-4


def test_rollouts_stream_from_real_sglang(real_sglang):
    """The rollout engine's pieces against the real server: every prompt once, in pieces of
    at least rollout.batch_size, each rollout whole (one log mu per sampled token)."""
    cfg = RolloutConfig(backend="sglang", urls=[real_sglang["a"].url], batch_size=2)
    engine = SGLangRolloutEngine(cfg)
    prompts = [[1, 5 + i, 9] for i in range(7)]
    try:
        pieces = list(engine.generate_stream(prompts, SamplingParams(max_new_tokens=5)))
    finally:
        engine.close()
    assert sorted(i for idx, _ in pieces for i in idx) == list(range(7))
    assert all(len(idx) >= 2 for idx, _ in pieces[:-1]) and len(pieces) >= 2
    for idx, rolls in pieces:
        for i, r in zip(idx, rolls):
            assert r.prompt_ids == prompts[i] and r.response_ids
            assert len(r.rollout_logprobs) == len(r.response_ids)


def test_rollout_dtype_is_checked_against_the_server(real_sglang):
    """rollout.dtype must be the server's --dtype (the test servers run float32)."""
    from megatron_mopd.errors import ConfigError

    url = real_sglang["a"].url
    engine = SGLangRolloutEngine(RolloutConfig(backend="sglang", urls=[url]), wait=False)
    try:
        assert engine.server_info()["dtype"] == "float32"
        engine.check_dtype("fp32")
        with pytest.raises(ConfigError, match=rf"rollout.dtype=bf16 .*{url}.*float32"):
            engine.check_dtype("bf16")
    finally:
        engine.close()


def test_seeds_are_ignored_so_prompts_are_batched(real_sglang, capsys):
    """Without --enable-deterministic-inference SGLang ignores sampling_seed (two seeded
    runs differ); the engine reads that from /server_info, says so once, and sends
    `batch_size` prompts per request instead of one request per seeded prompt."""
    proxy = FlakyProxy(real_sglang["a"].url)
    cfg = RolloutConfig(backend="sglang", urls=[proxy.url], batch_size=4)
    engine = SGLangRolloutEngine(cfg, wait=False)
    try:
        sampling = SamplingParams(max_new_tokens=12, seed=7)
        runs = [engine.generate([[1, 5, 6, 7]] * 8, sampling) for _ in range(2)]
    finally:
        engine.close()
        proxy.stop()
    assert proxy.count("/generate") == 4  # 2 runs x 8 prompts / 4 per request
    assert [r.response_ids for r in runs[0]] != [r.response_ids for r in runs[1]]
    assert capsys.readouterr().err.count("ignore sampling_seed") == 1
    with SGLangClient([real_sglang["a"].url]) as c:
        assert c.server_info()["enable_deterministic_inference"] is False


@pytest.mark.slow  # a server start that fails: ~45 s of SGLang's imports
def test_deterministic_inference_is_refused_on_cpu(real_sglang, tmp_path):
    """Why seeds cannot act here: SGLang refuses --enable-deterministic-inference with
    the CPU's torch_native attention backend, and says so."""
    import subprocess

    from sglang_real import SERVER_SCRIPT, sglang_venv

    proc = subprocess.run(
        ["bash", SERVER_SCRIPT, "--model-path", real_sglang["model_a"], "--port", "1"]
        + ["--enable-deterministic-inference"],
        env=dict(os.environ, SGLANG_VENV=sglang_venv(), SGLANG_WAIT_SECONDS="120"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "torch_native" in proc.stdout + proc.stderr


def test_health_runs_a_generation_and_probes_wait_for_it(real_sglang):
    """SGLang's GET /health runs a one-token generation (>= ~1 s, not an instant 200); a
    replica that failed is probed with it after its cooldown and then gets work again."""
    t0 = time.monotonic()
    assert get(real_sglang["a"], "/health").status_code == 200
    assert time.monotonic() - t0 > 0.9
    plan = lambda n, m, p: "drop" if n == 0 else None  # noqa: E731
    flaky = FlakyProxy(real_sglang["a"].url, plan)
    good = FlakyProxy(real_sglang["b"].url)
    try:
        with SGLangClient([flaky.url, good.url], cooldown_seconds=0.2, max_in_flight=1) as c:
            c.score([[1, 2, 3]] * 4, batch_size=1)
            time.sleep(0.3)
            c.score([[1, 2, 3]] * 4, batch_size=1)
    finally:
        flaky.stop()
        good.stop()
    assert flaky.count("/health") == 1  # its probe, answered by real SGLang
    assert flaky.count("/generate") >= 2  # the dropped one, and work after the probe


def test_aborted_requests_are_retried(real_sglang):
    """An aborted generation comes back as HTTP 200 with finish_reason type "abort": it
    is asked again (not read as a short answer); without retries the error says abort."""
    server = real_sglang["b"]
    long = {"max_new_tokens": 480, "temperature": 1.0, "ignore_eos": True}

    for retries in (2, 0):
        proxy = FlakyProxy(server.url)

        def abort_once_it_runs(proxy=proxy):
            while proxy.count("/generate") == 0:
                time.sleep(0.01)
            time.sleep(0.1)  # forwarded and running (480 tokens take seconds here)
            post(server, "/abort_request", {"abort_all": True})

        threading.Thread(target=abort_once_it_runs, daemon=True).start()
        try:
            with SGLangClient([proxy.url], max_retries=retries, backoff_seconds=0.1) as c:
                if retries:
                    (gen,) = c.generate([[1, 5, 9]], long)
                    assert len(gen.output_ids) == 480 and gen.finish_reason["type"] == "length"
                    assert proxy.count("/generate") == 2
                else:
                    with pytest.raises(TeacherError, match="aborted the request"):
                        c.generate([[1, 5, 9]], long)
        finally:
            proxy.stop()


def test_429_is_retried(real_sglang, seqs, reference):
    plan = lambda n, m, p: "429" if n < 2 else None  # noqa: E731
    proxy = FlakyProxy(real_sglang["a"].url, plan)
    try:
        with SGLangClient([proxy.url], backoff_seconds=0.05, max_in_flight=1) as c:
            scored = c.score(seqs[:3], batch_size=3)
    finally:
        proxy.stop()
    assert proxy.count("/generate") == 3
    assert max_diff(scored, reference[:3]) < 1e-5


def test_api_key(real_sglang, seqs, reference, monkeypatch):
    """Server "w" runs with --api-key: without the key the request is refused (401,
    named), with `api_key_env` it is answered; the key never sits in the config."""
    url = real_sglang["w"].url
    with SGLangClient([url], max_retries=0) as c, pytest.raises(TeacherError, match="401"):
        c.score(seqs[:1])
    monkeypatch.setenv("MOPD_TEST_KEY", REAL_API_KEY)
    cfg = TeacherConfig(backend="sglang", urls=[url], api_key_env="MOPD_TEST_KEY")
    teacher = SGLangTeacher("keyed", cfg)
    (res,) = teacher.score([ScoreRequest(input_ids=seqs[1], response_start=1)])
    teacher.close()
    assert max(abs(a - b) for a, b in zip(res.logprobs, reference[1])) < 1e-5
    monkeypatch.delenv("MOPD_TEST_KEY")
    with pytest.raises(ConfigError, match="api_key_env='MOPD_TEST_KEY'"):
        SGLangTeacher("keyed", cfg)


def test_list_of_texts_is_refused_by_the_router_but_one_text_is_not(real_sglang, tmp_path):
    """Why the tokenizer pre-flight sends one text per request: sglang-router 0.3.2
    answers 422 to `text` as a list; each probe alone is tokenized by the real server."""
    from sglang_helpers import start_router

    from megatron_mopd.teachers.preflight import load_tokenizer, server_probe_ids

    router, url = start_router([real_sglang["a"].url], str(tmp_path / "router.log"))
    assert router is not None, url
    try:
        body = {"text": ["a b", "c"], "sampling_params": {"max_new_tokens": 0}}
        assert httpx.post(url + "/generate", json=body, timeout=60).status_code == 422
        tok = load_tokenizer(real_sglang["model_a"])
        probes = ["Hello, world!", "0123 -42", "naïve café"]
        sides = server_probe_ids(url, probes)
    finally:
        router.stop()
    assert [s.ids for s in sides] == [tok(p)["input_ids"] for p in probes]


def test_the_kernel_stand_in_is_never_called(real_sglang):
    """After the scoring and sampling above, no server called a stub of the `sgl_kernel`
    stand-in (only its two bookkeeping ops run, which log nothing)."""
    assert real_sglang["servers"].stub_calls() == []


@pytest.mark.skip(
    reason="SGLang 0.5.23 on CPU cannot serve --enable-return-routed-experts: its capturer "
    "pins the host buffer with cudaHostRegister (state_capturer/base.py BaseHostCache, "
    "pin_memory=True), so the server dies at start-up ('Torch not compiled with CUDA "
    "enabled'). Where SGLang runs on a GPU: add the flag to server b (conftest.py)."
)
def test_rollouts_return_routed_experts(real_sglang):
    """Routing replay (R3): with `--enable-return-routed-experts` the rollout engine
    gets, per sequence, int32 expert ids for the P + R - 1 tokens fed to the model, all
    layers x top-2; they are (up to near-ties) transformers' own fp32 routing of
    prompt + response[:-1]."""
    import transformers

    from megatron_mopd.rollout.hf_engine import routed_experts_hooks

    engine = SGLangRolloutEngine(
        RolloutConfig(backend="sglang", urls=[real_sglang["b"].url]),
        return_routed_experts=True,
    )
    prompts = [[1, 5, 9, 7], [1, 8], [1, 3, 4, 5, 6, 7, 40, 41]]
    try:
        rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    finally:
        engine.close()
    model = transformers.AutoModelForCausalLM.from_pretrained(real_sglang["model_a"]).eval()
    differ = total = 0
    for r in rollouts:
        seq = r.prompt_ids + r.response_ids[:-1]
        assert r.routed_experts.dtype == torch.int32
        assert tuple(r.routed_experts.shape) == (len(seq), 2 * 2)  # [tokens, layers * top_k]
        with routed_experts_hooks(model) as rec, torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        want = rec.per_call()[0].sort(-1).values
        got = r.routed_experts.view(len(seq), 2, 2).sort(-1).values
        differ += int((got != want).any(-1).sum())
        total += want.shape[0] * want.shape[1]
    print(f"real SGLang vs transformers fp32: {differ}/{total} token-layer pairs differ")
    assert differ <= 0.05 * total
