"""The MOPD loss against dense references written here with loops in float64.

Covers the weights, advantages, the surrogate and its gradient, normalisation across
micro-batches, per-domain settings, the dense top-k estimators, the vocabulary-parallel
gather (single process and a real 2-process gloo group) and a Monte-Carlo check that the
sampled-token advantage estimates minus the reverse KL.
"""

from __future__ import annotations

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mopd.config import LossConfig, LossOverride
from megatron_mopd.loss import (
    CORRECTIONS,
    STAT_INDEX,
    group_stats,
    grpo_advantages,
    icepop_weights,
    importance_weights,
    mopd_advantages,
    mopd_loss,
    sequence_settings,
    stats_to_means,
    topk_forward_kl,
    topk_reverse_kl,
    vocab_parallel_gather_logprobs,
)

SEEDS = [0, 1, 2]
F64 = torch.float64


# --------------------------------------------------------------------------------------
# references (loops, float64, python floats)


def ref_weight(t: float, ro: float, lo: float, hi: float, correction: str) -> float:
    r = math.exp(t - ro)
    if correction == "icepop":
        return r if lo <= r <= hi else 0.0
    if correction == "tis":
        return min(r, hi)
    return 1.0


def ref_loss(
    train, rollout, teacher, mask, orm, alpha, lo, hi, correction, n_global=None, coef=1.0
):
    """Loss, its gradient w.r.t. train, and token-mean metrics, by explicit loops."""
    B, T = len(train), len(train[0])
    n_global = B if n_global is None else n_global
    total, grad = 0.0, [[0.0] * T for _ in range(B)]
    kl = adv_sum = dev = low = high = ntok = 0.0
    for i in range(B):
        n = sum(1 for t in range(T) if mask[i][t])
        for t in range(T):
            if not mask[i][t]:
                continue
            a = alpha[i] if isinstance(alpha, list) else alpha
            lo_i = lo[i] if isinstance(lo, list) else lo
            hi_i = hi[i] if isinstance(hi, list) else hi
            c = correction[i] if isinstance(correction, list) else correction
            w = ref_weight(train[i][t], rollout[i][t], lo_i, hi_i, c)
            k = coef[i] if isinstance(coef, list) else coef
            adv = k * (teacher[i][t] - train[i][t]) + (a * orm[i] if orm is not None else 0.0)
            total += -w * adv * train[i][t] / n / n_global
            grad[i][t] = -w * adv / n / n_global
            r = math.exp(train[i][t] - rollout[i][t])
            kl += train[i][t] - teacher[i][t]
            adv_sum += adv
            dev += abs(r - 1)
            low += r < lo_i
            high += r > hi_i
            ntok += 1
    metrics = {
        "reverse_kl": kl / ntok if ntok else 0.0,
        "advantage": adv_sum / ntok if ntok else 0.0,
        "ratio_abs_dev": dev / ntok if ntok else 0.0,
        "discard_low_frac": low / ntok if ntok else 0.0,
        "discard_high_frac": high / ntok if ntok else 0.0,
    }
    return total, grad, metrics


def ref_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two probability lists."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def random_batch(seed: int, B: int = 5, T: int = 7, spread: float = 0.8, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    train = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    rollout = train + spread * torch.randn(B, T, generator=g, dtype=dtype)
    teacher = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 0  # an empty response
    start = torch.randint(0, 2, (B,), generator=g)
    pos = torch.arange(T)
    mask = ((pos >= start[:, None]) & (pos < start[:, None] + lengths[:, None])).to(dtype)
    orm = torch.randn(B, generator=g, dtype=dtype)
    return train, rollout, teacher, mask, orm


# --------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_weights_match_reference(seed, correction):
    train, rollout, _, _, _ = random_batch(seed, spread=1.5)
    train.requires_grad_(True)
    w = importance_weights(train, rollout, 0.5, 5.0, correction)
    assert not w.requires_grad
    for i in range(train.shape[0]):
        for t in range(train.shape[1]):
            ref = ref_weight(train[i, t].item(), rollout[i, t].item(), 0.5, 5.0, correction)
            assert w[i, t].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    if correction == "icepop":
        assert torch.equal(w, icepop_weights(train, rollout))
        assert (w == 0).any() and (w > 0).any()  # the draw exercises both sides


