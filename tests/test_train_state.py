"""Training state (model, optimizer, LR schedule) saved at one layout, resumed at others.

One torchrun launch (2 processes, `tests/workers/train_state_cases.py`) runs, in order:

- `save`: the tiny MoE student at TP2 with the distributed optimizer trains 2 steps
  (warmup, cosine decay, Adam), saves its training state, and trains 2 more (reference);
- resumes of that state, each from a model built with another seed: at TP2 (the same
  layout: bitwise-identical losses), at TP1 with DP2, at EP2 (expert parameters then get an
  optimizer of their own) and at PP2; each trains the same 2 steps. The second resumed
  step's loss depends on the loaded Adam moments and step count, not only on the weights;
- `model-only`: only the model part loaded, as a Megatron checkpoint (`load_mcore_checkpoint`);
- `fresh`: a state saved before any optimizer step (Adam state created as a first step
  would), resumed at TP2.

Also: a state saved with `checkpoint.optimizer_format=dp_reshardable` resumes bitwise at its
layout, resumes at another DP size (TP1 x DP2 saved, one process resumes), and is refused,
naming the key, at another TP.

Slow: the same without the distributed optimizer (TP2 -> TP1 and PP2), and with bf16
parameters (TP2 -> TP2 bitwise, TP2 -> TP1xDP2).
"""

from __future__ import annotations

import json
import os

import pytest
from multirank import start_workers

from megatron_mopd.errors import UserError

WORKER = os.path.join(os.path.dirname(__file__), "workers", "train_state_cases.py")
TOLERANCE = 1e-5

CASES = [
    {"name": "save", "tp": 2, "save": "a", "start": 2},
    {"name": "tp2", "tp": 2, "load": "a", "start": 2},
    {"name": "tp1dp2", "tp": 1, "load": "a", "start": 2},
    {"name": "ep2", "ep": 2, "load": "a", "start": 2},
    {"name": "pp2", "pp": 2, "load": "a", "start": 2},
    {"name": "model-only", "tp": 1, "load": "a", "start": 2, "model_only": True},
    {"name": "fresh", "tp": 1, "save": "b", "start": 0},
    {"name": "fresh-tp2", "tp": 2, "load": "b", "start": 0},
]
BF16_CASES = [
    {"name": "save", "tp": 2, "save": "a", "start": 2, "dtype": "bf16"},
    {"name": "tp2", "tp": 2, "load": "a", "start": 2, "dtype": "bf16"},
    {"name": "tp1dp2", "tp": 1, "load": "a", "start": 2, "dtype": "bf16"},
]
DP_RESHARDABLE_CASES = [
    {"name": "save", "tp": 2, "save": "a", "start": 2, "format": "dp_reshardable"},
    {"name": "tp2", "tp": 2, "load": "a", "start": 2},
    {"name": "tp1dp2", "tp": 1, "load": "a", "start": 2, "expect_error": True},
    {"name": "save-dp2", "tp": 1, "save": "b", "start": 2, "format": "dp_reshardable"},
]
# one process: the TP1 x DP2 state above resumed at DP1
DP_RESHARDABLE_DP1_CASES = [{"name": "dp1", "tp": 1, "load": "b", "start": 2}]
PLAIN_CASES = [
    {"name": "save", "tp": 2, "save": "a", "start": 2, "distopt": False},
    {"name": "tp1dp2", "tp": 1, "load": "a", "start": 2, "distopt": False},
    {"name": "pp2", "pp": 2, "load": "a", "start": 2, "distopt": False},
]


class StateRuns:
    def __init__(self, root: str):
        self.root = root
        self._results: dict[str, dict] = {}

    def results(self, group: str) -> dict:
        if group not in self._results:
            cases = {
                "distopt": CASES,
                "plain": PLAIN_CASES,
                "bf16": BF16_CASES,
                "dp_reshardable": DP_RESHARDABLE_CASES,
                "dp_reshardable_dp1": DP_RESHARDABLE_DP1_CASES,
            }[group]
            out = os.path.join(self.root, group)
            ckpt = os.path.join(out, "ckpt")
            nproc = 2
            if group == "dp_reshardable_dp1":  # the checkpoints of the 2-process group
                ckpt = os.path.join(self.root, "dp_reshardable", "ckpt")
                self.results("dp_reshardable")
                nproc = 1
            launch = start_workers(
                WORKER,
                nproc,
                ["--ckpt", ckpt, "--cases", json.dumps(cases)],
                out_dir=out,
                timeout=900,
            )
            ranks = launch.wait()
            print(f"[train-state] {group}: launch {launch.seconds:.1f} s")
            for name, r in ranks[0].items():
                print(f"    {name}: {r['seconds']:.1f} s (save/load {r['io_seconds']:.2f} s)")
            self._results[group] = ranks[0]
        return self._results[group]


