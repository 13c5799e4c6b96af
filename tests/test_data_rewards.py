"""Prompt datasets, the resumable sampler, rewards, batch packing and the metrics log."""

import json

import pytest
import torch

from megatron_mopd.batch import build_train_batch
from megatron_mopd.data import PromptSampler, load_prompts, tokenize_prompts
from megatron_mopd.errors import ConfigError, UserError
from megatron_mopd.logger import MetricsLogger
from megatron_mopd.rewards import exact_match, load_reward_fn, math_answer_match
from megatron_mopd.types import Rollout, ScoreResult


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_load_prompts_ok(tmp_path):
    p = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "1+1=", "domain": "add", "answer": "2"}),
            "",
            json.dumps({"prompt_ids": [1, 5], "domain": "rev"}),
        ],
    )
    recs = load_prompts(p, known_domains={"add", "rev"})
    assert [r.domain for r in recs] == ["add", "rev"]
    assert recs[1].prompt_ids == [1, 5] and recs[1].source.endswith("d.jsonl:3")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        (json.dumps({"prompt": "x"}), "d.jsonl:2: missing field 'domain'"),
        (json.dumps({"domain": "add"}), "d.jsonl:2: missing field 'prompt'"),
        (json.dumps({"prompt": "x", "domain": "math"}), "d.jsonl:2: domain 'math' has no teacher"),
        (json.dumps({"prompt_ids": [], "domain": "add"}), "d.jsonl:2: 'prompt_ids' must be"),
        ("[1, 2]", "d.jsonl:2: a record must be a JSON object"),
    ],
)
def test_load_prompts_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "1+1=", "domain": "add", "answer": "2"})
    p = _write(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_prompts(p, known_domains={"add"})


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_tokenize_prompts(tmp_path):
    from megatron_mopd.toy.tiny import make_char_tokenizer

    tok = make_char_tokenizer(str(tmp_path / "tok"))
    p = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "12+3=", "domain": "add"})])
    ids = tokenize_prompts(load_prompts(p), tok)[0]
    assert tok.decode(ids) == "12+3="  # the char tokenizer adds no special tokens
    with pytest.raises(UserError, match="max_prompt_length"):
        tokenize_prompts(load_prompts(p), tok, max_prompt_length=3)


def test_sampler_resume_is_exact():
    a = PromptSampler(7, seed=3)
    first = a.next(5)
    state = a.state()
    rest = a.next(12)
    b = PromptSampler(7, seed=3)
    b.load_state(state)
    assert b.next(12) == rest
    # every epoch is a permutation
    c = PromptSampler(7, seed=3)
    assert sorted(c.next(7)) == list(range(7)) and first == PromptSampler(7, 3).next(5)
    with pytest.raises(UserError, match="dataset of 7 prompts"):
        PromptSampler(8, seed=3).load_state(state)


def test_rewards():
    assert exact_match(" 42\n", "42") == 1.0 and exact_match("41", "42") == 0.0
    assert math_answer_match("so the answer is 1,234.", "1234") == 1.0
    assert math_answer_match("\\boxed{3/4}", "0.75") == 1.0
    assert math_answer_match("x = 5 then 7", "5") == 0.0
    assert load_reward_fn("math") is math_answer_match
    assert load_reward_fn("megatron_mopd.rewards:exact_match") is exact_match
    with pytest.raises(ConfigError, match="rewards.add='nope'"):
        load_reward_fn("nope", key="rewards.add")
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")


def test_build_train_batch_positions():
    r = [
        Rollout([1, 2], [3, 4, 5], [-0.1, -0.2, -0.3], "stop", "v1"),
        Rollout([1], [6], [-0.5], "length", "v1"),
    ]
    s = [ScoreResult([-1.0, -2.0, -3.0]), ScoreResult([-4.0])]
    b = build_train_batch(r, s, ["a", "b"], ["a", "b"], pad_to_multiple=4)
    assert b.tokens_B_T.shape == (2, 8)
    assert b.tokens_B_T[0, :5].tolist() == [1, 2, 3, 4, 5]
    assert b.mask_B_T[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert b.mask_B_T[1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert b.teacher_logprobs_B_T[0, 2:5].tolist() == [-1.0, -2.0, -3.0]
    assert torch.allclose(b.rollout_logprobs_B_T[1, 1], torch.tensor(-0.5))
    assert b.domain_ids_B.tolist() == [0, 1] and b.lengths_B.tolist() == [5, 2]
    sub = b.select(torch.tensor([1]))
    assert sub.size == 1 and sub.lengths_B.tolist() == [2]
    with pytest.raises(ValueError, match="sequence 0"):
        build_train_batch(r, [ScoreResult([-1.0]), s[1]], ["a", "b"], ["a", "b"])


def test_metrics_logger_truncate_on_resume(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=True)
    for step in range(1, 5):
        log.log(step, {"loss": float(step), "nan": float("nan")})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # a half-written row from a crash
    log.truncate_after(2)
    rows = [json.loads(x) for x in open(log.path)]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["nan"] == "nan"
    log.close()
    assert any((tmp_path / "tensorboard").iterdir())


def test_metrics_logger_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        MetricsLogger(str(blocker / "run"), tensorboard=False)