def test_icepop_edges():
    zeros = torch.zeros(2, 3, dtype=F64)
    # a ratio exactly at either bound is kept (r = 1 with eps_low = eps_high = 1)
    assert torch.equal(icepop_weights(zeros, zeros, 1.0, 1.0), torch.ones(2, 3, dtype=F64))
    d = torch.tensor([[math.log(0.5), math.log(5.0)]], dtype=F64)
    r = torch.exp(d)  # the bounds equal to the computed ratios
    w = icepop_weights(d, torch.zeros_like(d), r[0, 0].item(), r[0, 1].item())
    assert torch.equal(w, r)
    # just outside both bounds: discarded
    w = icepop_weights(d, torch.zeros_like(d), r[0, 0].item() * 1.001, r[0, 1].item() * 0.999)
    assert torch.equal(w, torch.zeros_like(d))
    # all tokens discarded (float32 inputs, float32 out)
    far = torch.tensor([[3.0, -3.0]])
    assert torch.equal(icepop_weights(far, torch.zeros_like(far)), torch.zeros(1, 2))
    # per-sequence bounds
    d = torch.log(torch.tensor([[0.4, 2.0], [0.4, 2.0]], dtype=F64))
    w = icepop_weights(d, torch.zeros_like(d), torch.tensor([0.3, 0.5]), torch.tensor([1.5, 5.0]))
    assert torch.allclose(w, torch.tensor([[0.4, 0.0], [0.0, 2.0]], dtype=F64))


# --------------------------------------------------------------------------------------
# advantages


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_reference(seed, normalize_std):
    g = torch.Generator().manual_seed(seed)
    group, n = 4, 3
    rewards = torch.randint(0, 2, (group * n,), generator=g).to(F64) + 0.1 * torch.randn(
        group * n, generator=g, dtype=F64
    )
    out = grpo_advantages(rewards, group, normalize_std=normalize_std)
    for k in range(n):
        vals = rewards[k * group : (k + 1) * group].tolist()
        mean = sum(vals) / group
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / group)
        for j, v in enumerate(vals):
            ref = (v - mean) / (std + 1e-6) if normalize_std else v - mean
            assert out[k * group + j].item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_grpo_edges():
    same = torch.tensor([1.0, 1.0, 0.0, 0.0])  # zero std: advantages are 0, not NaN
    assert torch.equal(grpo_advantages(same, 2), torch.zeros(4))
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(5), 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_mopd_advantages_match_reference(seed):
    train, _, teacher, _, orm = random_batch(seed)
    train.requires_grad_(True)
    alpha = torch.rand(train.shape[0], dtype=F64)
    cases = ((None, 1.0, 1.0), (orm, 0.3, 1.0), (orm, alpha, 1.0), (orm, 1.0, 0.0))
    for orm_arg, alpha_arg, coef in (*cases, (orm, 0.5, alpha)):
        out = mopd_advantages(teacher, train, orm_arg, alpha_arg, coef)
        assert not out.requires_grad
        for i in range(train.shape[0]):
            a = alpha_arg[i].item() if isinstance(alpha_arg, torch.Tensor) else alpha_arg
            k = coef[i].item() if isinstance(coef, torch.Tensor) else coef
            extra = a * orm[i].item() if orm_arg is not None else 0.0
            for t in range(train.shape[1]):
                ref = k * (teacher[i, t].item() - train[i, t].item()) + extra
                assert out[i, t].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------
