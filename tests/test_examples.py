"""The recipes under `examples/`: each passes `mopd check RECIPE --offline --world-size N`.

`N` is the smallest world size the recipe's layout fits (TP x PP x DP with EP x ETP
dividing TP x DP): 16 for `qwen3_30b_a3b`. Offline, the student's folder may be absent
(a cluster path): `mopd check` then validates the layout against the architecture the
recipe writes in `model.*`. Datasets are still read, so a recipe whose data files do not
exist here is skipped, with the reason, rather than failed (`check --offline` rightly
treats a missing dataset as an error); the toy's, built by `make demo`, are replaced by a
stand-in toy of the same layout when absent.

Also: the Qwen3-30B-A3B recipe's architecture is Qwen3-30B-A3B's (its published
`config.json`, read by the same code the trainer uses), and its launch scripts produce
commands whose sglang-router arguments the installed router accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_mopd.cli import main
from megatron_mopd.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.glob("examples/*/*.yaml"))
QWEN3 = REPO / "examples" / "qwen3_30b_a3b"

# config.json of Qwen/Qwen3-30B-A3B (the fields the student's architecture is read from)
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_act": "silu",
    "attention_bias": False,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}


def smallest_world_size(recipe: Path) -> int:
    """The smallest number of processes the recipe's parallel layout fits."""
    p = load_config(str(recipe)).parallel
    for dp in range(1, 1025):
        if (p.tp * dp) % (p.ep * p.etp) == 0:
            return p.tp * p.pp * dp
    raise AssertionError(f"{recipe}: no world size up to 1024 fits the layout")


def missing_data(recipe: Path) -> list[str]:
    """The recipe's dataset files that do not exist here (paths relative to the repo)."""
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
    paths = [data.get("train_path"), data.get("eval_path")]
    return [p for p in paths if p and not (REPO / p).exists()]


def stand_in_toy(root: Path) -> list[str]:
    """A toy with the demo's layout (tiny random char-tokenizer models instead of the
    fine-tuned ones, a few prompts per domain) and the overrides pointing the toy recipe at
    it: what `toy.build` would give, in a second instead of minutes."""
    from megatron_mopd.toy.build import ToyBuild
    from megatron_mopd.toy.demo import toy_overrides
    from megatron_mopd.toy.tasks import DEFAULT_SPECS, generate, write_jsonl
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    data = {
        split: write_jsonl(
            str(root / "data" / f"{split}.jsonl"),
            [ex for d in sorted(DEFAULT_SPECS) for ex in generate(DEFAULT_SPECS[d], 8, split)],
        )
        for split in ("train", "eval")
    }
    models = {
        name: make_tiny_hf_model("qwen3_moe", str(root / name), seed=i)
        for i, name in enumerate(("student", "teachers/add", "teachers/reverse"))
    }
    toy = ToyBuild(
        root=str(root),
        tokenizer=models["student"],
        train_jsonl=data["train"],
        eval_jsonl=data["eval"],
        student=models["student"],
        teachers={"add": models["teachers/add"], "reverse": models["teachers/reverse"]},
        teacher_accuracy={},
        student_accuracy={},
        seconds={},
    )
    return toy_overrides(toy)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_recipe_checks_offline(recipe, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # recipes name their files relative to the repository root
    overrides: list[str] = []
    absent = missing_data(recipe)
    if absent and recipe.parent.name == "toy":
        overrides = stand_in_toy(tmp_path)  # `make demo` has not built the toy here
    elif absent:
        pytest.skip(f"dataset(s) {absent} not built here")
    world_size = smallest_world_size(recipe)
    argv = ["check", str(recipe.relative_to(REPO)), *overrides]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--offline", "--world-size", str(world_size)])
    out, err = capsys.readouterr()
    assert e.value.code == 0, out + err
    assert "all checks passed" in out and "FAIL" not in out


def test_qwen3_recipe_layout(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = str((QWEN3 / "mopd.yaml").relative_to(REPO))
    assert smallest_world_size(QWEN3 / "mopd.yaml") == 16
    with pytest.raises(SystemExit) as e:
        main(["check", recipe, "--offline", "--world-size", "16"])
    out, _ = capsys.readouterr()
    assert e.value.code == 0
    assert "OK    layout: tp=1 pp=2 ep=8 etp=1 dp=8 for world size 16" in out
    assert "architecture from the recipe's model.* fields" in out
    # 8 GPUs cannot hold EP8 next to PP2
    with pytest.raises(SystemExit) as e:
        main(["check", recipe, "--offline", "--world-size", "8"])
    _, err = capsys.readouterr()
    assert e.value.code == 2 and "expert_model_parallel_size x expert_tensor_parallel_size" in err
    # without --offline the student's folder must exist (as for the trainer)
    if not os.path.exists(load_config(recipe).model.hf_path):
        with pytest.raises(SystemExit) as e:
            main(["check", recipe, "--world-size", "16"])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and "FAIL  layout" in out


def test_qwen3_recipe_architecture_is_qwen3_30b_a3b(tmp_path):
    """The recipe's `model.*` fields equal what the trainer reads from the real
    checkpoint's config.json, so the offline check validates the layout it will run."""
    from megatron_mopd.convert.hf_config import ARCH_FIELDS, model_config_from_hf

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B_CONFIG))
    recipe = load_config(str(QWEN3 / "mopd.yaml")).model
    from_hf = model_config_from_hf(str(tmp_path), base=dataclasses.replace(recipe, hf_path=None))
    assert {f: getattr(recipe, f) for f in ARCH_FIELDS} == {
        f: getattr(from_hf, f) for f in ARCH_FIELDS
    }
    assert recipe.params_dtype == "bf16" and recipe.transformer_impl == "transformer_engine"