@pytest.fixture(scope="module")
def state_runs(tmp_path_factory) -> StateRuns:
    return StateRuns(str(tmp_path_factory.mktemp("train_state")))


def _check(
    results: dict, reference: str, name: str, exact: bool, tolerance: float = TOLERANCE
) -> None:
    ref, got = results[reference], results[name]
    assert got["lrs"] == ref["lrs"] and got["lr_at_resume"] == ref["lr_at_resume"]
    assert got["scheduler_steps"] == ref["scheduler_steps"]
    diffs = [abs(a - b) for a, b in zip(got["losses"], ref["losses"])]
    print(
        f"[train-state] {name} vs {reference}: losses {got['losses']}, max |diff| {max(diffs):.2e}"
    )
    if exact:
        assert got["losses"] == ref["losses"]
        assert got["grad_norms"] == ref["grad_norms"]
    else:
        assert max(diffs) < tolerance


@pytest.mark.multirank
@pytest.mark.parametrize(
    "name,exact", [("tp2", True), ("tp1dp2", False), ("ep2", False), ("pp2", False)]
)
def test_resume_with_distributed_optimizer(state_runs: StateRuns, name: str, exact: bool):
    results = state_runs.results("distopt")
    assert results["save"]["layout"] == (2, 1, 1, 2, 1)
    _check(results, "save", name, exact)


@pytest.mark.multirank
def test_training_checkpoint_is_a_megatron_checkpoint(state_runs: StateRuns):
    """Saved with its model config, the folder is also a Megatron checkpoint: its model
    part loads with `load_mcore_checkpoint` (at another layout), the first step's loss
    (which depends on the weights only) is the reference's."""
    results = state_runs.results("distopt")
    assert results["save"]["described_experts"] == 4
    ref, got = results["save"]["losses"][0], results["model-only"]["losses"][0]
    assert abs(got - ref) < TOLERANCE


@pytest.mark.multirank
def test_resume_before_the_first_step(state_runs: StateRuns):
    results = state_runs.results("distopt")
    _check(results, "fresh", "fresh-tp2", exact=False)


@pytest.mark.multirank
def test_resume_dp_reshardable(state_runs: StateRuns):
    """`checkpoint.optimizer_format=dp_reshardable`: resumes bitwise at the saved layout,
    and at another TP is refused with a message naming the key and both layouts."""
    results = state_runs.results("dp_reshardable")
    _check(results, "save", "tp2", exact=True)
    msg = results["tp1dp2"]["error"]
    assert "checkpoint.optimizer_format=dp_reshardable" in msg, msg
    assert "TP2 PP1 EP1" in msg and "this run is TP1 PP1 EP1" in msg, msg


@pytest.mark.multirank
def test_resume_dp_reshardable_at_another_dp_size(state_runs: StateRuns):
    """A dp_reshardable state saved at TP1 x DP2 resumes in one process (DP1)."""
    saved = state_runs.results("dp_reshardable")["save-dp2"]
    assert saved["layout"] == (1, 1, 1, 1, 2)
    results = {"save-dp2": saved, **state_runs.results("dp_reshardable_dp1")}
    assert results["dp1"]["layout"] == (1, 1, 1, 1, 1)
    _check(results, "save-dp2", "dp1", exact=False)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp1dp2", "pp2"])
def test_resume_without_distributed_optimizer(state_runs: StateRuns, name: str):
    _check(state_runs.results("plain"), "save", name, exact=False)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("name,exact", [("tp2", True), ("tp1dp2", False)])
def test_resume_bf16(state_runs: StateRuns, name: str, exact: bool):
    """bf16 parameters (fp32 main parameters in the optimizer): bitwise at the same layout;
    at another layout as close as bf16 forward passes at two layouts are (~2e-4 here)."""
    _check(state_runs.results("bf16"), "save", name, exact, tolerance=1e-3)


def test_missing_or_partial_training_checkpoint(tmp_path):
    from megatron_mopd.student.state import load_training_state

    with pytest.raises(UserError, match="no such directory"):
        load_training_state([], None, None, str(tmp_path / "nope"))
    (tmp_path / "partial").mkdir()
    with pytest.raises(UserError, match="no metadata.json"):
        load_training_state([], None, None, str(tmp_path / "partial"))