# the surrogate


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("with_orm", [False, True])
def test_loss_and_gradient_match_reference(seed, correction, with_orm):
    train, rollout, teacher, mask, orm = random_batch(seed)
    train.requires_grad_(True)
    teacher.requires_grad_(True)
    rollout.requires_grad_(True)
    orm_arg = orm if with_orm else None
    loss, metrics = mopd_loss(
        train, rollout, teacher, mask, orm_arg, alpha=0.7, eps_low=0.5, eps_high=2.0,
        correction=correction,
    )  # fmt: skip
    ref, ref_grad, ref_metrics = ref_loss(
        train.tolist(), rollout.tolist(), teacher.tolist(), mask.tolist(),
        orm.tolist() if with_orm else None, 0.7, 0.5, 2.0, correction,
    )  # fmt: skip
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    for name, value in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-10, abs=1e-12), name
    grad_train, grad_teacher, grad_rollout = torch.autograd.grad(
        loss, [train, teacher, rollout], allow_unused=True
    )
    assert grad_teacher is None and grad_rollout is None  # nothing flows into them
    assert torch.allclose(grad_train, torch.tensor(ref_grad, dtype=F64), rtol=1e-10, atol=1e-14)
    # and the closed form -(1/B)(1/|y_i|) mask w A
    w = importance_weights(train, rollout, 0.5, 2.0, correction)
    adv = mopd_advantages(teacher, train, orm_arg, 0.7)
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    analytic = -mask * w * adv / n / train.shape[0]
    assert torch.allclose(grad_train, analytic, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_distill_coef_scales_the_teacher_term(seed):
    """`distill_coef` per sequence (0 = outcome reward only, the ablation's ORM-only arm)
    on the sampled and the top-k estimators, against the loop reference."""
    train, rollout, teacher, mask, orm = random_batch(seed)
    train.requires_grad_(True)
    coef = [0.0, 1.0, 0.5, 0.0, 2.0]
    loss, _ = mopd_loss(
        train, rollout, teacher, mask, orm, alpha=0.7, eps_low=0.5, eps_high=2.0,
        distill_coef=torch.tensor(coef, dtype=F64),
    )  # fmt: skip
    ref, ref_grad, _ = ref_loss(
        train.tolist(), rollout.tolist(), teacher.tolist(), mask.tolist(), orm.tolist(),
        0.7, 0.5, 2.0, "icepop", coef=coef,
    )  # fmt: skip
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, train)
    assert torch.allclose(grad, torch.tensor(ref_grad, dtype=F64), rtol=1e-10, atol=1e-14)
    # ORM only: the teacher's log-probs do not matter at all
    orm_only = [
        mopd_loss(train, rollout, t, mask, orm, 0.7, distill_coef=0.0)[0].item()
        for t in (teacher, torch.zeros_like(teacher))
    ]
    assert orm_only[0] == orm_only[1] and orm_only[0] != loss.item()
    # top-k: the KL term is scaled by the coefficient, the ORM term is not
    K = 3
    g = torch.Generator().manual_seed(7 + seed)
    s_k = torch.log_softmax(torch.randn(5, 7, K + 2, generator=g, dtype=F64), -1)[..., :K]
    t_k = torch.log_softmax(torch.randn(5, 7, K + 2, generator=g, dtype=F64), -1)[..., :K]
    kw = dict(estimator="topk_reverse_kl", student_topk_logprobs=s_k, teacher_topk_logprobs=t_k)
    full, _ = mopd_loss(train, rollout, teacher, mask, orm, 0.7, **kw)
    kl_only, _ = mopd_loss(train, rollout, teacher, mask, None, **kw)
    orm_part, _ = mopd_loss(train, rollout, teacher, mask, orm, 0.7, distill_coef=0.0, **kw)
    half, _ = mopd_loss(train, rollout, teacher, mask, orm, 0.7, distill_coef=0.5, **kw)
    assert full.item() == pytest.approx(kl_only.item() + orm_part.item(), rel=1e-10)
    assert half.item() == pytest.approx(0.5 * kl_only.item() + orm_part.item(), rel=1e-10)