@pytest.mark.parametrize("script", ["start_teachers.sh", "start_rollout.sh"])
def test_qwen3_launch_scripts(script, tmp_path):
    """Dry runs print one SGLang worker per TP-sized GPU slice and a router whose
    arguments the installed sglang-router parses."""
    out = subprocess.run(
        ["bash", str(QWEN3 / script)],
        env={**os.environ, "DRY_RUN": "1", "LOG_DIR": str(tmp_path), "ADVERTISE_HOST": "10.0.0.7"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    commands = [
        shlex.split(line[2:].rsplit(" > ", 1)[0])
        for line in out.stdout.splitlines()
        if line.startswith("+ ")
    ]
    workers = [c for c in commands if c[1:3] == ["-m", "sglang.launch_server"]]
    routers = [c for c in commands if c[1:3] == ["-m", "sglang_router.launch_router"]]
    assert len(workers) == 4 and len(routers) == (2 if script == "start_teachers.sh" else 1)
    gpus = [int(c[c.index("--base-gpu-id") + 1]) for c in workers]
    assert gpus == [0, 2, 4, 6] and all(c[c.index("--tp-size") + 1] == "2" for c in workers)
    ports = {c[c.index("--port") + 1] for c in workers}
    assert len(ports) == 4
    recipe = load_config(str(QWEN3 / "mopd.yaml"))
    wanted = (
        [t.urls[0] for t in recipe.teachers.values()]
        if script == "start_teachers.sh"
        else recipe.rollout.urls
    )
    launch_router = pytest.importorskip("sglang_router.launch_router")
    for router in routers:
        args = launch_router.parse_router_args(router[3:])
        assert args.policy == "round_robin"
        assert all(
            u.startswith("http://10.0.0.7:") and u.rsplit(":", 1)[1] in ports
            for u in args.worker_urls
        )
        # the router listens on the port the recipe names
        assert any(u.endswith(f":{args.port}") for u in wanted), (args.port, wanted)


def test_offline_check_without_the_student_folder(tmp_path, capsys):
    """Offline, an absent `model.hf_path` is replaced by the recipe's architecture, or the
    layout is SKIP when the recipe has none; a dataset must still exist."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "domain": "add"}\n')
    raw = {
        "model": {"hf_path": str(tmp_path / "cluster" / "student")},
        "parallel": {"tp": 2},
        "data": {"train_path": str(data)},
        "teachers": {"t": {"backend": "sglang", "urls": ["http://h:1"], "domains": ["add"]}},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as e:
        main(["check", str(recipe), "--offline", "--world-size", "4"])
    out, _ = capsys.readouterr()
    assert e.value.code == 0, out
    assert "SKIP  layout: tp=2 pp=1 ep=1 etp=2 dp=2 for world size 4; model.hf_path=" in out
    assert "SKIP  student tokenizer" in out
    # with an architecture, the layout is checked against it: 3 KV groups do not split by 2
    raw["model"].update(num_attention_heads=6, num_query_groups=3)
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as e:
        main(["check", str(recipe), "--offline", "--world-size", "4"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "does not divide model.num_query_groups=3" in err
