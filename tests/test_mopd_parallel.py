"""The MOPD loss inside the Megatron step: batch splitting, normalisation, parity.

Fast tests (no megatron): splitting the global batch over DP ranks and micro-batches
keeps the loss, the gradient and the per-domain statistics of the whole batch, and the
top-k log-prob hook lines positions up with the project's convention.

Slow multi-rank test: one MOPD step of a tiny MoE student at TP2, PP2 (2 micro-batches),
EP2 and DP2 (one torchrun launch, 2 processes) gives the loss, the gradient of every
parameter and the per-domain metrics of the single-process step (TP1, 3 micro-batches),
which itself matches plain autograd on the whole batch; with the sampled estimator and
with top-k estimators, 7 sequences of uneven response lengths (one empty) over 3 domains.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_mopd.batch import TrainBatch  # noqa: E402
from megatron_mopd.config import LossConfig, LossOverride  # noqa: E402
from megatron_mopd.loss import mopd_loss, sequence_settings, stats_to_means  # noqa: E402
from megatron_mopd.student.logprobs import MicroBatch, OutputHead  # noqa: E402
from megatron_mopd.student.mopd_step import (  # noqa: E402
    MopdLoss,
    dp_share,
    micro_batches_for_rank,
    summarize,
    topk_logprobs,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "mopd_cases.py")
DOMAINS = ["a", "b", "c"]


def fake_batch(seed: int, B: int = 7, T: int = 9, K: int = 3) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T
    prompt = torch.randint(1, 3, (B,), generator=g)
    prompt[1] = lengths[1]  # an empty response
    pos = torch.arange(T)
    mask = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).float()
    top = torch.log_softmax(torch.randn(B, T, K + 1, generator=g), -1)[..., :K]
    return TrainBatch(
        tokens_B_T=torch.randint(0, 50, (B, T), generator=g),
        mask_B_T=mask,
        rollout_logprobs_B_T=-torch.rand(B, T, generator=g) * 3 * mask,
        teacher_logprobs_B_T=-torch.rand(B, T, generator=g) * 3 * mask,
        orm_advantages_B=torch.randn(B, generator=g),
        domain_ids_B=torch.randint(0, len(DOMAINS), (B,), generator=g),
        domains=list(DOMAINS),
        lengths_B=lengths,
        teacher_topk_ids_B_T_K=torch.randint(0, 50, (B, T, K), generator=g),
        teacher_topk_logprobs_B_T_K=top,
    )


def loss_cfg(topk: bool) -> LossConfig:
    return LossConfig(
        alpha=0.3,
        per_domain={
            "b": LossOverride(correction="tis", eps_high=2.0, alpha=1.0),
            "c": LossOverride(correction="none", estimator="topk_reverse_kl" if topk else None),
        },
    )


@pytest.mark.parametrize("dp", [1, 2, 3])
@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_split_covers_the_batch_with_one_shape(dp, mbs):
    batch = fake_batch(0)
    seen, shapes, counts = [], set(), set()
    for rank in range(dp):
        mbs_list = micro_batches_for_rank(batch, rank, dp, mbs, pad_to_multiple_of=4)
        counts.add(len(mbs_list))
        for mb in mbs_list:
            shapes.add(tuple(mb.tokens_B_T.shape))
            assert mb.tokens_B_T.shape[1] % 4 == 0 and mb.tokens_B_T.shape[0] <= mbs
            valid = mb.data["valid_B"].bool()
            assert valid.sum() == len(mb.index_B)
            assert (mb.loss_mask_B_T[~valid] == 0).all()
            seen += mb.index_B
            for b, i in enumerate(mb.index_B):
                assert torch.equal(
                    mb.tokens_B_T[b, : batch.tokens_B_T.shape[1]], batch.tokens_B_T[i]
                )
        assert [i for mb in mbs_list for i in mb.index_B] == dp_share(batch.size, rank, dp)
    assert sorted(seen) == list(range(batch.size))
    assert len(shapes) == 1 and len(counts) == 1  # the same on every rank and micro-batch


@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize(("dp", "mbs"), [(1, 7), (1, 3), (2, 2), (3, 1)])
def test_summed_micro_batch_losses_are_the_global_loss(topk, dp, mbs):
    """What train_step does (sum over micro-batches and DP ranks) gives mopd_loss over the
    whole batch: value, gradient and per-domain statistics."""
    batch = fake_batch(1)
    cfg = loss_cfg(topk)
    B, T, K = batch.teacher_topk_logprobs_B_T_K.shape
    g = torch.Generator().manual_seed(5)
    logprobs = torch.log_softmax(torch.randn(B, T, 1 + K + 2, generator=g), -1)[..., : 1 + K]
    logprobs = logprobs.clone().requires_grad_(True)

    s = sequence_settings(cfg, [DOMAINS[i] for i in batch.domain_ids_B.tolist()])
    full, metrics = mopd_loss(
        logprobs[..., 0], batch.rollout_logprobs_B_T, batch.teacher_logprobs_B_T,
        batch.mask_B_T, batch.orm_advantages_B, student_topk_logprobs=logprobs[..., 1:],
        teacher_topk_logprobs=batch.teacher_topk_logprobs_B_T_K, **s.kwargs(),
    )  # fmt: skip
    (full_grad,) = torch.autograd.grad(full, logprobs)

    loss_fn = MopdLoss(cfg, DOMAINS, batch.size)
    total, summed = 0.0, {}
    for rank in range(dp):
        for mb in micro_batches_for_rank(batch, rank, dp, mbs):
            rows = torch.tensor(mb.index_B + [0] * (mb.tokens_B_T.shape[0] - len(mb.index_B)))
            lp = logprobs[rows] if topk else logprobs[rows][..., 0]
            lp = torch.nn.functional.pad(
                lp, (0, 0) * (lp.dim() - 2) + (0, mb.tokens_B_T.shape[1] - T)
            )
            loss, out = loss_fn(lp, mb)
            total = total + loss
            for k, v in out.items():
                summed[k] = summed.get(k, 0.0) + float(v)
    (grad,) = torch.autograd.grad(total, logprobs)
    if not topk:
        full_grad[..., 1:] = 0
    assert total.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(grad, full_grad, rtol=1e-5, atol=1e-7)
    result = summarize({"loss": total.item(), **summed}, DOMAINS)
    expected = stats_to_means(metrics["stats"].sum(0))
    for name in ("reverse_kl", "advantage", "weight", "discard_low_frac", "topk_kl", "tokens"):
        assert result[name] == pytest.approx(float(expected[name]), rel=1e-5, abs=1e-6), name
    for j, d in enumerate(DOMAINS):
        idx = (batch.domain_ids_B == j).nonzero()[:, 0]
        if len(idx) == 0:
            assert f"reverse_kl/{d}" not in result
            continue
        per = stats_to_means(metrics["stats"][idx].sum(0))
        assert result[f"reverse_kl/{d}"] == pytest.approx(float(per["reverse_kl"]), rel=1e-5)
        assert result[f"sequences/{d}"] == len(idx)


def test_topk_logprobs_positions():
    """Position t holds log p(token t) and log p(top-k ids of t) from the logits at t - 1."""
    R, T, V, K = 2, 6, 11, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(R, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (R, T), generator=g)
    top = torch.randint(0, V, (R, T, K), generator=g)
    mb = MicroBatch(tokens, torch.full((R,), T), torch.ones(R, T), {"teacher_topk_ids_B_T_K": top})
    x = logits.clone().requires_grad_(True)
    out = topk_logprobs(x * 1, mb, OutputHead(tp_group=None))
    ref = torch.zeros(R, T, 1 + K, dtype=torch.float64)
    for r in range(R):
        for t in range(1, T):
            lp = torch.log_softmax(logits[r, t - 1], -1)
            ref[r, t, 0] = lp[tokens[r, t]]
            ref[r, t, 1:] = lp[top[r, t]]
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(R, T, 1 + K, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    y = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(y, -1)[:, :-1]
    ids = torch.cat([tokens[:, 1:, None], top[:, 1:]], -1)
    (ref_grad,) = torch.autograd.grad((lp.gather(-1, ids) * w[:, 1:]).sum(), y)
    assert torch.allclose(grad, ref_grad, atol=1e-12)


# --------------------------------------------------------------------------------------
# multi-rank parity


def _unshard(entries: list[tuple]) -> torch.Tensor:
    """The full tensor from `(grad, dim, stride, world, rank)` entries of all ranks
    (replicas, e.g. DP ranks, must agree)."""
    by_rank: dict[int, torch.Tensor] = {}
    for g, _, _, _, r in entries:
        if r in by_rank:
            torch.testing.assert_close(g, by_rank[r], rtol=1e-5, atol=1e-7)
        by_rank[r] = g
    _, dim, stride, world, _ = entries[0]
    if dim is None or world == 1:
        return by_rank[0]
    assert sorted(by_rank) == list(range(world))
    pieces = [by_rank[r].chunk(stride, dim=dim) for r in range(world)]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(world)], dim=dim)


def _assert_close_step(name: str, got: dict, ref: dict, grads_by_rank: list[dict]) -> None:
    assert got["out"]["loss"] == pytest.approx(ref["out"]["loss"], rel=1e-5), name
    assert got["out"]["grad_norm"] == pytest.approx(ref["out"]["grad_norm"], rel=1e-5), name
    assert set(got["out"]) == set(ref["out"]), name
    for key, value in ref["out"].items():
        assert got["out"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
    names = set().union(*grads_by_rank)
    assert names == set(ref["grads"]), (name, names ^ set(ref["grads"]))
    scale = max(g[0].abs().max().item() for g in ref["grads"].values())
    for pname in sorted(names):
        full = _unshard([gr[pname] for gr in grads_by_rank if pname in gr])
        rows = ref["grads"][pname][0].shape[0]
        if full.shape[0] != rows:  # the vocabulary padded to a multiple of 128 * TP
            assert "word_embeddings" in pname or "output_layer" in pname, pname
            assert torch.all(full[rows:] == 0), f"{name}: padded rows of {pname} got gradient"
            full = full[:rows]
        torch.testing.assert_close(
            full, ref["grads"][pname][0], rtol=1e-4, atol=1e-5 * scale, msg=f"{name}: {pname}"
        )


@pytest.mark.slow
@pytest.mark.multirank
def test_mopd_step_parity_across_layouts(tmp_path):
    from multirank import start_workers

    reference = start_workers(
        WORKER, 1, ["--cases", json.dumps([{"name": "tp1", "mbs": 3, "dense": True}])],
        torchrun=False, timeout=300, out_dir=tmp_path / "ref",
    )  # fmt: skip
    cases = [
        {"name": "tp2", "tp": 2, "mbs": 2},  # vocabulary 128 padded to 256 at TP2
        {"name": "tp2_whole", "tp": 2, "mbs": 2, "chunk": 0},  # whole logits, not chunks
        {"name": "pp2", "pp": 2, "mbs": 4},  # 2 micro-batches of 4 rows (one padding row)
        {"name": "ep2", "ep": 2, "mbs": 2},  # EP2 x DP2 for the dense layers
        {"name": "dp2", "mbs": 2},  # 4 + 3 sequences: one padding row on rank 1
    ]
    parallel = start_workers(
        WORKER, 2, ["--cases", json.dumps(cases)], timeout=600, out_dir=tmp_path / "par"
    )
    (ref,) = reference.wait()
    ranks = parallel.wait()
    for estimator in ("sampled", "topk"):
        r = ref["tp1"][estimator]
        # the single-process step equals plain autograd on the whole batch
        assert r["out"]["loss"] == pytest.approx(r["dense_loss"], rel=1e-5)
        for pname, (g, *_) in r["grads"].items():
            scale = max(x[0].abs().max().item() for x in r["dense_grads"].values())
            torch.testing.assert_close(
                g, r["dense_grads"][pname][0], rtol=1e-4, atol=1e-5 * scale, msg=pname
            )
        assert math.isfinite(r["out"]["reverse_kl"]) and r["out"]["sequences"] == 7
        for case in cases:
            got = [rank[case["name"]][estimator] for rank in ranks]
            _assert_close_step(f"{case['name']}/{estimator}", got[0], r, [g["grads"] for g in got])
        # chunked logits (tp2, default) and whole logits: the same parameters after the step
        for rank in ranks:
            chunked, whole = (
                rank["tp2"][estimator]["params"],
                rank["tp2_whole"][estimator]["params"],
            )
            assert set(chunked) == set(whole)
            for pname, value in whole.items():
                torch.testing.assert_close(chunked[pname], value, rtol=1e-5, atol=1e-6, msg=pname)
    assert ranks[0]["tp2"]["layout"] == (2, 1, 1, 1)
    assert ranks[0]["pp2"]["layout"] == (1, 2, 1, 1)
    assert ranks[0]["ep2"]["layout"] == (1, 1, 2, 2)
    assert ranks[0]["dp2"]["layout"] == (1, 1, 1, 2)