def test_loss_edges():
    train, rollout, teacher, mask, _ = random_batch(0, B=3, T=4)
    # garbage off the mask (NaN, inf) and an all-zero sequence: no NaN anywhere
    mask[1] = 0
    for x in (train, rollout, teacher):
        x[1] = float("nan")
        x[mask == 0] = float("-inf")
    train.requires_grad_(True)
    loss, metrics = mopd_loss(train, rollout, teacher, mask)
    (grad,) = torch.autograd.grad(loss, train)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros(4, dtype=F64))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    # every sequence empty: zero loss, zero gradient
    loss, _ = mopd_loss(train, rollout, teacher, torch.zeros_like(mask))
    assert loss.item() == 0.0 and torch.equal(torch.autograd.grad(loss, train)[0], 0 * grad)
    # all tokens discarded: zero loss and gradient; the fractions say why
    t2 = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = mopd_loss(t2, t2.detach() - 3.0, torch.zeros(2, 3), torch.ones(2, 3))
    assert loss.item() == 0.0 and torch.equal(torch.autograd.grad(loss, t2)[0], torch.zeros(2, 3))
    assert metrics["discard_high_frac"].item() == 1.0 and metrics["discard_low_frac"].item() == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_micro_batches_and_ranks_sum_to_the_global_loss(seed):
    """Splitting a batch into uneven micro-batches (and ranks) with `global_batch_size`
    gives the same summed loss, gradient and reduced statistics as the whole batch."""
    train, rollout, teacher, mask, orm = random_batch(seed, B=7, T=6)
    train.requires_grad_(True)
    full, full_metrics = mopd_loss(train, rollout, teacher, mask, orm, 0.5)
    (full_grad,) = torch.autograd.grad(full, train)
    total, stats = 0.0, []
    for sl in (slice(0, 1), slice(1, 4), slice(4, 7)):
        part, metrics = mopd_loss(
            train[sl], rollout[sl], teacher[sl], mask[sl], orm[sl], 0.5, global_batch_size=7
        )
        total = total + part
        stats.append(metrics["stats"].sum(0))
    (grad,) = torch.autograd.grad(total, train)
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(grad, full_grad, rtol=1e-12, atol=1e-15)
    reduced = stats_to_means(torch.stack(stats).sum(0))
    for name, value in full_metrics.items():
        if name != "stats":
            assert reduced[name].item() == pytest.approx(value.item(), rel=1e-10, abs=1e-12)
    assert reduced["loss"].item() == pytest.approx(full.item(), rel=1e-10)


