"""Token-budget micro-batches, activation recomputation and communication overlap.

Fast (no megatron): the token-budget plan (budget kept unless one sequence alone exceeds
it, sorted by length, every sequence once, each micro-batch padded to its own longest);
summing the MOPD loss over token-budget micro-batches (DP 1-3, empty padding micro-batches
included) gives the loss, gradient and statistics of the whole batch; packing a
micro-batch into one THD row and back; config validation naming the key.

Single process (tests/workers/micro_cases.py, one launch): one MOPD step of a tiny MoE
gives the same loss and gradients (all parameters) with one micro-batch per sequence,
fixed micro-batches of 3, token budgets of 36 and 24 tokens (a sequence of 30 alone);
and with full (uniform, block) and selective recomputation as without, while autograd
saves fewer bytes for backward.

Two ranks (slow): token budgets at DP2 (rank 0 needs 2 micro-batches, rank 1 three: the
count is agreed, rank 0 runs an empty one), EP2 (the all-to-all would deadlock
otherwise) and PP2 give the single-process step; overlap_grad_reduce + overlap_param_gather
with small DDP buckets give the parameters of the plain distributed optimizer after 3
steps; save + resume with a bucket size set (both optimizer formats) continues exactly.

`mopd train` (slow): two steps of the tiny trainer recipe with a token budget, full
recomputation and overlapped gradient reduction log the losses of the plain run.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_mopd_parallel import DOMAINS, _unshard, fake_batch, loss_cfg  # noqa: E402

from megatron_mopd.config import load_config  # noqa: E402
from megatron_mopd.errors import ConfigError  # noqa: E402
from megatron_mopd.loss import mopd_loss, sequence_settings, stats_to_means  # noqa: E402
from megatron_mopd.student import micro_batches as mb_mod  # noqa: E402
from megatron_mopd.student import mopd_step  # noqa: E402
from megatron_mopd.student.logprobs import MicroBatch  # noqa: E402
from megatron_mopd.student.micro_batches import (  # noqa: E402
    padded_tokens,
    plan_token_budget,
    round_up,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "micro_cases.py")

# --------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("budget", [8, 40, 100, 1000])
def test_plan_keeps_the_budget(budget, multiple):
    g = torch.Generator().manual_seed(budget)
    lengths = torch.randint(1, 60, (37,), generator=g).tolist()
    groups = plan_token_budget(lengths, budget, multiple)
    assert sorted(i for grp in groups for i in grp) == list(range(len(lengths)))
    flat = [lengths[i] for grp in groups for i in grp]
    assert flat == sorted(flat, reverse=True)  # longest first
    for grp in groups:
        cost = len(grp) * round_up(max(lengths[i] for i in grp), multiple)
        assert cost <= budget or len(grp) == 1
    # greedy: the next sequence would not have fitted into the previous micro-batch
    for a in groups[:-1]:
        assert (len(a) + 1) * round_up(lengths[a[0]], multiple) > budget
    assert padded_tokens(groups, lengths, multiple) <= padded_tokens(
        [[i] for i in range(len(lengths))], [max(lengths)] * len(lengths), multiple
    )


def test_oversize_sequence_goes_alone_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(mb_mod, "_WARNED_OVERSIZE", False)
    with caplog.at_level(logging.WARNING, logger=mb_mod.__name__):
        groups = plan_token_budget([50, 3, 60, 2], 20)
        plan_token_budget([70], 20)
    assert groups == [[2], [0], [1, 3]]
    assert len([r for r in caplog.records if "exceeds" in r.message]) == 1


def test_plan_refuses_a_zero_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        plan_token_budget([3], 0)


# --------------------------------------------------------------------------------------
# exact normalisation over token-budget micro-batches (no megatron)


@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize(("dp", "budget"), [(1, 9), (1, 20), (2, 12), (3, 9), (2, 1000)])
def test_token_budget_losses_sum_to_the_global_loss(dp, budget, extra, monkeypatch):
    """Sum over every rank's token-budget micro-batches (with `extra` empty micro-batches
    appended, as the DP count agreement does) = mopd_loss over the whole batch."""
    if extra:
        monkeypatch.setattr(mopd_step, "agree_num_micro_batches", lambda n, group: n + extra)
    batch = fake_batch(3)
    cfg = loss_cfg(False)
    B, T = batch.tokens_B_T.shape
    g = torch.Generator().manual_seed(2)
    logprobs = torch.log_softmax(torch.randn(B, T, 5, generator=g), -1)[..., 0]
    logprobs = logprobs.clone().requires_grad_(True)
    s = sequence_settings(cfg, [DOMAINS[i] for i in batch.domain_ids_B.tolist()])
    full, metrics = mopd_loss(
        logprobs, batch.rollout_logprobs_B_T, batch.teacher_logprobs_B_T, batch.mask_B_T,
        batch.orm_advantages_B, **s.kwargs(),
    )  # fmt: skip
    (full_grad,) = torch.autograd.grad(full, logprobs)

    loss_fn = mopd_step.MopdLoss(cfg, DOMAINS, batch.size)
    total, summed, seen = 0.0, {}, []
    for rank in range(dp):
        mbs = mopd_step.micro_batches_for_rank(
            batch, rank, dp, 1, pad_to_multiple_of=2, max_tokens_per_microbatch=budget
        )
        real = [mb for mb in mbs if mb.index_B]
        assert len(mbs) - len(real) == extra
        for mb in mbs:
            R, L = mb.tokens_B_T.shape
            assert L % 2 == 0
            if not mb.index_B:  # an empty micro-batch: one masked row
                assert (R, L) == (1, 2) and mb.loss_mask_B_T.sum() == 0
                assert mb.data["valid_B"].sum() == 0
                lp = torch.zeros(1, L)
            else:
                longest = max(int(batch.lengths_B[i]) for i in mb.index_B)
                assert L == round_up(longest, 2)  # padded to its own longest row only
                assert R * L <= budget or R == 1
                for b, i in enumerate(mb.index_B):
                    n = int(batch.lengths_B[i])
                    assert torch.equal(mb.tokens_B_T[b, :n], batch.tokens_B_T[i, :n])
                lp = logprobs[mb.index_B][:, : min(L, T)]
                lp = torch.nn.functional.pad(lp, (0, L - lp.shape[1]))
            seen += mb.index_B
            loss, out = loss_fn(lp, mb)
            total = total + loss
            for k, v in out.items():
                summed[k] = summed.get(k, 0.0) + float(v)
    assert sorted(seen) == list(range(batch.size))
    (grad,) = torch.autograd.grad(total, logprobs)
    assert total.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, full_grad, rtol=1e-6, atol=1e-8)
    result = mopd_step.summarize({"loss": total.item(), **summed}, DOMAINS)
    expected = stats_to_means(metrics["stats"].sum(0))
    for name in ("reverse_kl", "advantage", "weight", "tokens", "sequences"):
        assert result[name] == pytest.approx(float(expected[name]), rel=1e-5, abs=1e-6), name


def test_pack_and_unpack_round_trip():
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0]])
    mb = MicroBatch(tokens, torch.tensor([4, 2, 1]), torch.ones(3, 4))
    packed, positions, params = mb_mod.pack_micro_batch(mb, pad_to_multiple_of=4)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 10, 11, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 0, 0]]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 4, 6, 7, 8]
    logits = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 3).clone().requires_grad_(True)
    out = mb_mod.unpack_logits(logits, mb)
    assert out.shape == (3, 4, 3)
    assert out[..., 0].tolist() == [[0, 1, 2, 3], [4, 5, 0, 0], [6, 0, 0, 0]]
    out.sum().backward()
    assert logits.grad[0, :, 0].tolist() == [1] * 7 + [0]  # the padding token gets none


def test_packed_schedule_refuses_the_local_spec():
    from megatron_mopd.student.train_step import run_packed_schedule

    mb = MicroBatch(torch.ones(1, 4, dtype=torch.long), torch.tensor([4]), torch.ones(1, 4))
    with pytest.raises(ConfigError, match="train.pack_sequences=true needs the Transformer"):
        run_packed_schedule([torch.nn.Linear(2, 2)], [mb], lambda mb: None)


# --------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.recompute_granularity=full"], "model.recompute_granularity=full needs"),
        (
            ["model.recompute_granularity=full", "model.recompute_method=uniform"],
            "model.recompute_num_layers",
        ),
        (["model.recompute_method=block"], "model.recompute_method is set"),
        (
            ["model.recompute_granularity=selective", "model.recompute_num_layers=1"],
            "model.recompute_num_layers must be null",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[attn]"],
            "model.recompute_modules",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
            "need an MoE model",
        ),
        (
            [
                "model.recompute_granularity=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=2",
                "parallel.pp=2",
            ],
            "model.recompute_num_layers=2 must be at most",
        ),
        (["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather=true needs"),
        (["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size"),
        (["train.max_tokens_per_microbatch=-1"], "train.max_tokens_per_microbatch"),
        (["train.pack_sequences=true"], "train.pack_sequences=true needs"),
        (
            [
                "train.pack_sequences=true",
                "train.max_tokens_per_microbatch=64",
                "model.transformer_impl=local",
            ],
            "Transformer Engine",
        ),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_accepts_the_settings():
    cfg = load_config(
        None,
        [
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
            "parallel.use_distributed_optimizer=true",
            "parallel.overlap_grad_reduce=true",
            "parallel.overlap_param_gather=true",
            "parallel.ddp_bucket_size=1000000",
            "train.max_tokens_per_microbatch=16384",
        ],
    )
    assert cfg.train.max_tokens_per_microbatch == 16384 and cfg.parallel.ddp_bucket_size == 10**6
    from megatron_mopd.student.model import recompute_kwargs
    from megatron_mopd.student.train_step import ddp_config_kwargs

    assert recompute_kwargs(cfg.model, False) == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    ddp = ddp_config_kwargs(cfg.parallel)
    assert ddp["overlap_grad_reduce"] and ddp["overlap_param_gather"]
    assert ddp["bucket_size"] == 10**6
    sel = load_config(None, ["model.recompute_granularity=selective"]).model
    assert recompute_kwargs(sel, False)["recompute_modules"] == ["core_attn"]
    moe_act = load_config(
        None,
        [
            "model.num_moe_experts=4",
            "model.recompute_granularity=selective",
            "model.recompute_modules=[moe_act]",
        ],
    ).model
    with pytest.raises(ConfigError, match="moe_act"):
        recompute_kwargs(moe_act, False)


# --------------------------------------------------------------------------------------
# megatron: single process

RECOMPUTE = {
    "rc_full_uniform": {"granularity": "full", "method": "uniform", "num_layers": 1},
    "rc_full_block": {"granularity": "full", "method": "block", "num_layers": 1},
    "rc_selective": {"granularity": "selective"},
    "rc_selective_all": {
        "granularity": "selective",
        "modules": ["core_attn", "layernorm", "mlp", "moe"],
    },
}
SINGLE = [
    {"name": "one_per_seq", "mbs": 1},
    {"name": "fixed3", "mbs": 3},
    {"name": "budget36", "max_tokens": 36},
    {"name": "budget24", "max_tokens": 24},  # the sequence of 30 tokens goes alone
    {"name": "no_recompute", "mbs": 8},
    *({"name": n, "mbs": 8, "recompute": r} for n, r in RECOMPUTE.items()),
]
TWO = [
    {"name": "budget36", "max_tokens": 36},
    {"name": "ep2_budget36", "ep": 2, "max_tokens": 36},
    {"name": "pp2_budget36", "pp": 2, "max_tokens": 36},
    {"name": "distopt", "distopt": True, "steps": 3},
    {
        "name": "overlap",
        "distopt": True,
        "overlap_grad": True,
        "overlap_param": True,
        "bucket": 5000,
        "steps": 3,
    },
    {"name": "overlap_grad_ddp", "overlap_grad": True, "bucket": 5000, "steps": 3},
    {"name": "ddp", "steps": 3},
    {"name": "bucket_resume", "distopt": True, "bucket": 5000, "steps": 3, "resume_after": 2},
    {
        "name": "bucket_resume_dp",
        "distopt": True,
        "bucket": 5000,
        "steps": 3,
        "resume_after": 2,
        "optimizer_format": "dp_reshardable",
    },
]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, request):
    """The single-process launch (and, when a slow test runs, the two-rank one), started
    together."""
    from multirank import start_workers

    root = tmp_path_factory.mktemp("micro")
    single = start_workers(
        WORKER, 1, ["--cases", json.dumps(SINGLE)], torchrun=False, timeout=600,
        out_dir=root / "single",
    )  # fmt: skip
    two = None
    if "not slow" not in (request.config.getoption("markexpr", default="") or ""):
        two = start_workers(
            WORKER, 2, ["--cases", json.dumps(TWO)], timeout=900, out_dir=root / "two"
        )
    return {"single": single, "two": two, "cache": {}}


def _results(launches, key):
    cache = launches["cache"]
    if key not in cache:
        if launches[key] is None:
            pytest.skip("two-rank launch not started (-m 'not slow')")
        cache[key] = launches[key].wait()
    return cache[key]


def _assert_same_step(got: dict, ref: dict, what: str, rtol: float = 1e-5) -> None:
    assert got["out"]["loss"] == pytest.approx(ref["out"]["loss"], rel=rtol), what
    assert got["out"]["grad_norm"] == pytest.approx(ref["out"]["grad_norm"], rel=rtol), what
    assert set(got["grads"]) == set(ref["grads"])
    scale = max(g[0].abs().max().item() for g in ref["grads"].values())
    for name, (g, *_) in ref["grads"].items():
        torch.testing.assert_close(
            got["grads"][name][0], g, rtol=1e-4, atol=1e-6 * scale, msg=f"{what}: {name}"
        )


@pytest.mark.multirank
def test_token_budget_and_recompute_single_process(launches):
    (res,) = _results(launches, "single")
    ref = res["one_per_seq"]
    assert ref["shapes"] == [(1, 30)] * 8  # today's layout: every row padded to the longest
    assert res["budget36"]["shapes"] == [(1, 30), (1, 20), (1, 19), (2, 18), (3, 5)]
    assert res["budget24"]["shapes"] == [(1, 30), (1, 20), (1, 19), (1, 18), (1, 17), (3, 5)]
    for name in ("fixed3", "budget36", "budget24", "no_recompute"):
        _assert_same_step(res[name], ref, name)
    base = res["no_recompute"]
    for name in RECOMPUTE:
        _assert_same_step(res[name], base, name, rtol=1e-6)
        assert res[name]["saved_bytes"] < base["saved_bytes"], name
    # full recomputation keeps only the layers' inputs (here: < 1/4 of the bytes)
    assert res["rc_full_uniform"]["saved_bytes"] < 0.25 * base["saved_bytes"]
    assert res["rc_full_block"]["saved_bytes"] < 0.75 * base["saved_bytes"]
    assert res["rc_selective_all"]["saved_bytes"] < res["rc_selective"]["saved_bytes"]


def _unsharded(ranks: list[dict], case: str, key: str) -> dict[str, torch.Tensor]:
    names = set().union(*(r[case][key] for r in ranks))
    return {n: _unshard([r[case][key][n] for r in ranks if n in r[case][key]]) for n in names}


@pytest.mark.slow
@pytest.mark.multirank
def test_token_budget_two_ranks(launches):
    (single,) = _results(launches, "single")
    ranks = _results(launches, "two")
    ref = single["one_per_seq"]
    for case in ("budget36", "ep2_budget36", "pp2_budget36"):
        grads = _unsharded(ranks, case, "grads")
        got = {"out": ranks[0][case]["out"], "grads": {n: (g,) for n, g in grads.items()}}
        _assert_same_step(got, ref, case)
        counts = [len(r[case]["shapes"]) for r in ranks]
        assert counts[0] == counts[1], case
    # DP2: rank 0's share [30, 4, 5, 3] needs 2 micro-batches, rank 1's [20, 19, 18, 17]
    # three: rank 0 runs an empty third one
    for case in ("budget36", "ep2_budget36"):
        assert ranks[0][case]["shapes"] == [(1, 30), (3, 5), (1, 1)], case
        assert ranks[0][case]["rows"][-1] == []
        assert ranks[1][case]["shapes"] == [(1, 20), (1, 19), (2, 18)], case
    assert ranks[0]["pp2_budget36"]["shapes"] == single["budget36"]["shapes"]


@pytest.mark.slow
@pytest.mark.multirank
def test_overlap_and_bucketed_resume_parity(launches):
    ranks = _results(launches, "two")
    pairs = [
        ("overlap", "distopt"),
        ("overlap_grad_ddp", "ddp"),
        ("distopt", "ddp"),
        ("bucket_resume", "distopt"),
        ("bucket_resume_dp", "distopt"),
    ]
    for case, ref in pairs:
        got, want = _unsharded(ranks, case, "params"), _unsharded(ranks, ref, "params")
        assert set(got) == set(want)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=f"{case}: {n}")
    # 3 Adam steps moved every parameter (the comparisons above are not vacuous)
    start, end = _unsharded(ranks, "overlap", "params0"), _unsharded(ranks, "overlap", "params")
    assert all((end[n] - start[n]).abs().max() > 1e-4 for n in start)


# --------------------------------------------------------------------------------------
# through `mopd train`


@pytest.mark.slow
def test_mopd_train_with_the_features_on_matches_off(tmp_path, capsys, monkeypatch):
    """Two steps of the tiny trainer recipe with a token budget (small enough to split
    the step into several micro-batches), full recomputation and overlapped gradient
    reduction with small buckets log the loss and grad norm of the plain run."""
    from trainer_helpers import dataset_lines, make_recipe, metrics, train_in_process, write_recipe

    from megatron_mopd.toy.tiny import make_tiny_hf_model

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dataset_lines()))
    tiny = {
        "student": make_tiny_hf_model("qwen3_moe", str(tmp_path / "student"), seed=0),
        "t_add": make_tiny_hf_model("qwen3_moe", str(tmp_path / "t_add"), seed=1),
        "t_rev": make_tiny_hf_model("qwen3", str(tmp_path / "t_rev"), seed=2),
        "data": str(data),
    }
    features = [
        "train.max_tokens_per_microbatch=24",
        "model.recompute_granularity=full",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
        "parallel.overlap_grad_reduce=true",
        "parallel.ddp_bucket_size=2000",
    ]
    from megatron_mopd.student import model as model_mod

    plans, recompute = [], []  # spies: the features were used, not just accepted
    plan, kwargs = mopd_step.plan_token_budget, model_mod.recompute_kwargs
    monkeypatch.setattr(
        mopd_step, "plan_token_budget", lambda *a: plans.append(plan(*a)) or plans[-1]
    )
    monkeypatch.setattr(
        model_mod, "recompute_kwargs", lambda *a: recompute.append(kwargs(*a)) or recompute[-1]
    )
    rows = {}
    for name, overrides in (("off", []), ("on", features)):
        run = tmp_path / name
        sections = {"train": {"max_steps": 2, "eval_interval": 0}, "checkpoint": {"interval": 0}}
        recipe = write_recipe(tmp_path / f"{name}.yaml", make_recipe(tiny, run, **sections))
        code, err = train_in_process(capsys, recipe, *overrides)
        assert code == 0, err
        rows[name] = metrics(run)
    assert len(rows["on"]) == len(rows["off"]) == 2
    assert len(plans) == 2 and all(len(p) > 1 for p in plans)  # one plan per step, split
    assert {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }.items() <= recompute[-1].items()
    for a, b in zip(rows["off"], rows["on"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
