"""MoE routing replay (R3): engines return routed experts, Megatron replays them.

Fast: the embedded engine's routed experts (KV-cache decoding, one token per step) are
those of a full forward of prompt + response[:-1] (fp32 and bf16); `build_train_batch`
lays them out per position with -1 where no token was fed.

Slow (torchrun): a tiny MoE student with 16 experts, top-2, loaded from the HF folder the
bf16 engine sampled with. One MOPD step without replay routes some token-layer pairs
differently from the engine (`routing_mismatch_frac` > 0, printed); with replay every pair
matches (0, read from the routers' own output in the Megatron forward), and |r - 1| and
IcePop's discard fraction drop; the replayed step at EP2, TP2 (sequence parallel) and
PP2 matches the single-process one (loss, grad norm, |r - 1|, router gradients).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_mopd.batch import build_train_batch  # noqa: E402
from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine  # noqa: E402
from megatron_mopd.rollout.hf_engine import HFEngine, routed_experts_hooks  # noqa: E402
from megatron_mopd.toy.tiny import make_tiny_hf_model  # noqa: E402
from megatron_mopd.types import SamplingParams, ScoreResult  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "replay_cases.py")
PROMPTS = [[1, 5, 9, 7], [1, 8], [1, 3, 4, 5, 6, 7], [1, 20, 21]]


@pytest.fixture(scope="module")
def moe16(tmp_path_factory):
    return make_tiny_hf_model(
        "qwen3_moe", str(tmp_path_factory.mktemp("moe16")), seed=0, num_experts=16
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_routed_experts_are_the_full_forward_routing(moe16, dtype):
    engine = HFEngine(moe16, dtype=dtype, seed=0)
    outs = engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=7, seed=3), return_routed_experts=True
    )
    differ = total = 0
    for p, o in zip(PROMPTS, outs):
        seq = p + o.output_ids[:-1]
        assert o.routed_experts.shape == (len(seq), 2, 2)
        assert o.routed_experts.dtype == torch.int32
        with routed_experts_hooks(engine.model) as rec, torch.no_grad():
            engine.model(input_ids=torch.tensor([seq]))
        full = rec.per_call()[0]
        same = (o.routed_experts.sort(-1).values == full.sort(-1).values).all(-1)
        differ += int((~same).sum())
        total += same.numel()
    print(f"{dtype}: {differ}/{total} token-layer pairs routed differently decoding vs prefill")
    if dtype == "float32":
        assert differ == 0
    else:  # bf16 decoding (other matmul shapes) flips near-ties: what the engine really used
        assert differ <= 0.1 * total
    # the hooks are gone: a plain generate returns no routing
    plain = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, seed=3))
    assert plain[0].routed_experts is None


def test_batch_lays_out_routed_experts(moe16):
    engine = EmbeddedRolloutEngine(moe16, seed=0, dtype="bfloat16")
    rollouts = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=1))
    scores = [ScoreResult(logprobs=[0.0] * len(r.response_ids)) for r in rollouts]
    batch = build_train_batch(rollouts, scores, ["d"] * len(rollouts), ["d"])
    x = batch.routed_experts_B_T_X
    assert x.shape == (len(PROMPTS), batch.tokens_B_T.shape[1], 4)
    for i, r in enumerate(rollouts):
        n = len(r.prompt_ids) + len(r.response_ids)
        assert torch.equal(x[i, : n - 1], r.routed_experts.view(n - 1, 4))
        assert (x[i, n - 1 :] == -1).all()
    assert torch.equal(batch.select(slice(1, 3)).routed_experts_B_T_X, x[1:3])


def make_replay_batch(hf: str, path: str) -> None:
    """A bf16 engine's rollouts, scored by the same model in fp32 as a stand-in teacher."""
    engine = EmbeddedRolloutEngine(hf, seed=0, dtype="bfloat16")
    prompts = [[1, 3 + (5 * i) % 90, 4 + (7 * i) % 90] for i in range(8)]
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=24, seed=5))
    teacher = HFEngine(hf, dtype="float32")
    scored = teacher.score(
        [r.prompt_ids + r.response_ids for r in rollouts],
        starts=[len(r.prompt_ids) for r in rollouts],
    )
    scores = [ScoreResult(logprobs=[float(v) for v in s.logprobs]) for s in scored]
    domains = ["a" if i % 2 else "b" for i in range(len(rollouts))]
    torch.save(build_train_batch(rollouts, scores, domains, ["a", "b"]), path)


