"""`HFEngine`: batched prefill scoring and seeded sampling with SGLang's log-prob rules."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_mopd.rollout.hf_engine import HFEngine, _truncate
from megatron_mopd.rollout.sampling import RowParams, draw, truncate_batch
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


# ---------------------------------------------------------------- batched sampling (batch_seed)

MIXED = [
    SamplingParams(max_new_tokens=7, temperature=1.0, seed=1),
    SamplingParams(max_new_tokens=5, temperature=0.0),  # greedy
    SamplingParams(max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9),
    SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.5),
    SamplingParams(max_new_tokens=7, temperature=2.0, top_k=1),  # greedy (top_k = 1)
    SamplingParams(max_new_tokens=4, temperature=1.0, top_k=20),
]
MIXED_PROMPTS = [[1, 9, 9], [1, 20, 21, 22, 23], [7], [1, 40, 41], [5, 6], [1, 2, 3, 4, 5, 6]]


def outs_key(outs):
    return [(o.output_ids, o.logprobs, o.finish_reason, o.matched) for o in outs]


def chi2_bound(df: int) -> float:
    """A loose upper bound for a chi-square statistic with `df` degrees of freedom (mean
    df, sd sqrt(2 df)): 6 sd above the mean, so a correct sampler fails ~never."""
    return df + 6 * (2 * df) ** 0.5 + 6


def test_batch_seed_reproducible_and_differs_across_seeds(engine):
    a = engine.generate(MIXED_PROMPTS, MIXED, batch_seed=42)
    b = engine.generate(MIXED_PROMPTS, MIXED, batch_seed=42)
    assert outs_key(a) == outs_key(b)
    c = engine.generate(MIXED_PROMPTS, MIXED, batch_seed=43)
    assert outs_key(c) != outs_key(a)
    # batch_seed ignores SamplingParams.seed: changing it changes nothing
    reseeded = [SamplingParams(**{**vars(sp), "seed": 999}) for sp in MIXED]
    assert outs_key(engine.generate(MIXED_PROMPTS, reseeded, batch_seed=42)) == outs_key(a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncate_batch_equals_the_row_rule(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, rows = 50, 96
    logits = torch.randn(rows, vocab, generator=gen) * 3
    probs = torch.softmax(logits, -1)
    ks = torch.tensor([-1, 1, 3, 10, 49, 50, 60, 7])[torch.randint(0, 8, (rows,), generator=gen)]
    ps = torch.tensor([1.0, 0.95, 0.5, 0.05, 0.8, 0.999])[
        torch.randint(0, 6, (rows,), generator=gen)
    ]
    got = truncate_batch(probs, ks, ps)
    want = torch.stack([_truncate(probs[r], int(ks[r]), float(ps[r])) for r in range(rows)])
    assert torch.equal(got, want)
    assert ((got > 0).sum(-1) < vocab).any()  # something was truncated
    off = truncate_batch(probs, torch.full((rows,), -1), torch.ones(rows))
    assert off is probs


def test_batched_logprobs_match_a_full_forward(engine, hf):
    """Per row, SGLang's rule: log_softmax(logits / T) of the sampled token before
    truncation; greedy rows unscaled; sampled tokens inside their top-k."""
    outs = engine.generate(MIXED_PROMPTS, MIXED, batch_seed=7)
    for prompt, sp, out in zip(MIXED_PROMPTS, MIXED, outs):
        greedy = sp.temperature == 0.0 or sp.top_k == 1
        lp = full_logprobs(hf, prompt + out.output_ids, 1.0 if greedy else sp.temperature)
        assert len(out.logprobs) == len(out.output_ids) >= 1
        for t, tok in enumerate(out.output_ids):
            row = lp[len(prompt) + t - 1]
            assert abs(out.logprobs[t] - row[tok].item()) < TOL
            if greedy:
                assert tok == int(row.argmax())
            if sp.top_k > 1:
                assert tok in row.topk(sp.top_k).indices.tolist()


def test_batched_greedy_rows_equal_the_per_request_path(engine):
    batched = engine.generate(MIXED_PROMPTS, MIXED, batch_seed=3)
    per_request = engine.generate(MIXED_PROMPTS, MIXED)
    for r in (1, 4):  # the greedy rows
        assert batched[r].output_ids == per_request[r].output_ids
        assert max(abs(a - b) for a, b in zip(batched[r].logprobs, per_request[r].logprobs)) < TOL


def test_batched_stops_and_routed_experts(engine):
    prompt = [1, 20, 21]
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0))[0]
    tok = greedy.output_ids[1]
    text = engine.decode(greedy.output_ids[:1], skip_special_tokens=False)
    sps = [
        SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[tok]),
        SamplingParams(max_new_tokens=5, temperature=0),
        SamplingParams(max_new_tokens=0),
        SamplingParams(max_new_tokens=4),
    ]
    outs = engine.generate(
        [prompt] * 4, sps, [[], [text], [], []], batch_seed=5, return_routed_experts=True
    )
    assert outs[0].output_ids == greedy.output_ids[:2] and (
        outs[0].finish_reason,
        outs[0].matched,
    ) == ("stop", tok)
    assert outs[1].output_ids == greedy.output_ids[:1] and (
        outs[1].finish_reason,
        outs[1].matched,
    ) == ("stop", text)
    assert outs[2].output_ids == [] and outs[2].finish_reason == "length"
    assert len(outs[3].output_ids) == 4 or outs[3].finish_reason == "stop"
    for o in outs:  # one routing per token fed: the prompt and all but the last sampled
        fed = len(prompt) + max(len(o.output_ids) - 1, 0)
        assert o.routed_experts is not None and o.routed_experts.shape[0] == fed


def test_batched_draws_follow_the_truncated_distribution():
    """One generator, one draw per step over rows with different settings: each
    row's frequencies fit softmax(logits / T) renormalised over its kept tokens."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    settings = [  # (temperature, top_k, top_p, kept tokens)
        (1.0, -1, 1.0, 6),
        (0.5, 3, 1.0, 3),
        (1.0, -1, 0.7, 3),  # p = .39 .24 .14 .09 ...: mass before the 3rd is .63 < .7
        (2.0, 4, 0.9, 4),
    ]
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p)
        for t, k, p, _ in settings
        for _ in range(50)
    ]
    rows = RowParams.build(params, [False] * len(params), set(), False)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(settings), 6)
    batch = logits.expand(len(params), 6).contiguous()
    for _ in range(200):  # 10,000 draws per setting
        toks = draw(batch, rows, gen, None).view(len(settings), 50)
        counts += torch.nn.functional.one_hot(toks, 6).sum(1)
    for s, (t, _, _, kept) in enumerate(settings):
        p = torch.softmax(logits / t, -1)[:kept]
        expected = p / p.sum() * counts[s].sum()
        assert counts[s, kept:].sum() == 0  # truncated tokens are never drawn
        chi2 = float(((counts[s, :kept] - expected) ** 2 / expected).sum())
        assert chi2 < chi2_bound(kept - 1), (s, chi2, counts[s])


def test_batched_first_token_frequencies_match_the_model(engine, hf):
    prompt, n = [1, 20, 21], 4000
    outs = engine.generate([prompt] * n, SamplingParams(max_new_tokens=1), batch_seed=11)
    counts = torch.bincount(torch.tensor([o.output_ids[0] for o in outs]), minlength=128)
    p = full_logprobs(hf, prompt)[-1].exp()
    expected = p * n
    big = expected >= 5  # the rest pooled into one bin
    obs = torch.cat([counts[big].float(), counts[~big].sum().float()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < chi2_bound(len(obs) - 1), chi2
