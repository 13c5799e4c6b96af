"""Routing requests to the teacher of their domain (teachers/router.py)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from megatron_mopd.config import load_config
from megatron_mopd.errors import ConfigError, TeacherError
from megatron_mopd.teachers.base import Teacher
from megatron_mopd.teachers.router import TeacherRouter, build_teachers, check_domains
from megatron_mopd.types import ScoreRequest, ScoreResult


class FakeTeacher(Teacher):
    """Log-prob of token t = -(tag + t / 1000): the answer says who scored it."""

    def __init__(self, name: str, tag: float, fail: Exception | None = None, nan: bool = False):
        self.name, self.tag, self.fail, self.nan = name, tag, fail, nan
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def score(self, requests, top_k=0):
        self.calls.append(len(requests))
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        out = []
        for r in requests:
            lps = [-(self.tag + t / 1000) for t in r.input_ids[r.response_start :]]
            if self.nan:
                lps[-1] = math.nan
            top = top_lp = None
            if top_k:
                top = torch.tensor(r.input_ids[r.response_start :])[:, None].repeat(1, top_k)
                top_lp = torch.tensor(lps)[:, None].repeat(1, top_k)
            out.append(ScoreResult(lps, top, top_lp))
        return out


def _cfg(*extra: str):
    return load_config(
        None,
        [
            "teachers.mathT.backend=sglang",
            "teachers.mathT.urls=[http://10.0.0.1:30000, http://10.0.0.2:30000]",
            "teachers.mathT.domains=[math, arith]",
            "teachers.codeT.hf_path=/models/code",
            "teachers.codeT.domains=[code]",
            *extra,
        ],
    )


def _req(i: int, n: int = 3) -> ScoreRequest:
    return ScoreRequest(input_ids=[1] + [10 * i + t for t in range(n)], response_start=1)


def test_routes_by_domain_preserving_order_and_counts():
    teachers = {"mathT": FakeTeacher("mathT", 1.0), "codeT": FakeTeacher("codeT", 2.0)}
    router = TeacherRouter.from_config(_cfg(), teachers)
    domains = ["code", "math", "arith", "code", "math"]
    reqs = [_req(i, n=i + 1) for i in range(len(domains))]
    results = router.score(reqs, domains)
    tag = {"code": 2.0, "math": 1.0, "arith": 1.0}
    for req, dom, res in zip(reqs, domains, results):
        assert res.logprobs == [-(tag[dom] + t / 1000) for t in req.input_ids[1:]]
    # one batch per teacher, whatever the number of its domains
    assert teachers["mathT"].calls == [3] and teachers["codeT"].calls == [2]
    counts = router.take_counts()
    assert {d: (c.sequences, c.tokens) for d, c in counts.items()} == {
        "code": (2, 1 + 4),
        "math": (2, 2 + 5),
        "arith": (1, 3),
    }
    assert router.take_counts() == {}


def test_top_k_per_teacher_or_per_call():
    teachers = {"mathT": FakeTeacher("mathT", 1.0), "codeT": FakeTeacher("codeT", 2.0)}
    router = TeacherRouter.from_config(_cfg("teachers.codeT.top_k=2"), teachers)
    results = router.score([_req(0), _req(1)], ["math", "code"])
    assert results[0].top_ids is None
    assert results[1].top_ids.tolist() == [[10, 10], [11, 11], [12, 12]]
    results = router.score([_req(0)], ["math"], top_k=3)
    assert results[0].top_ids.shape == (3, 3)


def test_top_k_ids_past_the_students_vocabulary_are_refused():
    teachers = {"mathT": FakeTeacher("mathT", 1.0), "codeT": FakeTeacher("codeT", 2.0)}
    router = TeacherRouter.from_config(_cfg(), teachers, vocab_size=12)
    assert router.score([_req(1, n=2)], ["code"], top_k=2)[0].top_ids.max() == 11
    with pytest.raises(
        TeacherError, match=r"teacher 'codeT' .*token 2: top-k id outside \[0, 12\)"
    ):
        router.score([_req(1, n=3)], ["code"], top_k=2)  # ids 10, 11, 12
    unbounded = TeacherRouter.from_config(_cfg(), teachers)
    assert unbounded.score([_req(1, n=3)], ["code"], top_k=2)[0].top_ids.max() == 12


def test_teachers_run_concurrently():
    barrier = threading.Barrier(2, timeout=10)  # both teachers must be inside score at once

    class Meeting(FakeTeacher):
        def score(self, requests, top_k=0):
            barrier.wait()
            return super().score(requests, top_k)

    teachers = {"mathT": Meeting("mathT", 1.0), "codeT": Meeting("codeT", 2.0)}
    router = TeacherRouter.from_config(_cfg(), teachers)
    results = router.score([_req(0), _req(1)], ["code", "math"])
    assert results[0].logprobs[0] == pytest.approx(-2.0)
    assert teachers["mathT"].threads != teachers["codeT"].threads


def test_default_teacher_and_unknown_domain():
    teachers = {"mathT": FakeTeacher("mathT", 1.0), "codeT": FakeTeacher("codeT", 2.0)}
    router = TeacherRouter.from_config(_cfg("default_teacher=codeT"), teachers)
    assert router.score([_req(0)], ["poetry"])[0].logprobs[0] == pytest.approx(-2.0)
    check_domains(_cfg("default_teacher=codeT"), ["poetry", "math"])

    router = TeacherRouter.from_config(_cfg(), teachers)
    calls_before = list(teachers["mathT"].calls)
    with pytest.raises(ConfigError, match="'poetry' has no teacher"):
        router.score([_req(0), _req(1)], ["math", "poetry"])
    assert teachers["mathT"].calls == calls_before  # refused before anything was scored


def test_check_domains_before_training():
    cfg = _cfg()
    check_domains(cfg, ["math", "code", "arith"])
    with pytest.raises(ConfigError) as e:
        check_domains(cfg, ["math", "poetry", "law", "code"])
    msg = str(e.value)
    assert "'law'" in msg and "'poetry'" in msg and "default_teacher" in msg
    assert "codeT" in msg and "mathT" in msg


def test_failures_name_teacher_urls_and_domain():
    teachers = {
        "mathT": FakeTeacher("mathT", 1.0, fail=ConnectionError("connection refused")),
        "codeT": FakeTeacher("codeT", 2.0),
    }
    router = TeacherRouter.from_config(_cfg(), teachers)
    with pytest.raises(TeacherError) as e:
        router.score([_req(0), _req(1)], ["code", "arith"])
    msg = str(e.value)
    assert "'mathT'" in msg and "http://10.0.0.1:30000, http://10.0.0.2:30000" in msg
    assert "'arith'" in msg and "connection refused" in msg

    teachers["codeT"] = FakeTeacher("codeT", 2.0, nan=True)
    router = TeacherRouter.from_config(_cfg(), teachers)
    with pytest.raises(TeacherError, match=r"'codeT' \(hf_path=/models/code\).*'code'.*nan"):
        router.score([_req(0)], ["code"])


def test_wrong_number_of_results_is_an_error():
    class Short(FakeTeacher):
        def score(self, requests, top_k=0):
            return super().score(requests[:-1], top_k)

    router = TeacherRouter.from_config(
        _cfg(), {"mathT": Short("mathT", 1.0), "codeT": FakeTeacher("codeT", 2.0)}
    )
    with pytest.raises(TeacherError, match="'mathT'.*1 results for 2 requests"):
        router.score([_req(0), _req(1)], ["math", "math"])


def test_build_teachers_embedded(tmp_path):
    from megatron_mopd.teachers.embedded import EmbeddedTeacher
    from megatron_mopd.toy.tiny import make_tiny_hf_model

    hf = make_tiny_hf_model("qwen3", str(tmp_path / "t"), seed=0)
    cfg = load_config(None, [f"teachers.t.hf_path={hf}", "teachers.t.domains=[x]"])
    teachers = build_teachers(cfg)
    assert isinstance(teachers["t"], EmbeddedTeacher) and teachers["t"].name == "t"
    router = TeacherRouter.from_config(cfg, teachers)
    (res,) = router.score([ScoreRequest([1, 20, 21, 22], 2)], ["x"])
    assert len(res.logprobs) == 2 and all(lp < 0 for lp in res.logprobs)
    router.close()

    bad = load_config(None, [f"teachers.t.hf_path={tmp_path}/missing", "teachers.t.domains=[x]"])
    with pytest.raises(TeacherError, match="teacher 't'.*missing"):
        build_teachers(bad)
