"""Parity of the Megatron student across parallel layouts (multi-process, gloo, CPU).

One train step (8 sequences of uneven lengths, micro-batches of 2, Adam) of a tiny MoE
(Qwen3-MoE-like, gated shared expert) and a tiny dense model (Qwen2-like, tied
embeddings) gives the same loss and grad norm within 1e-5 at every layout as in a
single process, and the same log-probs before (1e-5) and after (1e-4: Adam's first step
is sign-like, so rounding-level gradient differences move near-zero entries) the step.

Launches are expensive (~15 s of imports each on 2 cores), so each runs many cases
(tests/workers/student_cases.py) and is cached for the session: the single-process
reference (plain `python`, no torchrun: the world-size-1 path) and the 2-process launch
run concurrently; the 4-process launch is `slow`.
"""

from __future__ import annotations

import json

import pytest
import torch
from multirank import start_workers

pytestmark = pytest.mark.multirank

WORKER = "tests/workers/student_cases.py"
REFERENCE = [
    {"name": "moe_ref", "model": "moe"},
    {"name": "dense_ref", "model": "dense"},
    {"name": "dense_nan", "model": "dense", "nan": "all", "warmup": 4},
]
TWO_RANKS = [
    {"name": "moe_tp2", "model": "moe", "tp": 2},  # ETP2 (default ETP = TP), SP auto-on
    {"name": "moe_dp2", "model": "moe"},
    {"name": "moe_dp2_distopt", "model": "moe", "distopt": True},
    {"name": "moe_pp2", "model": "moe", "pp": 2},
    {"name": "moe_ep2", "model": "moe", "ep": 2},  # alltoall dispatcher
    {
        "name": "moe_tp2ep2_ag",
        "model": "moe",
        "tp": 2,
        "ep": 2,
        "etp": 1,
        "dispatcher": "allgather",
    },
    {"name": "dense_tp2", "model": "dense", "tp": 2},
    {"name": "dense_dp2", "model": "dense"},
    {"name": "dense_pp2", "model": "dense", "pp": 2},  # tied embeddings across stages
    {"name": "dense_dp2_nan", "model": "dense", "nan": "rank0"},  # NaN on one rank only
]
PARITY = [c["name"] for c in TWO_RANKS if "nan" not in c]
FOUR_RANKS = [
    {"name": "moe_tp2ep2etp2", "model": "moe", "tp": 2, "ep": 2, "etp": 2},
    {
        "name": "moe_tp2ep2etp2_ag",
        "model": "moe",
        "tp": 2,
        "ep": 2,
        "etp": 2,
        "dispatcher": "allgather",
    },
    {"name": "moe_tp2pp2ep2", "model": "moe", "tp": 2, "pp": 2, "ep": 2, "etp": 1},
    {"name": "moe_ep4", "model": "moe", "ep": 4},
    {"name": "moe_pp2dp2_distopt", "model": "moe", "pp": 2, "distopt": True},
    {"name": "dense_tp2dp2_distopt", "model": "dense", "tp": 2, "distopt": True},
    {"name": "dense_tp2pp2", "model": "dense", "tp": 2, "pp": 2},
]


@pytest.fixture(scope="session")
def student_launches():
    """The reference and the 2-process launch, started together; results per rank."""
    reference = start_workers(WORKER, 1, ["--cases", json.dumps(REFERENCE)], torchrun=False)
    two = start_workers(WORKER, 2, ["--cases", json.dumps(TWO_RANKS)], timeout=420)
    try:
        return {"reference": reference.wait()[0], "two": two.wait()}
    finally:
        for launch in (reference, two):
            if launch.proc.poll() is None:
                launch.proc.kill()


@pytest.fixture(scope="session")
def four_rank_results():
    return start_workers(WORKER, 4, ["--cases", json.dumps(FOUR_RANKS)], timeout=600).wait()


def _reference(launches, name):
    return launches["reference"][name.split("_")[0] + "_ref"]


def _check_against_reference(result, reference):
    assert not result["skipped"]
    assert result["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert result["grad_norm"] == pytest.approx(reference["grad_norm"], abs=1e-5)
    assert (result["logprobs_before"] - reference["logprobs_before"]).abs().max() < 1e-5
    assert (result["logprobs_after"] - reference["logprobs_after"]).abs().max() < 1e-4


@pytest.mark.parametrize("name", PARITY)
def test_two_ranks_match_single_process(student_launches, name):
    ranks = student_launches["two"]
    reference = _reference(student_launches, name)
    for rank in ranks:  # loss, grad norm and log-probs are available on every rank
        _check_against_reference(rank[name], reference)


def test_training_changed_the_model(student_launches):
    for name in ("moe_ref", "dense_ref"):
        reference = student_launches["reference"][name]
        assert reference["lr"] == pytest.approx(1e-2)
        assert (reference["logprobs_after"] - reference["logprobs_before"]).abs().max() > 1e-2


def test_non_finite_gradients_skip_the_step(student_launches):
    single = student_launches["reference"]["dense_nan"]
    results = [single] + [rank["dense_dp2_nan"] for rank in student_launches["two"]]
    for result in results:  # with DP2 only rank 0 saw a NaN: both ranks skip
        assert result["skipped"] is True
        assert torch.equal(result["logprobs_after"], result["logprobs_before"])
    assert single["lr"] == pytest.approx(1e-2 / 4)  # warmup: step 1 of 4


def test_gradient_contract_dp2(student_launches):
    """DP2 with 2 micro-batches per rank = one process with all 4: no extra division by
    the number of micro-batches or by the DP size."""
    for model in ("moe", "dense"):
        reference = student_launches["reference"][f"{model}_ref"]
        assert reference["micro_batches"] == 4
        for rank in student_launches["two"]:
            dp2 = rank[f"{model}_dp2"]
            assert dp2["micro_batches"] == 2
            assert dp2["sequences"] == 8.0  # metrics are summed over micro-batches and DP
            assert dp2["loss"] == pytest.approx(reference["loss"], abs=1e-6)
            assert dp2["grad_norm"] == pytest.approx(reference["grad_norm"], abs=1e-6)


def test_dispatchers_agree(student_launches):
    """EP2 (alltoall) and TP2xEP2 (allgather) give the same step."""
    for rank in student_launches["two"]:
        a, b = rank["moe_ep2"], rank["moe_tp2ep2_ag"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        assert (a["logprobs_after"] - b["logprobs_after"]).abs().max() < 1e-4


def test_distributed_optimizer_agrees(student_launches):
    for rank in student_launches["two"]:
        plain, distopt = rank["moe_dp2"], rank["moe_dp2_distopt"]
        assert distopt["grad_norm"] == pytest.approx(plain["grad_norm"], abs=1e-6)
        assert (distopt["logprobs_after"] - plain["logprobs_after"]).abs().max() < 1e-6


def test_sequence_parallel_is_automatic_for_moe(student_launches):
    rank = student_launches["two"][0]
    assert rank["moe_tp2"]["sequence_parallel"] is True
    assert rank["dense_tp2"]["sequence_parallel"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", [c["name"] for c in FOUR_RANKS])
def test_four_ranks_match_single_process(student_launches, four_rank_results, name):
    reference = _reference(student_launches, name)
    for rank in four_rank_results:
        _check_against_reference(rank[name], reference)
