"""The ablation's bookkeeping (`toy.ablation`): arms are valid recipes, the summary's
"first step at the teacher's level", the table and the figure. The runs themselves are the
trainer's (tests/test_trainer.py covers ORM-only inside the Megatron step)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_mopd.config import load_config
from megatron_mopd.errors import UserError
from megatron_mopd.toy.ablation import (
    ARM_GROUPS,
    ARMS,
    DEFAULT_ARMS,
    TOLERANCE,
    _chosen_arms,
    first_step_at,
    mean_curve,
    mismatch_stats,
    plot,
    print_table,
    summarize_arm,
)
from megatron_mopd.toy.build import ToyBuild
from megatron_mopd.toy.demo import RECIPE, toy_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy(root: str) -> ToyBuild:
    return ToyBuild(
        root=root,
        tokenizer=f"{root}/tokenizer",
        train_jsonl=f"{root}/data/train.jsonl",
        eval_jsonl=f"{root}/data/eval.jsonl",
        student=f"{root}/student",
        teachers={"add": f"{root}/teachers/add", "reverse": f"{root}/teachers/reverse"},
        teacher_accuracy={},
        student_accuracy={},
        seconds={},
    )


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a.name)
def test_every_arm_is_a_valid_recipe(arm):
    cfg = load_config(os.path.join(REPO, RECIPE), [*toy_overrides(_toy("/toy")), *arm.overrides])
    assert cfg.model.hf_path == "/toy/student"
    assert cfg.teachers["reverser"].hf_path == "/toy/teachers/reverse"
    if arm.name == "orm_only":
        assert cfg.loss.distill_coef == 0 and cfg.loss.alpha > 0
    else:
        assert cfg.loss.distill_coef == 1
    assert (cfg.loss.estimator == "sampled") == (arm.name != "mopd_topk")


def test_arms_differ_only_in_the_loss():
    touched = {o.split("=")[0].split(".")[0] for a in ARMS if a.default for o in a.overrides}
    assert touched <= {"loss", "teachers"}  # teachers: only their top_k, for the dense arm
    assert all(o.endswith("top_k=8") for a in ARMS for o in a.overrides if o.startswith("t"))
    # the correction arms: the same bf16 engine, only loss.correction differs
    corrections = [a for a in ARMS if a.name in ARM_GROUPS["corrections"]]
    assert [a.name for a in corrections] == ["bf16_none", "bf16_tis", "bf16_icepop"]
    for a in corrections:
        assert not a.default and "rollout.dtype=bf16" in a.overrides
        others = {o for o in a.overrides if not o.startswith("loss.correction=")}
        assert others == {"loss.alpha=0", "rollout.dtype=bf16"}


def test_arm_selection():
    assert [a.name for a in _chosen_arms(None)] == list(DEFAULT_ARMS)
    assert "bf16_icepop" not in DEFAULT_ARMS
    got = [a.name for a in _chosen_arms(["corrections", "orm_only"])]
    assert got == ["orm_only", "bf16_none", "bf16_tis", "bf16_icepop"]
    with pytest.raises(UserError, match="unknown arm.*nope.*corrections"):
        _chosen_arms(["nope"])


def test_mismatch_stats(tmp_path):
    rows = [
        {
            "step": s,
            "ratio_abs_dev": 0.01 * s,
            "discard_low_frac": 0.1,
            "reverse_kl": float(s),
            "grad_norm": 2.0 * s,
            "skipped": s == 3,
        }
        for s in range(1, 11)
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 0, "eval": 1}\n')
    st = mismatch_stats(str(path))
    assert st["ratio_abs_dev"] == pytest.approx(0.055)
    assert st["out_of_bounds_frac"] == pytest.approx(0.1)  # no discard_high: 0
    assert st["reverse_kl_last"] == pytest.approx(9.5)  # steps 9 and 10
    assert st["grad_norm_max"] == 20.0 and st["skipped_steps"] == 1


def test_first_step_at():
    curve = [(0, 0.4), (10, 0.97), (20, 0.99), (30, 0.95)]
    assert first_step_at(curve, 0.97) == 10
    assert first_step_at(curve, 0.975) == 20
    assert first_step_at(curve, 0.999) is None
    assert first_step_at([], 0.5) is None


def test_mean_curve():
    got = mean_curve([[(0, 0.2), (10, 0.6)], [(0, 0.4), (10, 1.0)]])
    assert [s for s, _ in got] == [0, 10] and [a for _, a in got] == pytest.approx([0.3, 0.8])
    with pytest.raises(ValueError, match="different steps"):
        mean_curve([[(0, 0.2)], [(5, 0.4)]])


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_summary_table_and_figure(tmp_path, capsys, n_seeds):
    teachers = {"add": 0.99, "reverse": 0.995}
    runs = {
        1: {"add": [(0, 0.46), (10, 1.0)], "reverse": [(0, 0.57), (10, 0.9)]},
        2: {"add": [(0, 0.46), (10, 0.95)], "reverse": [(0, 0.57), (10, 1.0)]},
    }
    per_seed = {s: runs[s] for s in list(runs)[:n_seeds]}
    arm = summarize_arm(ARMS[1], per_seed, teachers, seconds=12.34)
    if n_seeds == 1:
        assert arm["first_step_at_teacher"] == {"add": 10, "reverse": None}
        assert arm["final"] == {"add": 1.0, "reverse": 0.9}
    else:  # the mean curve reaches on add (0.975), not on reverse (0.95)
        assert arm["final"] == pytest.approx({"add": 0.975, "reverse": 0.95})
        assert arm["first_step_at_teacher"] == {"add": 10, "reverse": None}
        assert arm["per_seed"]["2"]["first_step_at_teacher"] == {"add": None, "reverse": 10}
    assert arm["seconds"] == 12.3 and arm["overrides"] == list(ARMS[1].overrides)
    summary = {
        "teachers": teachers,
        "tolerance": TOLERANCE,
        "steps": 10,
        "seeds": list(per_seed),
        "eval_interval": 10,
        "arms": {ARMS[1].name: arm},
    }
    json.dumps(summary)  # what summary.json holds is plain JSON
    print_table(summary)
    out = capsys.readouterr().out
    assert ARMS[1].name in out and "never" in out
    if n_seeds == 2:
        assert "10 (10,never)" in out and "never (never,10)" in out
    plot(summary, str(tmp_path / "figure.png"))
    assert (tmp_path / "figure.png").stat().st_size > 10_000
