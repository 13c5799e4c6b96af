"""`mopd check`: config, layout, datasets, teachers and tokenizers (commands/check.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from megatron_mopd.cli import main
from megatron_mopd.commands.check import run_preflight
from megatron_mopd.config import load_config
from megatron_mopd.errors import UserError
from megatron_mopd.teachers import preflight
from megatron_mopd.toy.tiny import make_char_tokenizer, make_tiny_hf_model


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    # 6 heads / 3 KV groups: differs from ModelConfig's placeholders (4 / 2)
    student = make_tiny_hf_model(
        "qwen3_moe", str(root / "student"), seed=0, num_attention_heads=6, num_key_value_heads=3
    )
    teacher = make_tiny_hf_model("qwen3", str(root / "teacher"), seed=1)
    data = root / "train.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "12+34=", "domain": "add", "answer": "46"},
                {"prompt": "abc>", "domain": "rev", "answer": "cba"},
                {"prompt_ids": [1, 17, 18], "domain": "add", "answer": "46"},
            ]
        )
        + "\n"
    )
    raw = {
        "run_dir": str(root / "run"),
        "model": {"hf_path": student},
        "data": {"train_path": str(data)},
        "teachers": {
            "adder": {"hf_path": teacher, "domains": ["add"]},
            "reverser": {"hf_path": teacher, "domains": ["rev"]},
        },
    }
    path = root / "mopd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return root, str(path)


def _check(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["check", *argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_good_recipe_ok_offline(recipe, capsys):
    _, path = recipe
    code, out, err = _check(capsys, path, "--offline", "--world-size", "2")
    assert code == 0, err
    assert "FAIL" not in out and "all checks passed" in out
    assert "OK    layout: tp=1 pp=1 ep=1 etp=1 dp=2 for world size 2" in out
    assert "OK    teacher 'adder'" in out and "tokenizer matches" in out
    assert "3 prompts, domains ['add', 'rev']" in out


def test_bad_key_and_override(recipe, capsys):
    _, path = recipe
    code, out, err = _check(capsys, path, "train.bogus=1", "--offline")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "unknown key 'train.bogus'" in err and "FAIL  config" in out
    code, _, err = _check(capsys, path, "train.max_steps=many", "--offline")
    assert code == 2 and "train.max_steps='many' must be an integer" in err


def test_missing_dataset_file(recipe, capsys):
    root, path = recipe
    code, out, err = _check(capsys, path, f"data.train_path={root}/nope.jsonl", "--offline")
    assert code == 2 and f"data.train_path={root}/nope.jsonl: no such file" in err


def test_malformed_line_names_file_and_line(recipe, capsys):
    root, path = recipe
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "domain": "add"}\n\n{"prompt": "2+2=", "domain": \n')
    code, _, err = _check(capsys, path, f"data.train_path={bad}", "--offline")
    assert code == 2 and f"{bad}:3: not valid JSON" in err
    bad.write_text(
        '{"prompt": "1+1=", "domain": "add"}\n{"prompt_ids": [1, 999], "domain": "add"}\n'
    )
    code, _, err = _check(capsys, path, f"data.train_path={bad}", "--offline")
    assert code == 2 and f"{bad}:2: prompt_ids holds id 999 outside the vocabulary" in err


def test_unknown_domain(recipe, capsys):
    root, path = recipe
    data = root / "poetry.jsonl"
    data.write_text(
        '{"prompt": "1+1=", "domain": "add"}\n{"prompt": "roses", "domain": "poetry"}\n'
    )
    code, _, err = _check(capsys, path, f"data.eval_path={data}", "--offline")
    assert code == 2
    assert f"{data}:2: dataset domain(s) 'poetry' have no teacher" in err
    code, out, _ = _check(
        capsys, path, f"data.eval_path={data}", "default_teacher=adder", "--offline"
    )
    assert code == 0, out


def test_layout_against_world_size_and_architecture(recipe, capsys):
    _, path = recipe
    code, _, err = _check(capsys, path, "parallel.pp=2", "--world-size", "3", "--offline")
    assert code == 2 and "world size 3 is not divisible" in err
    # the student's HF config has 3 KV groups: TP=2 cannot split them (config fields say 2)
    code, out, err = _check(capsys, path, "parallel.tp=2", "--world-size", "2", "--offline")
    assert code == 2 and "FAIL  layout" in out
    assert "tensor_model_parallel_size=2 does not divide model.num_query_groups=3" in err
    code, out, _ = _check(capsys, path, "parallel.pp=2", "--world-size", "4", "--offline")
    assert code == 0 and "dp=2 for world size 4" in out


def test_expert_parallel_on_hf_moe_student(recipe, capsys):
    _, path = recipe
    code, out, err = _check(capsys, path, "parallel.ep=2", "--world-size", "2", "--offline")
    assert code == 0, err
    code, _, err = _check(capsys, path, "parallel.ep=8", "--world-size", "8", "--offline")
    assert code == 2 and "does not divide model.num_moe_experts=4" in err


def test_teacher_with_other_tokenizer_fails(recipe, capsys):
    root, path = recipe
    other = make_tiny_hf_model("qwen3", str(root / "other_teacher"), seed=2)
    make_char_tokenizer(other, extra_chars="é", vocab_size=128)  # overwrite its tokenizer
    code, out, err = _check(capsys, path, f"teachers.reverser.hf_path={other}", "--offline")
    assert code == 2
    assert "FAIL  teacher 'reverser'" in out and "OK    teacher 'adder'" in out
    assert "teacher 'reverser': tokenizer differs from the student's" in err


def test_run_preflight_online_reaches_servers(recipe):
    root, path = recipe
    server_mod = pytest.importorskip("megatron_mopd.server.app")
    server = server_mod.SGLangCompatibleServer(str(root / "teacher"), port=0)
    server.start(background_load=False)
    try:
        cfg = load_config(
            path,
            [
                "teachers.reverser.backend=sglang",
                "teachers.reverser.hf_path=null",
                f"teachers.reverser.urls=[{server.url}]",
                "rollout.backend=sglang",
                "rollout.urls=[http://127.0.0.1:9]",  # nothing listens there
            ],
        )
        lines: list[str] = []
        report = run_preflight(cfg, world_size=1, echo=lines.append, strict=False)
        assert not report.ok and len(lines) == len(report.results)
        by_name = {r.name: r for r in report.results}
        assert by_name["teacher 'reverser'"].status == "OK"
        assert f"{server.url} healthy" in by_name["teacher 'reverser'"].detail
        assert by_name["rollout server"].status == "FAIL"
        assert "http://127.0.0.1:9/health_generate" in by_name["rollout server"].detail
        with pytest.raises(UserError, match="rollout server: http://127.0.0.1:9"):
            report.raise_if_failed()
        with pytest.raises(UserError, match="rollout server: http://127.0.0.1:9"):
            run_preflight(cfg, world_size=1)  # strict (the trainer's call) raises
        offline = preflight.run_preflight(cfg, offline=True)
        assert offline.ok and {r.status for r in offline.results} == {"OK", "SKIP"}
    finally:
        server.shutdown()
