"""`HFEngine`: batched prefill scoring and seeded sampling with SGLang's log-prob rules."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_mopd.rollout.hf_engine import HFEngine, _truncate
from megatron_mopd.toy.tiny import make_tiny_hf_model
from megatron_mopd.types import SamplingParams

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model("qwen3_moe", str(tmp_path_factory.mktemp("m") / "m"), seed=3)


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine(model_dir, seed=0)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def full_logprobs(hf, ids, temperature=1.0):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0] / temperature, -1)


def test_score_padded_batch_matches_single_forward(engine, hf):
    seqs = [[1, 7, 8, 9, 10, 11, 12], [1, 40], [5, 6, 7, 8]]
    outs = engine.score(seqs, starts=[0, 1, 2], top_k=2)
    for s, st, o in zip(seqs, [0, 1, 2], outs):
        lp = full_logprobs(hf, s)
        assert len(o.logprobs) == len(s) - st
        assert (o.logprobs[0] is None) == (st == 0)
        for i in range(max(st, 1), len(s)):
            assert abs(o.logprobs[i - st] - lp[i - 1, s[i]].item()) < TOL
            assert o.top_ids[i - max(st, 1)].tolist() == lp[i - 1].topk(2).indices.tolist()
        assert o.top_ids.shape == o.top_logprobs.shape == (len(s) - max(st, 1), 2)
        assert o.top_ids.dtype == torch.int64 and o.top_logprobs.dtype == torch.float32


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    sp = SamplingParams(max_new_tokens=8, seed=11, top_k=20, top_p=0.9)
    alone = engine.generate([[1, 9, 9]], sp)[0]
    batch = engine.generate([[1, 2, 3, 4, 5], [1, 9, 9], [7]], sp)
    assert batch[1].output_ids == alone.output_ids
    assert max(abs(a - b) for a, b in zip(batch[1].logprobs, alone.logprobs)) < TOL


@pytest.mark.parametrize("temperature, top_k", [(1.0, -1), (0.6, 5), (0.0, -1), (2.0, 1)])
def test_sampled_logprobs_follow_sglang(engine, hf, temperature, top_k):
    """log_softmax(logits / T) before truncation; greedy (T=0 or top_k=1) unscaled."""
    prompt = [1, 20, 21]
    sp = SamplingParams(max_new_tokens=6, temperature=temperature, top_k=top_k, seed=5)
    out = engine.generate([prompt], sp)[0]
    greedy = temperature == 0.0 or top_k == 1
    lp = full_logprobs(hf, prompt + out.output_ids, 1.0 if greedy else temperature)
    for t, tok in enumerate(out.output_ids):
        assert abs(out.logprobs[t] - lp[len(prompt) + t - 1, tok].item()) < TOL
        if greedy:
            assert tok == int(lp[len(prompt) + t - 1].argmax())
        if top_k > 1:  # sampled inside the top-k
            assert tok in lp[len(prompt) + t - 1].topk(top_k).indices.tolist()


def test_stops(engine):
    prompt = [1, 20, 21]
    first = engine.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0))[0]
    tok = first.output_ids[0]
    out = engine.generate(
        [prompt], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[tok])
    )[0]
    assert out.output_ids == [tok] and out.finish_reason == "stop" and out.matched == tok
    text = engine.decode([tok], skip_special_tokens=False)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0), [[text]])[0]
    assert out.finish_reason == "stop" and out.matched == text
    none = engine.generate([prompt], SamplingParams(max_new_tokens=0))[0]
    assert none.output_ids == [] and none.finish_reason == "length"


def test_truncation():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])

    def kept(q):
        return (q > 0).tolist()

    assert kept(_truncate(p, 2, 1.0)) == [True, True, False, False]
    assert kept(_truncate(p, -1, 0.79)) == [True, True, False, False]  # 0.5 + 0.3 >= 0.79
    assert kept(_truncate(p, -1, 0.81)) == [True, True, True, False]
    assert kept(_truncate(p, -1, 0.1)) == [True, False, False, False]
    assert kept(_truncate(p, 3, 0.6)) == [True, True, False, False]


def test_bad_inputs_name_the_request(engine):
    with pytest.raises(ValueError, match="request 1: token id 500"):
        engine.score([[1, 2], [1, 500]])
    with pytest.raises(ValueError, match="request 0: empty"):
        engine.score([[]])
    with pytest.raises(ValueError, match="request 0: start 3"):
        engine.score([[1, 2, 3]], starts=[3])
    with pytest.raises(ValueError, match="request 1: top_p"):
        engine.generate([[1], [2]], [SamplingParams(), SamplingParams(top_p=0.0)])


def test_load_state_dict_and_weights_from_disk(model_dir, tmp_path):
    eng = HFEngine(model_dir)
    s = [1, 5, 6, 7, 8]
    before = eng.score([s])[0].logprobs
    with pytest.raises(ValueError, match="unknown parameter"):
        eng.load_state_dict({"nope": torch.zeros(1)})
    w = dict(eng.model.named_parameters())["lm_head.weight"]
    with pytest.raises(ValueError, match="shape"):
        eng.load_state_dict({"lm_head.weight": torch.zeros(3)})
    eng.load_state_dict({"lm_head.weight": w * 2}, weight_version="x2")
    assert eng.weight_version == "x2" and eng.score([s])[0].logprobs != before
    other = make_tiny_hf_model("qwen3_moe", str(tmp_path / "o"), seed=4)
    eng.load_weights_from_disk(other, weight_version="disk")
    assert eng.weight_version == "disk" and eng.model_path == other
    wrong = make_tiny_hf_model("llama", str(tmp_path / "w"), seed=4)
    with pytest.raises(ValueError, match="model_type"):
        eng.load_weights_from_disk(wrong)