@pytest.mark.slow
def test_replay_removes_routing_mismatch_and_matches_at_ep2(moe16, tmp_path):
    from multirank import run_workers

    path = str(tmp_path / "batch.pt")
    make_replay_batch(moe16, path)
    single = [
        {"name": "off", "replay": False},
        {"name": "on", "replay": True},
        {"name": "on_recompute", "replay": True, "recompute": True},
        {"name": "off_recompute", "replay": False, "recompute": True},
    ]
    args = ["--batch", path, "--hf", moe16]
    one = run_workers(WORKER, 1, args + ["--cases", json.dumps(single)], timeout=600)[0]
    layouts = [
        {"name": "ep2", "ep": 2, "replay": True},
        {"name": "tp2", "tp": 2, "replay": True},  # sequence parallel: each rank's slice
        {"name": "pp2", "pp": 2, "replay": True},  # each stage replays its own layers
        # 1F1B runs forwards ahead of backwards: recomputation must pop megatron's FIFO
        {"name": "pp2_recompute", "pp": 2, "replay": True, "recompute": True},
        {"name": "ep2_off", "ep": 2, "replay": False},
    ]
    multi = run_workers(WORKER, 2, args + ["--cases", json.dumps(layouts)], timeout=900)
    off, on = one["off"]["out"], one["on"]["out"]
    for name, o in [("off", off), ("on", on)] + [
        (c["name"], multi[0][c["name"]]["out"]) for c in layouts
    ]:
        print(
            f"replay {name}: routing_mismatch_frac={o['routing_mismatch_frac']:.4f} "
            f"|r-1|={o['ratio_abs_dev']:.3e} discard={o['discard_low_frac'] + o['discard_high_frac']:.4f}"
        )
    assert off["routing_mismatch_frac"] > 0
    assert on["routing_mismatch_frac"] == 0
    assert on["ratio_abs_dev"] < off["ratio_abs_dev"]
    discard = lambda o: o["discard_low_frac"] + o["discard_high_frac"]  # noqa: E731
    assert discard(on) < discard(off)
    # recomputation replays the same experts in the backward: the same step, replayed or not
    for name in ("on", "off"):
        a, b = one[name], one[f"{name}_recompute"]
        assert b["out"]["loss"] == pytest.approx(a["out"]["loss"], rel=1e-6, abs=1e-8)
        assert b["out"]["grad_norm"] == pytest.approx(a["out"]["grad_norm"], rel=1e-5)
        assert b["out"]["routing_mismatch_frac"] == a["out"]["routing_mismatch_frac"]
        for key, g in a["router_grads"].items():
            torch.testing.assert_close(b["router_grads"][key], g, rtol=1e-5, atol=1e-7)
    for rank, case in ((r, c) for r in range(2) for c in layouts):
        e, ref = multi[rank][case["name"]], one["on" if case["replay"] else "off"]
        assert (e["out"]["routing_mismatch_frac"] == 0) == case["replay"], case["name"]
        if case["replay"]:  # replayed: the layout cannot change the routing, so the step
            assert e["out"]["loss"] == pytest.approx(ref["out"]["loss"], rel=1e-5, abs=1e-7)
            assert e["out"]["grad_norm"] == pytest.approx(ref["out"]["grad_norm"], rel=1e-4)
            assert e["out"]["ratio_abs_dev"] == pytest.approx(ref["out"]["ratio_abs_dev"], rel=1e-4)
            for name, g in e["router_grads"].items():
                torch.testing.assert_close(g, ref["router_grads"][name], rtol=1e-4, atol=1e-6)


