"""Embedded teachers in a shared child process (`teachers/process.py`).

Against in-process teachers on the same weights: the same log-probs and top-k, bitwise;
a bad request is the same `TeacherError`; a child killed mid-run is a `TeacherError`
naming the teachers and the signal (no hang); closing every teacher leaves no process;
`teachers.<name>.subprocess` resolves (auto = with `rollout.overlap`) and is refused for
an SGLang teacher, naming the key.
"""

from __future__ import annotations

import os
import signal

import pytest

from megatron_mopd.config import Config, TeacherConfig
from megatron_mopd.errors import ConfigError, TeacherError
from megatron_mopd.teachers.embedded import EmbeddedTeacher
from megatron_mopd.teachers.process import SubprocessTeacher, TeacherHost
from megatron_mopd.teachers.router import teacher_in_subprocess
from megatron_mopd.toy.tiny import make_tiny_hf_model
from megatron_mopd.types import ScoreRequest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("t")
    return {
        "adder": make_tiny_hf_model("qwen3_moe", str(root / "a"), seed=1),
        "reverser": make_tiny_hf_model("qwen3", str(root / "r"), seed=2),
    }


REQUESTS = [ScoreRequest([3, 5, 7, 9, 11], 2), ScoreRequest([4, 4, 8], 1)] * 3


def as_lists(results):
    top = [
        r.top_ids if r.top_ids is None else [list(map(int, x)) for x in r.top_ids] for r in results
    ]
    return [list(map(float, r.logprobs)) for r in results], top


def test_same_scores_as_in_process_and_clear_errors(models):
    configs = {n: TeacherConfig(domains=[n], hf_path=p) for n, p in models.items()}
    host = TeacherHost(configs, timeout_seconds=60)
    remote = {n: SubprocessTeacher(n, host) for n in models}
    try:
        for name, path in models.items():
            local = EmbeddedTeacher(name, path)
            for top_k in (0, 3):
                got = remote[name].score(REQUESTS, top_k=top_k)
                want = local.score(REQUESTS, top_k=top_k)
                assert as_lists(got) == as_lists(want)
            bad = [ScoreRequest([3, 5, 10**6], 1)]
            with pytest.raises(TeacherError) as in_process:
                local.score(bad)
            with pytest.raises(TeacherError) as in_child:
                remote[name].score(bad)
            assert str(in_child.value) == str(in_process.value)
            assert name in str(in_child.value)
        os.kill(host.pid, signal.SIGKILL)
        with pytest.raises(
            TeacherError,
            match=r"embedded teachers adder, reverser .*died "
            r"\(killed by signal 9\)",
        ):
            remote["adder"].score(REQUESTS)
    finally:
        for teacher in remote.values():
            teacher.close()
    with pytest.raises(ProcessLookupError):
        os.kill(host.pid, 0)


def test_closing_every_teacher_stops_the_child(models):
    host = TeacherHost({"adder": TeacherConfig(domains=["a"], hf_path=models["adder"])})
    teacher = SubprocessTeacher("adder", host)
    assert len(teacher.score(REQUESTS[:1])[0].logprobs) == 3
    teacher.close()
    with pytest.raises(ProcessLookupError):
        os.kill(host.pid, 0)


def test_subprocess_setting_resolves_and_is_checked():
    cfg = Config()
    emb = TeacherConfig(domains=["a"], hf_path="x")
    assert not teacher_in_subprocess(cfg, emb)
    cfg.rollout.overlap = True
    assert teacher_in_subprocess(cfg, emb)
    emb.subprocess = "off"
    assert not teacher_in_subprocess(cfg, emb)
    remote = TeacherConfig(domains=["a"], backend="sglang", urls=["http://127.0.0.1:1"])
    assert not teacher_in_subprocess(cfg, remote)
    remote.subprocess = "on"
    with pytest.raises(ConfigError, match=r"teachers\.math\.subprocess=on"):
        remote.validate("teachers.math")
