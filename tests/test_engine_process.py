"""The embedded rollout engine in a child process (`rollout/engine_process.py`).

Against the in-process engine on the same weights and seeds: the same rollouts (ids,
log mu, finish reasons), streamed pieces included, before and after a weight update sent
as tensors; a child killed mid-run is a `TeacherError` naming the engine and the signal
(no hang); `close()` leaves no process; a bad model folder is the child's `UserError`.
Also that the child samples while this process is busy (two cores: the figure is in
`tools/bench_overlap.py`; here only that the call returns correct rollouts meanwhile).
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from megatron_mopd.errors import TeacherError, UserError
from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine
from megatron_mopd.rollout.engine_process import SubprocessRolloutEngine
from megatron_mopd.toy.tiny import make_tiny_hf_model
from megatron_mopd.types import SamplingParams


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return make_tiny_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("s") / "student"), seed=0)


PROMPTS = [[3, 5, 7], [4, 4], [9, 2, 6, 1], [3, 5, 7]] * 3


def key(rollouts):
    return [(r.response_ids, r.rollout_logprobs, r.finish_reason) for r in rollouts]


def same_experts(got, want) -> bool:
    """The routed experts came back as int32 tensors equal to the in-process ones."""
    return all(
        isinstance(g.routed_experts, torch.Tensor)
        and g.routed_experts.dtype == torch.int32
        and torch.equal(g.routed_experts, w.routed_experts)
        for g, w in zip(got, want, strict=True)
    )


def test_same_rollouts_as_in_process_and_after_an_update(student):
    sampling = SamplingParams(max_new_tokens=5, seed=11)
    local = EmbeddedRolloutEngine(student, seed=3, batch_size=5)
    child = SubprocessRolloutEngine({"hf_path": student, "seed": 3, "batch_size": 5})
    try:
        want = local.generate(PROMPTS, sampling)
        got = child.generate(PROMPTS, sampling)
        assert key(got) == key(want)
        assert same_experts(got, want)  # sent as numpy arrays inside the answer
        pieces = list(child.generate_stream(PROMPTS, sampling))
        assert [idx for idx, _ in pieces] == [list(range(0, 5)), list(range(5, 10)), [10, 11]]
        joined = [None] * len(PROMPTS)
        for idx, rolls in pieces:
            for i, r in zip(idx, rolls):
                joined[i] = r
        assert key(joined) == key(want)

        # new weights: every tensor scaled, sent as tensors
        sd = {k: v * 1.5 for k, v in local.engine.model.state_dict().items()}
        local.update_weights_from_state_dict(dict(sd), "step_1")
        child.update_weights_from_state_dict(sd.items(), "step_1")
        assert child.weight_version == "step_1"
        after = local.generate(PROMPTS, sampling)
        got = child.generate(PROMPTS, sampling)
        assert key(got) == key(after) and key(after) != key(want)
        assert {r.weight_version for r in got} == {"step_1"}
    finally:
        child.close()
        local.close()


def test_killed_child_is_a_clear_error_and_close_leaves_nothing(student):
    child = SubprocessRolloutEngine({"hf_path": student, "seed": 3}, timeout_seconds=60)
    pid = child.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(
        TeacherError, match=r"embedded rollout engine .*died \(killed by signal 9\)"
    ):
        child.generate(PROMPTS, SamplingParams(max_new_tokens=3, seed=1))
    child.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    child = SubprocessRolloutEngine({"hf_path": student, "seed": 3})
    pid = child.pid
    child.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_bad_folder_is_the_childs_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load"):
        SubprocessRolloutEngine({"hf_path": str(tmp_path / "missing")}, timeout_seconds=120)


def test_samples_while_this_process_computes(student):
    child = SubprocessRolloutEngine({"hf_path": student, "seed": 3})
    try:
        stream = child.generate_stream(PROMPTS, SamplingParams(max_new_tokens=4, seed=2))
        a = torch.randn(256, 256)
        for _ in range(50):  # busy here while the child samples
            a = torch.tanh(a @ a.T / 256)
        rolls = [r for _, piece in stream for r in piece]
        assert len(rolls) == len(PROMPTS) and all(r.response_ids for r in rolls)
    finally:
        child.close()
