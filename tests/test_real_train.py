"""`mopd check` and `mopd train` with every server real SGLang 0.5.23 (the session's).

- `mopd check` through a real sglang-router in front of the two real servers "a" and
  "b" (teachers) and server "w" (rollout, `--api-key`): every check passes, the tokenizer
  is compared, and the HTTP pre-flight (one text per request) passes through the router.
- `mopd train` on the tiny recipe: rollouts sampled by "w" (`rollout.backend: sglang`,
  weights synced by disk after every step, the key from `rollout.api_key_env`), both
  domains scored by "a" and "b" behind the router. The student is another model than the
  one "w" starts with, so the step-0 sync must land before the first rollout: the
  train/inference mismatch then stays at fp32 rounding (mean |r - 1| < 1e-4, no token
  discarded), which it would not if "w" still sampled from its first weights.
"""

from __future__ import annotations

import json

import pytest
from conftest import REAL_API_KEY
from sglang_helpers import start_router
from sglang_real import get, post
from trainer_helpers import dataset_lines, make_recipe, metrics, train_in_process, write_recipe

from megatron_mopd.toy.tiny import make_tiny_hf_model


@pytest.fixture(scope="module")
def router(real_sglang, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("router") / "router.log")
    proc, url = start_router([real_sglang["a"].url, real_sglang["b"].url], log)
    assert proc is not None, url
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def tiny(real_sglang, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_train")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dataset_lines()))
    student = make_tiny_hf_model("qwen3_moe", str(root / "student"), seed=5)
    # t_add / t_rev: make_recipe's embedded teachers, replaced by the SGLang ones here
    return {"student": student, "t_add": student, "t_rev": student, "data": str(data)}


def recipe(tiny, real_sglang, router, run_dir, **train) -> dict:
    return make_recipe(
        tiny,
        run_dir,
        teachers={"both": {"backend": "sglang", "urls": [router], "domains": ["add", "rev"]}},
        rollout={
            "backend": "sglang",
            "urls": [real_sglang["w"].url],
            "api_key_env": "MOPD_TEST_KEY",
            "weight_sync": "disk",
            "max_new_tokens": 8,
        },
        data={"train_path": tiny["data"], "eval_path": None},
        train={"eval_interval": 0, **train},
        checkpoint={"interval": 0, "save_hf": False},
    )


def test_check_through_a_real_router(tiny, real_sglang, router, tmp_path, monkeypatch, capsys):
    from megatron_mopd import cli
    from megatron_mopd.teachers.preflight import compare_with_server, load_tokenizer

    monkeypatch.setenv("MOPD_TEST_KEY", REAL_API_KEY)
    path = write_recipe(tmp_path / "r.yaml", recipe(tiny, real_sglang, router, tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        cli.main(["check", path])
    out = capsys.readouterr()
    assert e.value.code == 0, out.out + out.err
    lines = [x for x in out.out.splitlines() if x.startswith(("OK", "FAIL", "SKIP"))]
    assert not [x for x in lines if x.startswith("FAIL")], out.out
    assert any(router in x and "tokenizer" in x for x in lines), out.out
    assert any(real_sglang["w"].url in x for x in lines), out.out
    # the pre-flight over HTTP (used when /model_info's tokenizer_path is not readable
    # here): every probe, one request each, through the router
    compare_with_server(load_tokenizer(tiny["student"]), router, "both")


def test_train_with_every_server_real(tiny, real_sglang, router, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOPD_TEST_KEY", REAL_API_KEY)
    run_dir = tmp_path / "run"
    raw = recipe(tiny, real_sglang, router, run_dir, max_steps=3)
    try:
        code, err = train_in_process(capsys, write_recipe(tmp_path / "r.yaml", raw))
        assert code == 0, err
        info = get(real_sglang["w"], "/model_info").json()
        assert info["weight_version"] == "step_3"
        assert info["model_path"] == str(run_dir / "weights" / "step_3")
    finally:  # server "w" back to its first weights for the other tests
        body = {"model_path": real_sglang["model_a"], "weight_version": "default"}
        post(real_sglang["w"], "/update_weights_from_disk", body)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["skipped"] for r in rows)
    for r in rows:
        assert r["teacher_sequences/add"] + r["teacher_sequences/rev"] == 8
        assert r["ratio_abs_dev"] < 1e-4, r  # SGLang's log mu = Megatron's log pi (fp32)
        assert r["discard_low_frac"] == r["discard_high_frac"] == 0.0
        assert r["reverse_kl"] > 0  # the teacher is another model
    assert "ignore sampling_seed" in err
