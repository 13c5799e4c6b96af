"""The typed config tree: one test per class of bad input, each error naming the key path."""

import pytest

from megatron_mopd.config import (
    Config,
    ParallelConfig,
    check_world_size,
    load_config,
)
from megatron_mopd.errors import ConfigError

MOE = ["model.num_moe_experts=4"]


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "run_dir: runs/x\nmodel:\n  num_moe_experts: 4\nparallel:\n  tp: 2\n  ep: 2\n"
        "teachers:\n  math:\n    domains: [add]\n    hf_path: /m\n"
    )
    cfg = load_config(recipe, ["train.max_steps=7", "train.lr=3e-4", "parallel.pp=2"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 7 and cfg.train.lr == 3e-4
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.etp) == (2, 2, 2, 2)
    assert cfg.teacher_for("add") == "math"
    assert check_world_size(cfg.parallel, 8) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hiden_size=3"], "unknown key 'model.hiden_size'; allowed here: "),
        (["bogus=1"], "unknown key 'bogus'"),
        (["train.max_steps=ten"], "train.max_steps='ten' must be an integer"),
        (["train.lr=fast"], "train.lr='fast' must be a number"),
        (["parallel.use_distributed_optimizer=3"], "must be true or false"),
        (["loss.correction=clip"], "loss.correction='clip' is not allowed; choose one of"),
        (["model.moe_token_dispatcher_type=flex", *MOE], "moe_token_dispatcher_type='flex'"),
        (["train.max_steps=0"], "train.max_steps=0 must be a positive integer"),
        (["train"], "override 'train' is not of the form key.path=value"),
        (["train..lr=1"], "empty key path"),
        (["train.lr.x=1"], "must be a number"),
        (["parallel.tp=3"], "parallel.tensor_model_parallel_size=3 does not divide"),
        (
            ["parallel.ep=3", *MOE],
            "expert_model_parallel_size=3 does not divide model.num_moe_experts=4",
        ),
        (["parallel.ep=2"], "expert_model_parallel_size=2 needs an MoE model"),
        (["parallel.pp=3"], "pipeline_model_parallel_size=3 does not divide model.num_layers=2"),
        (["parallel.etp=3", *MOE], "expert_tensor_parallel_size=3 does not divide"),
        (["parallel.tp=2", "parallel.sequence_parallel=false", *MOE], "sequence_parallel"),
        (["model.num_query_groups=3"], "model.num_query_groups=3 must divide"),
        (["model.moe_router_topk=5", *MOE], "moe_router_topk=5 must be in"),
        (["loss.eps_low=2"], "need 0 <= eps_low <= 1 <= eps_high"),
        (["loss.per_domain.add.eps_high=0.5"], "loss.per_domain.add: need 0 <= eps_low"),
        (["loss.alpha=1"], "set rewards.<domain>"),
        (["loss.distill_coef=0"], "loss: distill_coef=0 and alpha=0 leave nothing to learn"),
        (["loss.distill_coef=-1"], "loss.distill_coef=-1.0 must be >= 0"),
        (
            ["teachers.t.hf_path=/m", "teachers.t.domains=[a]", "loss.estimator=topk_reverse_kl"],
            "loss.estimator=topk_reverse_kl needs the teacher's top-k log-probs: set "
            "teachers.t.top_k",
        ),
        (
            ["loss.per_domain.add.distill_coef=0"],
            "loss.per_domain.add: distill_coef=0 and alpha=0",
        ),
        (["rollout.temperature=0.7"], "rollout.temperature=0.7"),
        (["rollout.backend=sglang"], "rollout.urls is empty"),
        # log mu is taken before truncation: ratios would be biased
        (["rollout.top_p=0.9"], "rollout.top_p=0.9 / rollout.top_k=-1 with loss.correction=icepop"),
        (
            ["rollout.top_k=20", "loss.correction=none", "loss.per_domain.add.correction=tis"],
            "with loss.correction=tis",
        ),
        (["rollout.weight_sync_bucket_mb=0"], "rollout.weight_sync_bucket_mb=0.0 must be > 0"),
        (["teachers.t.domains=[a]"], "teachers.t.hf_path is required"),
        (["teachers.t.backend=sglang"], "teachers.t.urls is empty"),
        (
            [
                "teachers.t.hf_path=/m",
                "teachers.t.domains=[a]",
                "teachers.u.hf_path=/m",
                "teachers.u.domains=[a]",
            ],
            "domain 'a' is already routed to teachers.t",
        ),
        (["teachers.t.hf_path=/m", "default_teacher=x"], "default_teacher='x' is not a teacher"),
        (["parallel.tp=2", "parallel.tensor_model_parallel_size=2"], "set twice"),
    ],
)
def test_bad_config_names_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_truncated_sampling_without_importance_weights_is_allowed():
    cfg = load_config(None, ["rollout.top_p=0.9", "rollout.top_k=20", "loss.correction=none"])
    assert cfg.rollout.top_p == 0.9


def test_domain_without_teacher():
    cfg = load_config(None, ["teachers.t.hf_path=/m", "teachers.t.domains=[a]"])
    with pytest.raises(ConfigError, match="domain 'b' has no teacher"):
        cfg.teacher_for("b")
    cfg = load_config(None, ["teachers.t.hf_path=/m", "default_teacher=t"])
    assert cfg.teacher_for("b") == "t"


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_config(section)


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (dict(tensor_model_parallel_size=2), 3, "world size 3 is not divisible"),
        (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6, "multiple of 4"),
        (dict(expert_model_parallel_size=4), 2, "must divide tensor_model_parallel_size x data"),
    ],
)
def test_world_size_checks(layout, world, message):
    with pytest.raises(ConfigError, match=message):
        check_world_size(ParallelConfig(**layout), world)


def test_world_size_ok():
    assert check_world_size(ParallelConfig(tensor_model_parallel_size=2), 8) == 4
    p = ParallelConfig(
        tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1
    )
    assert check_world_size(p, 2) == 1


def test_bare_on_off_reach_on_off_settings(tmp_path):
    """YAML 1.1 reads a bare on/off as a boolean: an auto/on/off setting takes it as meant,
    from the recipe and from an override; other enumerations still refuse a boolean."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "run_dir: runs/x\nrollout:\n  embedded_subprocess: on\n"
        "teachers:\n  math:\n    domains: [add]\n    hf_path: /m\n    subprocess: off\n"
    )
    cfg = load_config(recipe, [])
    assert cfg.rollout.embedded_subprocess == "on" and cfg.teachers["math"].subprocess == "off"
    cfg = load_config(recipe, ["teachers.math.subprocess=on", "rollout.embedded_subprocess=off"])
    assert cfg.rollout.embedded_subprocess == "off" and cfg.teachers["math"].subprocess == "on"
    with pytest.raises(ConfigError, match=r"loss\.correction=True is not allowed"):
        load_config(recipe, ["loss.correction=on"])