def test_per_domain_settings_match_calls_per_domain():
    cfg = LossConfig(
        alpha=0.5,
        per_domain={
            "math": LossOverride(alpha=0.0, eps_low=0.8, eps_high=1.25),
            "code": LossOverride(correction="tis", eps_high=2.0),
            "chat": LossOverride(correction="none", alpha=2.0),
        },
    )
    cfg.validate("loss")
    domains = ["math", "code", "other", "math", "chat", "code", "other", "chat"]
    train, rollout, teacher, mask, orm = random_batch(3, B=len(domains), T=6, spread=0.4)
    train.requires_grad_(True)
    s = sequence_settings(cfg, domains, dtype=F64)
    loss, metrics = mopd_loss(
        train, rollout, teacher, mask, orm, **s.kwargs(), global_batch_size=len(domains)
    )
    (grad,) = torch.autograd.grad(loss, train)
    names = sorted(set(domains))
    ids = torch.tensor([names.index(d) for d in domains])
    per_domain = stats_to_means(group_stats(metrics["stats"], ids, len(names)))
    total, grad_sum = 0.0, torch.zeros_like(train)
    for k, d in enumerate(names):
        idx = torch.tensor([i for i, x in enumerate(domains) if x == d])
        c = cfg.for_domain(d)
        part, part_metrics = mopd_loss(
            train[idx], rollout[idx], teacher[idx], mask[idx], orm[idx], c.alpha, c.eps_low,
            c.eps_high, c.correction, global_batch_size=len(domains),
        )  # fmt: skip
        total += part.item()
        grad_sum[idx] += torch.autograd.grad(part, train)[0][idx]
        for name in ("reverse_kl", "advantage", "weight", "discard_high_frac", "loss"):
            assert per_domain[name][k].item() == pytest.approx(
                part_metrics[name].item(), rel=1e-10, abs=1e-12
            )
    assert loss.item() == pytest.approx(total, rel=1e-12)
    assert torch.allclose(grad, grad_sum, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------
# dense top-k estimators


def _dists(seed: int, V: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g, dtype=F64) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g, dtype=F64) * 1.5, -1)
    return p, q


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_kl_with_full_support_is_the_exact_kl(seed):
    p, q = _dists(seed, 9)
    for tail in (True, False):
        rev = topk_reverse_kl(p.log(), q.log(), tail=tail).item()
        fwd = topk_forward_kl(p.log(), q.log(), tail=tail).item()
        assert rev == pytest.approx(ref_kl(p.tolist(), q.tolist()), rel=1e-9)
        assert fwd == pytest.approx(ref_kl(q.tolist(), p.tolist()), rel=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_kl_on_a_partial_support(seed):
    p, q = _dists(seed, 12)
    top = torch.topk(q, 4).indices
    ps, qs = p[top].tolist(), q[top].tolist()
    P, Q = sum(ps), sum(qs)
    renorm_rev = ref_kl([x / P for x in ps], [x / Q for x in qs])
    renorm_fwd = ref_kl([x / Q for x in qs], [x / P for x in ps])
    tail_rev = ref_kl(ps + [1 - P], qs + [1 - Q])
    tail_fwd = ref_kl(qs + [1 - Q], ps + [1 - P])
    s, t = p.log()[top], q.log()[top]
    assert topk_reverse_kl(s, t, tail=False).item() == pytest.approx(renorm_rev, rel=1e-9)
    assert topk_forward_kl(s, t, tail=False).item() == pytest.approx(renorm_fwd, rel=1e-9)
    assert topk_reverse_kl(s, t).item() == pytest.approx(tail_rev, rel=1e-9)
    assert topk_forward_kl(s, t).item() == pytest.approx(tail_fwd, rel=1e-9)
    # the tail version is the chain-rule decomposition minus the within-tail term
    kl_bin = ref_kl([P, 1 - P], [Q, 1 - Q])
    assert tail_rev == pytest.approx(kl_bin + P * renorm_rev, rel=1e-9)
    assert tail_rev <= ref_kl(p.tolist(), q.tolist()) + 1e-12


def test_topk_tail_is_finite_when_the_top_k_holds_all_mass():
    s = torch.log(torch.tensor([0.5, 0.5], dtype=F64)).requires_grad_(True)
    t = torch.log(torch.tensor([0.7, 0.3 + 1e-9], dtype=F64))  # rounding: Q > 1
    for fn in (topk_reverse_kl, topk_forward_kl):
        out = fn(s, t)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()


def test_topk_kl_ignores_padded_teacher_entries():
    p, q = _dists(4, 10)
    top = torch.topk(q, 5).indices
    s, t = p.log()[top], q.log()[top]
    s_pad = torch.cat([s, torch.tensor([-0.3, -2.0], dtype=F64)]).requires_grad_(True)
    t_pad = torch.cat([t, torch.full((2,), -math.inf, dtype=F64)])
    empty = torch.full((7,), -math.inf, dtype=F64)
    for fn in (topk_reverse_kl, topk_forward_kl):
        for tail in (True, False):
            out = fn(torch.stack([s_pad, s_pad]), torch.stack([t_pad, empty]), tail=tail)
            assert out[0].item() == pytest.approx(fn(s, t, tail=tail).item(), rel=1e-12)
            assert out[1].item() == 0.0
            (g,) = torch.autograd.grad(out.sum(), s_pad)
            assert torch.isfinite(g).all() and (g[-2:] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_loss_matches_reference(seed):
    """The top-k path of `mopd_loss` (mixed with sampled sequences in one call) against a
    reference built from the loops above, value and gradient."""
    B, T, K = 4, 5, 3
    train, rollout, teacher, mask, orm = random_batch(seed, B=B, T=T, spread=1.0)
    g = torch.Generator().manual_seed(100 + seed)
    s_k = torch.log_softmax(torch.randn(B, T, K + 2, generator=g, dtype=F64), -1)[..., :K]
    t_k = torch.log_softmax(torch.randn(B, T, K + 2, generator=g, dtype=F64), -1)[..., :K]
    s_k.requires_grad_(True)
    train.requires_grad_(True)
    estimator = torch.tensor([1, 0, 2, 1])  # reverse, sampled, forward, reverse
    loss, metrics = mopd_loss(
        train, rollout, teacher, mask, orm, 0.5, 0.5, 2.0, "icepop", estimator=estimator,
        student_topk_logprobs=s_k, teacher_topk_logprobs=t_k,
    )  # fmt: skip
    ref = 0.0
    for i in range(B):
        n = int(mask[i].sum())
        for t in range(T):
            if not mask[i, t]:
                continue
            tr, ro, te = train[i, t].item(), rollout[i, t].item(), teacher[i, t].item()
            w = ref_weight(tr, ro, 0.5, 2.0, "icepop")
            if estimator[i] == 0:
                ref += -w * (te - tr + 0.5 * orm[i].item()) * tr / n / B
                continue
            ps, qs = s_k[i, t].exp().tolist(), t_k[i, t].exp().tolist()
            pd, qd = ps + [1 - sum(ps)], qs + [1 - sum(qs)]
            kl = ref_kl(pd, qd) if estimator[i] == 1 else ref_kl(qd, pd)
            keep = 1.0 if 0.5 <= math.exp(tr - ro) <= 2.0 else 0.0
            ref += (keep * kl - w * 0.5 * orm[i].item() * tr) / n / B
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    # gradient w.r.t. the top-k log-probs: the KL's own gradient, scaled by keep / (|y| B)
    (gs,) = torch.autograd.grad(loss, s_k, retain_graph=True)
    for i, t in ((0, 2), (2, 3), (1, 2)):
        if not mask[i, t] or estimator[i] == 0:
            assert torch.equal(gs[i, t], torch.zeros(K, dtype=F64))
            continue
        x = s_k[i, t].detach().clone().requires_grad_(True)
        fn = topk_reverse_kl if estimator[i] == 1 else topk_forward_kl
        (gx,) = torch.autograd.grad(fn(x, t_k[i, t]), x)
        keep = 0.5 <= math.exp(train[i, t].item() - rollout[i, t].item()) <= 2.0
        assert torch.allclose(gs[i, t], gx * keep / mask[i].sum() / B, rtol=1e-10, atol=1e-15)
    assert metrics["topk_tokens"].item() == mask[[0, 2, 3]].sum().item()


# --------------------------------------------------------------------------------------
# Monte-Carlo: the sampled-token advantage estimates minus the reverse KL


def test_monte_carlo_sampled_advantage_is_minus_reverse_kl():
    """Student and teacher: random distributions over V=10 at 6 positions. Tokens drawn
    from the student (rollout = train, so w = 1). Tolerance: 5 standard errors of the
    sample mean (estimated from the samples), so a false failure has probability < 1e-6
    per position; the fixed seed makes the test deterministic."""
    V, P, N = 10, 6, 40_000
    g = torch.Generator().manual_seed(7)
    student_logits = torch.randn(P, V, generator=g, dtype=F64, requires_grad=True)
    teacher_lp = torch.log_softmax(torch.randn(P, V, generator=g, dtype=F64) * 2, -1)
    student_lp = torch.log_softmax(student_logits, -1)
    y = torch.multinomial(student_lp.exp().detach(), N, replacement=True, generator=g)  # [P, N]
    train = student_lp.gather(1, y)  # [P, N]: each sample a one-token "response"
    adv = mopd_advantages(teacher_lp.gather(1, y), train)
    for pos in range(P):
        p, q = student_lp[pos].exp().tolist(), teacher_lp[pos].exp().tolist()
        exact = -ref_kl(p, q)
        stderr = adv[pos].std().item() / math.sqrt(N)
        assert abs(adv[pos].mean().item() - exact) < 5 * stderr, (pos, exact, stderr)
    # and the expected surrogate gradient is the reverse-KL gradient (same tolerance,
    # per logit, with the per-sample gradient -A (onehot(y) - p) giving the standard error)
    # sample n is a response of P tokens, one per position: the loss carries 1 / P
    ones = torch.ones_like(train)
    loss, _ = mopd_loss(train.T, train.T.detach(), teacher_lp.gather(1, y).T, ones.T)
    (grad,) = torch.autograd.grad(loss * P, student_logits, retain_graph=True)
    exact_kl = (student_lp.exp() * (student_lp - teacher_lp)).sum()
    (exact_grad,) = torch.autograd.grad(exact_kl, student_logits)
    p = student_lp.exp().detach()
    per_sample = -adv[..., None] * (torch.nn.functional.one_hot(y, V) - p[:, None, :])
    stderr = per_sample.std(dim=1) / math.sqrt(N)
    assert torch.allclose(grad, per_sample.mean(1), rtol=1e-9, atol=1e-12)
    assert ((grad - exact_grad).abs() < 5 * stderr + 1e-12).all()


# --------------------------------------------------------------------------------------
# vocabulary-parallel gather


@pytest.mark.parametrize("inplace", [False, True])
def test_vocab_gather_single_process(inplace):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 37, generator=g, dtype=F64) * 4
    ids = torch.randint(0, 37, (3, 5, 4), generator=g)
    ids[..., 1] = ids[..., 0]  # duplicates accumulate
    grad_out = torch.randn(3, 5, 4, generator=g, dtype=F64)
    ref_logits = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, ids)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad_out)
    x = logits.clone().requires_grad_(True)
    out = vocab_parallel_gather_logprobs(x * 1, ids, None, inplace, chunk_elements=50)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-12)
    # float32 logits give float32 log-probs
    assert vocab_parallel_gather_logprobs(logits.float(), ids).dtype == torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        group = dist.new_group([0, 1])
        g = torch.Generator().manual_seed(0)
        B, T, V, K = 3, 6, 24, 3
        logits = torch.randn(B, T, V, generator=g, dtype=F64) * 3
        top_ids = torch.randint(0, V, (B, T, K), generator=g)
        sampled = torch.randint(0, V, (B, T, 1), generator=g)
        ids = torch.cat([sampled, top_ids], -1)
        grad_out = torch.randn(B, T, K + 1, generator=g, dtype=F64)
        part = V // world
        shard = logits[..., rank * part : (rank + 1) * part]
        # the raw gather, forward and backward
        full = logits.clone().requires_grad_(True)
        ref = torch.log_softmax(full, -1).gather(-1, ids)
        (ref_grad,) = torch.autograd.grad(ref, full, grad_out)
        for inplace in (False, True):
            x = shard.clone().requires_grad_(True)
            out = vocab_parallel_gather_logprobs(x * 1, ids, group, inplace, chunk_elements=40)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
            (grad,) = torch.autograd.grad(out, x, grad_out)
            torch.testing.assert_close(grad, ref_grad[..., rank * part : (rank + 1) * part])
        # through mopd_loss with a top-k estimator: the shard's gradient is the slice of
        # the single-process gradient
        mask = torch.ones(B, T, dtype=F64)
        mask[0, 4:] = 0
        rollout = torch.log_softmax(logits, -1).gather(-1, sampled)[..., 0] + 0.1
        teacher_all = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=F64), -1)
        teacher, teacher_k = (
            teacher_all.gather(-1, sampled)[..., 0],
            teacher_all.gather(-1, top_ids),
        )

        def loss_of(lp):
            return mopd_loss(
                lp[..., 0], rollout, teacher, mask, estimator=torch.tensor([0, 1, 2]),
                student_topk_logprobs=lp[..., 1:], teacher_topk_logprobs=teacher_k,
            )[0]  # fmt: skip

        full = logits.clone().requires_grad_(True)
        ref_loss_value = loss_of(torch.log_softmax(full, -1).gather(-1, ids))
        (ref_grad,) = torch.autograd.grad(ref_loss_value, full)
        x = shard.clone().requires_grad_(True)
        value = loss_of(vocab_parallel_gather_logprobs(x, ids, group))
        (grad,) = torch.autograd.grad(value, x)
        torch.testing.assert_close(value, ref_loss_value)
        torch.testing.assert_close(grad, ref_grad[..., rank * part : (rank + 1) * part])
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_vocab_gather_two_process_gloo():
    """A real 2-rank gloo group: each rank holds half the vocabulary."""
    port = _free_port()
    ctx = mp.start_processes(_tp_worker, args=(2, port), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process gloo test hung for 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, 9)


def test_stats_grouping_and_means():
    stats = torch.zeros(3, len(STAT_INDEX))
    stats[:, STAT_INDEX["sequences"]] = 1
    stats[:, STAT_INDEX["tokens"]] = torch.tensor([2.0, 0.0, 4.0])
    stats[:, STAT_INDEX["reverse_kl"]] = torch.tensor([1.0, 0.0, 3.0])
    grouped = group_stats(stats, torch.tensor([1, 0, 1]), 3)
    means = stats_to_means(grouped)
    assert means["reverse_kl"].tolist() == pytest.approx([0.0, 4.0 / 6.0, 0.0])  # empty: 0
    assert means["sequences"].tolist() == [1.0, 2.0, 0.0]
    assert means["response_length"].tolist() == [0.0, 3.0, 0.0]
