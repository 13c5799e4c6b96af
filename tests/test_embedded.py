"""Embedded teacher and rollout engine against a direct transformers forward (tiny models)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mopd.errors import TeacherError, UserError
from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine, request_seeds
from megatron_mopd.rollout.hf_engine import ScoreOutput
from megatron_mopd.teachers.embedded import EmbeddedTeacher
from megatron_mopd.toy.tiny import make_tiny_hf_model
from megatron_mopd.types import SamplingParams, ScoreRequest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    a = make_tiny_hf_model("qwen3_moe", str(root / "a"), seed=0)
    b = make_tiny_hf_model("qwen3_moe", str(root / "b"), seed=1)
    return a, b


def direct_logprobs(hf_dir: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 (index i-1), plus the full distributions."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return _forward(model, ids)


def _forward(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)  # row i predicts ids[i + 1]


def _requests() -> list[ScoreRequest]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, start in ((9, 3), (17, 1), (5, 4), (12, 6)):
        ids = torch.randint(4, 100, (length,), generator=gen).tolist()
        out.append(ScoreRequest(input_ids=ids, response_start=start))
    return out


def test_teacher_logprobs_and_topk_match_transformers(models):
    import transformers

    hf_a, _ = models
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_a, dtype=torch.float32)
    teacher = EmbeddedTeacher("math", hf_a, batch_size=3)  # two engine calls, padded batches
    reqs = _requests()
    results = teacher.score(reqs, top_k=5)
    assert len(results) == len(reqs)
    for req, res in zip(reqs, results):
        ref = _forward(model, req.input_ids)
        s = req.response_start
        want = ref[s - 1 :].gather(-1, torch.tensor(req.input_ids[s:])[:, None])[:, 0]
        assert len(res.logprobs) == len(req.input_ids) - s
        torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-5, rtol=0)
        top_v, top_i = ref[s - 1 :].topk(5, dim=-1)
        assert res.top_ids.dtype == torch.int64 and torch.equal(res.top_ids, top_i)
        torch.testing.assert_close(res.top_logprobs, top_v, atol=1e-5, rtol=0)
    assert teacher.score(reqs[:1])[0].top_ids is None


def test_teacher_errors_name_the_teacher(models):
    hf_a, _ = models
    teacher = EmbeddedTeacher("math", hf_a)
    with pytest.raises(TeacherError, match=r"teacher 'math' \(hf_path=.*\).*token id 500"):
        teacher.score([ScoreRequest(input_ids=[1, 2, 500], response_start=1)])
    with pytest.raises(TeacherError, match="response_start=0"):
        teacher.score([ScoreRequest(input_ids=[1, 2], response_start=0)])

    class NaNEngine:
        vocab_size = 128

        def score(self, input_ids, starts, top_k=0):
            return [ScoreOutput(logprobs=[-1.0, math.nan]) for _ in input_ids]

    bad = EmbeddedTeacher("code", "/models/code", engine=NaNEngine())
    with pytest.raises(TeacherError, match=r"teacher 'code' \(hf_path=/models/code\).*nan"):
        bad.score([ScoreRequest(input_ids=[1, 2, 3], response_start=1)])
    with pytest.raises(TeacherError, match="2 response tokens but 1 log-probs|1 response"):
        bad.score([ScoreRequest(input_ids=[1, 2, 3, 4], response_start=3)])


def key(rollouts):
    return [(r.response_ids, r.rollout_logprobs, r.finish_reason) for r in rollouts]


def test_rollout_seeded_reproducible_and_logprobs_match(models):
    hf_a, _ = models
    engine = EmbeddedRolloutEngine(hf_a, seed=0, batch_size=2)
    prompts = [[1, 20, 21, 22], [1, 30], [1, 20, 21, 22], [1, 20, 21, 22], [5]]  # repeats
    sp = SamplingParams(max_new_tokens=12, seed=123)
    first = engine.generate(prompts, sp)
    again = engine.generate(prompts, sp)
    assert key(first) == key(again)
    assert first[0].response_ids != first[2].response_ids != first[3].response_ids  # repeats
    other = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=124))
    assert [r.response_ids for r in other] != [r.response_ids for r in first]
    # generate == the chunks of generate_stream, joined; chunk c is seeded by seeds[c]
    pieces = list(engine.generate_stream(prompts, sp))
    assert [idx for idx, _ in pieces] == [[0, 1], [2, 3], [4]]
    assert key([r for _, rolls in pieces for r in rolls]) == key(first)
    seeds = request_seeds(123, 3)
    for c, (idx, rolls) in enumerate(pieces):
        outs = engine.engine.generate([prompts[i] for i in idx], sp, batch_seed=seeds[c])
        assert [o.output_ids for o in outs] == [r.response_ids for r in rolls]
    # a fresh engine with another batch_size is still reproducible on its own
    whole = EmbeddedRolloutEngine(hf_a, seed=0, batch_size=8, engine=engine.engine)
    assert key(whole.generate(prompts, sp)) == key(whole.generate(prompts, sp))
    assert len(list(whole.generate_stream(prompts, sp))) == 1
    assert len(set(request_seeds(7, 50))) == 50

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_a, dtype=torch.float32)
    for r in first:
        assert r.weight_version == engine.weight_version
        assert r.finish_reason in ("stop", "length")
        assert len(r.rollout_logprobs) == len(r.response_ids) >= 1
        ids = r.prompt_ids + r.response_ids
        ref = _forward(model, ids)
        s = len(r.prompt_ids)
        want = ref[s - 1 :].gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.rollout_logprobs), want, atol=1e-5, rtol=0)


def test_unseeded_rollouts_follow_the_engine_seed(models):
    hf_a, _ = models
    a = EmbeddedRolloutEngine(hf_a, seed=5, batch_size=2)
    b = EmbeddedRolloutEngine(hf_a, seed=5, batch_size=2, engine=a.engine)
    prompts = [[1, 20, 21, 22]] * 3
    sp = SamplingParams(max_new_tokens=10)
    a1, a2 = a.generate(prompts, sp), a.generate(prompts, sp)
    assert key(a1) != key(a2)  # each chunk draws a fresh seed
    assert key(b.generate(prompts, sp)) == key(a1)  # same engine seed, same sequence
    with pytest.raises(UserError, match="batch_size=0"):
        EmbeddedRolloutEngine(hf_a, batch_size=0, engine=a.engine)
    assert a.generate([], sp) == [] and list(a.generate_stream([], sp)) == []


def test_rollout_weight_refresh(models):
    hf_a, hf_b = models
    engine = EmbeddedRolloutEngine(hf_a, seed=0, weight_version="0")
    teacher_b = EmbeddedTeacher("b", hf_b)
    prompts = [[1, 20, 21, 22], [1, 30]]
    sp = SamplingParams(max_new_tokens=10, seed=5)
    before = engine.generate(prompts, sp)

    from safetensors.torch import load_file

    state_b = load_file(f"{hf_b}/model.safetensors")
    engine.update_weights_from_state_dict(state_b.items(), "step_1")
    assert engine.weight_version == "step_1"
    after = engine.generate(prompts, sp)
    assert all(r.weight_version == "step_1" for r in after)
    assert [r.rollout_logprobs for r in after] != [r.rollout_logprobs for r in before]
    # the refreshed engine computes exactly model b's log-probs
    reqs = [ScoreRequest(r.prompt_ids + r.response_ids, len(r.prompt_ids)) for r in after]
    for r, res in zip(after, teacher_b.score(reqs)):
        torch.testing.assert_close(
            torch.tensor(r.rollout_logprobs), torch.tensor(res.logprobs), atol=1e-5, rtol=0
        )

    engine.update_weights_from_disk(hf_a, "step_2")
    assert engine.weight_version == "step_2"
    back = engine.generate(prompts, sp)
    assert [r.response_ids for r in back] == [r.response_ids for r in before]
    torch.testing.assert_close(
        torch.tensor(sum((r.rollout_logprobs for r in back), [])),
        torch.tensor(sum((r.rollout_logprobs for r in before), [])),
        atol=1e-6,
        rtol=0,
    )


def test_bf16_rollouts_differ_from_the_fp32_forward_as_real_engines_do(models):
    """rollout.dtype=bf16: log mu comes from a bf16 forward of the same weights, so it
    differs from the fp32 log-probs (a real train/inference mismatch), by bf16's
    rounding and no more."""
    from megatron_mopd.config import load_config
    from megatron_mopd.rollout.factory import build_rollout_engine

    hf_a, _ = models
    cfg = load_config(None, [f"model.hf_path={hf_a}", "rollout.dtype=bf16", "rollout.batch_size=1"])
    engine = build_rollout_engine(cfg)
    assert engine.batch_size == 1  # the factory passes rollout.batch_size
    assert next(engine.engine.model.parameters()).dtype == torch.bfloat16
    rollouts = engine.generate(
        [[1, 20, 21, 22], [1, 30]], SamplingParams(max_new_tokens=12, seed=3)
    )
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_a, dtype=torch.float32)
    diffs = []
    for r in rollouts:
        ref = _forward(model, r.prompt_ids + r.response_ids)
        s = len(r.prompt_ids)
        want = ref[s - 1 :].gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
        diffs.append((torch.tensor(r.rollout_logprobs) - want).abs())
    d = torch.cat(diffs)
    assert d.mean() > 1e-4  # a real mismatch, unlike fp32's 1e-6
    assert d.max() < 0.2