def test_routing_replay_config_errors_name_the_key():
    from megatron_mopd.config import LossConfig, load_config
    from megatron_mopd.errors import ConfigError
    from megatron_mopd.student.mopd_step import _routing_replay

    with pytest.raises(ConfigError, match=r"loss\.routing_replay.*no experts"):
        load_config(None, ["loss.routing_replay=true"])
    cfg = load_config(None, ["loss.routing_replay=true", "model.num_moe_experts=16"])
    assert cfg.loss.routing_replay
    # a batch without routed experts (an SGLang server without the flag) is refused
    batch = build_train_batch([_rollout()], [ScoreResult(logprobs=[0.0, 0.0])], ["d"], ["d"])
    assert batch.routed_experts_B_T_X is None
    with pytest.raises(ConfigError, match=r"loss\.routing_replay.*enable-return-routed-experts"):
        _routing_replay([], batch, LossConfig(routing_replay=True))
    assert _routing_replay([], batch, LossConfig()) is None


def _rollout():
    from megatron_mopd.types import Rollout

    return Rollout([1, 2], [3, 4], [-1.0, -1.0], "length", "0")


def test_sglang_routed_experts_answer_is_decoded():
    """SGLang 0.5.23's format (tokenizer_manager / detokenizer_manager): meta_info
    `routed_experts` = base64 of int32 [prompt + output - 1, layers, top_k]."""
    import base64

    import numpy as np

    from megatron_mopd.rollout.sglang import _decode_routed_experts
    from megatron_mopd.sglang.answers import check_generation

    ids = np.arange(5 * 2 * 2, dtype=np.int32).reshape(5, 2, 2) % 16
    b64 = base64.b64encode(ids.tobytes()).decode()
    answer = {
        "output_ids": [7, 8, 2],
        "meta_info": {
            "output_token_logprobs": [[-1.0, 7, None], [-2.0, 8, None], [-0.5, 2, None]],
            "finish_reason": {"type": "stop"},
            "weight_version": "3",
            "routed_experts": b64,
        },
    }
    gen = check_generation([answer], "http://x", "generate", 0, 0, 1)
    got = _decode_routed_experts(gen.routed_experts, 3 + 3 - 1)  # prompt of 3 tokens
    assert got.dtype == torch.int32 and tuple(got.shape) == (5, 4)
    assert torch.equal(got.view(5, 2, 2), torch.from_numpy(ids))
    assert _decode_routed_experts(None, 5) is None
    from megatron_mopd.errors import TeacherError

    with pytest.raises(TeacherError, match="routed_experts"):
        _decode_routed_experts(b64, 3)


def test_sglang_rollout_engine_returns_routed_experts(moe16):
    """`SGLangRolloutEngine(return_routed_experts=True)` against `mopd serve` (which
    answers the field as SGLang encodes it): every rollout's experts are the fp32 model's
    own routing of prompt + response[:-1]; without the flag none are returned."""
    from sglang_helpers import InProcessServer

    from megatron_mopd.config import RolloutConfig
    from megatron_mopd.rollout.sglang import SGLangRolloutEngine

    srv = InProcessServer(moe16, seed=0)
    model = HFEngine(moe16).model
    try:
        cfg = RolloutConfig(backend="sglang", urls=[srv.url])
        engine = SGLangRolloutEngine(cfg, return_routed_experts=True)
        rollouts = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, seed=2))
        plain = SGLangRolloutEngine(cfg).generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
        engine.close()
    finally:
        srv.stop()
    assert plain[0].routed_experts is None
    for r in rollouts:
        seq = r.prompt_ids + r.response_ids[:-1]
        assert tuple(r.routed_experts.shape) == (len(seq), 2 * 2)
        with routed_experts_hooks(model) as rec, torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        want = rec.per_call()[0].sort(-1).values
        assert torch.equal(r.routed_experts.view(len(seq), 2, 2).sort(-1).values, want)
