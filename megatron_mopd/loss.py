"""The MOPD loss: importance weights, advantages, the surrogate and its statistics.

Pure functions on `[B, T]` tensors (`B` sequences, `T` positions); `mask` marks response
tokens (stop token included). The surrogate (MOPD.md, MiMo-V2-Flash section 4.4) is

    loss = -(1 / B_global) * sum_i (1 / |y_i|) * sum_t mask * w_t * A_t * log pi_theta(y_t)
    r_t  = pi_theta(y_t) / mu_theta(y_t)                          (train / rollout)
    w_t  = sg[r_t] if eps_low <= r_t <= eps_high else 0            (correction="icepop")
         = sg[min(r_t, eps_high)]                                  (correction="tis")
         = 1                                                       (correction="none")
    A_t  = sg[log pi_teacher(y_t) - log pi_theta(y_t)] + alpha * A_ORM

Normalisation, stated once because it changes the gradient: each response is averaged
over its own tokens, then responses are *summed* and divided by `global_batch_size`, the
number of sequences in the whole optimizer step (all micro-batches, all data-parallel
ranks). A micro-batch therefore returns its exact share of the global loss, and summing
the micro-batch gradients over micro-batches and ranks (never averaging) gives the
single-process gradient of the whole batch. A response with no tokens contributes zero.

Sampled-token estimator (MiMo's): at each position, the expected surrogate gradient over
the sampled token equals the gradient of the full-vocabulary reverse KL with the prefix
held fixed, and the expected advantage equals minus that KL (tests/test_loss.py checks
both by Monte-Carlo). It is unbiased but noisy when the student is far from its teacher
(MOPD.md, measured notes), which is what the dense estimators are for.

Dense estimators (`estimator="topk_reverse_kl" | "topk_forward_kl"`): when a teacher returns
its top-k log-probs per position, the sampled-token term is replaced by an analytic KL
over the teacher's top-k ids `S_t` (see `topk_reverse_kl` / `topk_forward_kl` for exactly
what each estimates). The student's log-probs on `S_t` come from
`vocab_parallel_gather_logprobs`, which never builds a `[T, V]` tensor beyond the logits'
own shard. Importance weighting for the dense term: the KL at position t is computed
exactly for the prefix `y_<t`; the ratio `r_t` of the *sampled* token says nothing about
that distribution, so the dense term is not multiplied by `r_t`. It does keep IcePop's
discard (a position whose `r_t` is out of bounds is dropped: train and inference disagree
there, e.g. through MoE routing); TIS and "none" keep every position. The prefix's own
mismatch (a product of earlier ratios) is ignored, as in every token-level method. The
outcome term `alpha * A_ORM` stays a policy gradient on the sampled token with weight `w_t`.

Left out on purpose: per-token (rather than per-sequence) normalisation, PPO clipping (the
update is on-policy up to the train/inference mismatch, which the weights handle), and
return-to-go advantages (MiMo uses the per-token log-ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mopd.config import LossConfig

CORRECTIONS = ("none", "icepop", "tis")
"""Names of the importance corrections; a per-sequence tensor holds their index."""
ESTIMATORS = ("sampled", "topk_reverse_kl", "topk_forward_kl")
"""Names of the distillation estimators; a per-sequence tensor holds their index."""

# Per-sequence statistics returned by `mopd_loss` (columns of `metrics["stats"]`), each
# with the column that counts it. Sums add across micro-batches, ranks and domains.
STATS: tuple[tuple[str, str], ...] = (
    ("sequences", ""),
    ("tokens", ""),
    ("topk_tokens", ""),
    ("loss", "sequences"),  # this sequence's (1/|y|) sum_t term; mean over sequences = loss
    ("orm_advantage", "sequences"),
    ("reverse_kl", "tokens"),  # sampled-token estimate log pi_theta - log pi_teacher
    ("advantage", "tokens"),  # A_t of the sampled token
    ("weight", "tokens"),  # w_t
    ("ratio_abs_dev", "tokens"),  # |r_t - 1|
    ("discard_low", "tokens"),  # r_t < eps_low (IcePop drops these)
    ("discard_high", "tokens"),  # r_t > eps_high (IcePop drops, TIS truncates)
    ("topk_kl", "topk_tokens"),  # the dense estimator's per-position KL
)
STAT_INDEX = {name: i for i, (name, _) in enumerate(STATS)}
_MEAN_NAMES = {"discard_low": "discard_low_frac", "discard_high": "discard_high_frac"}

Scalar = float | Tensor


# --------------------------------------------------------------------------------------
# weights and advantages


def icepop_weights(
    train_logprobs: Tensor,
    rollout_logprobs: Tensor,
    eps_low: Scalar = 0.5,
    eps_high: Scalar = 5.0,
) -> Tensor:
    """IcePop weights: `r = exp(train - rollout)` where `eps_low <= r <= eps_high`, else 0.

    Bounds are inclusive; they may be floats or `[B]` tensors (one value per sequence).
    No gradient. Computed in at least float32.
    """
    with torch.no_grad():
        r = _ratio(train_logprobs, rollout_logprobs)
        lo, hi = _col(eps_low, r), _col(eps_high, r)
        return torch.where((r >= lo) & (r <= hi), r, torch.zeros_like(r))


def importance_weights(
    train_logprobs: Tensor,
    rollout_logprobs: Tensor,
    eps_low: Scalar = 0.5,
    eps_high: Scalar = 5.0,
    correction: str | Tensor = "icepop",
) -> Tensor:
    """The weight `w_t` of each correction: IcePop, TIS (`min(r, eps_high)`) or 1 ("none").

    `correction` is a name from `CORRECTIONS` or a `[B]` tensor of their indices. No gradient.
    TIS reuses `eps_high` as its cap; the usual TIS cap is 2 (set `loss.eps_high=2`, or per
    domain), IcePop's default upper bound is 5.
    """
    with torch.no_grad():
        r = _ratio(train_logprobs, rollout_logprobs)
        code = _codes(correction, CORRECTIONS, "correction", r)
        hi = _col(eps_high, r)
        icepop = icepop_weights(train_logprobs, rollout_logprobs, eps_low, eps_high)
        tis = torch.minimum(r, hi.expand_as(r))
        ones = torch.ones_like(r)
        return torch.where(code == 1, icepop, torch.where(code == 2, tis, ones))


def grpo_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO outcome advantages of `[B]` rewards in consecutive groups of `group_size`.

    Each reward minus its group's mean, divided by the group's std (biased) + `eps` when
    `normalize_std`. Returns `[B]` float, no gradient.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    with torch.no_grad():
        groups = rewards.detach().to(_float_dtype(rewards)).reshape(-1, group_size)
        centred = groups - groups.mean(dim=1, keepdim=True)
        if normalize_std:
            centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
        return centred.reshape(rewards.shape)


def mopd_advantages(
    teacher_logprobs: Tensor,
    train_logprobs: Tensor,
    orm_advantages: Tensor | None = None,
    alpha: Scalar = 1.0,
    distill_coef: Scalar = 1.0,
) -> Tensor:
    """Token advantages `distill_coef * sg[teacher - train] + alpha * orm_advantages[:, None]`.

    `orm_advantages` is `[B]` (None: no outcome term); `alpha` and `distill_coef` floats or
    `[B]` tensors (`distill_coef = 0`: outcome-reward RL without a teacher, the ablation's
    "ORM only" arm). No gradient. Computed in at least float32.
    """
    with torch.no_grad():
        dtype = _float_dtype(train_logprobs)
        adv = teacher_logprobs.to(dtype) - train_logprobs.detach().to(dtype)
        adv = adv * _col(distill_coef, adv)
        if orm_advantages is not None:
            adv = adv + _col(alpha, adv) * orm_advantages.to(dtype)[:, None]
        return adv


# --------------------------------------------------------------------------------------
# dense top-k estimators


def topk_reverse_kl(
    student_topk_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    tail: bool = True,
    min_tail: float = 1e-6,
) -> Tensor:
    """Per-position reverse KL(student || teacher) over the teacher's top-k ids `S`.

    Both inputs are `[..., K]` log-probs normalised over the whole vocabulary, on the same
    ids (the teacher's top-k). Returns `[...]`, differentiable in the student's log-probs.

    With p = student, q = teacher, P = p(S), Q = q(S) and `p|S` the renormalised
    restriction, the chain rule of KL gives the exact decomposition

        KL(p || q) = KL_bin(P || Q) + P * KL(p|S || q|S) + (1 - P) * KL(p|S^c || q|S^c).

    `tail=True` (default) returns the first two terms: the KL between the K + 1 category
    distributions (the top-k ids and one "everything else" bucket). It is a lower bound of
    the full reverse KL, missing only the divergence *inside* the tail, and it penalises
    moving mass out of `S`. `tail=False` returns `KL(p|S || q|S)`, the KL of both
    distributions renormalised on `S`: exact when both put all mass on `S`, but neither a
    bound nor consistent otherwise, and blind to the student moving mass outside `S`
    (e.g. onto a stop token the teacher does not rank), so it is offered for comparison.
    Tail masses are floored at `min_tail` (rounding can make `Q` exceed 1). Teacher entries
    equal to -inf (padding, e.g. teachers with different k) are left out of `S`; a position
    with no finite entry gives 0.
    """
    return _topk_kl(student_topk_logprobs, teacher_topk_logprobs, tail, min_tail, reverse=True)


def topk_forward_kl(
    student_topk_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    tail: bool = True,
    min_tail: float = 1e-6,
) -> Tensor:
    """Per-position forward KL(teacher || student) over the teacher's top-k ids `S`.

    The same decomposition as `topk_reverse_kl` with the roles swapped. `tail=True`: the
    KL between the K + 1 category distributions, a lower bound of the full forward KL
    missing `(1 - Q) * KL(q|S^c || p|S^c)`, which is small when the teacher's top-k holds
    most of its mass (the usual case for k >= 20). `tail=False`: `KL(q|S || p|S)`, the
    cross-entropy to the renormalised teacher top-k minus its entropy. Forward KL is
    mass-covering (the student spreads over all the teacher's likely tokens); the reverse
    KL that MOPD's sampled estimator targets is mode-seeking.
    """
    return _topk_kl(student_topk_logprobs, teacher_topk_logprobs, tail, min_tail, reverse=False)


def _topk_kl(s: Tensor, t: Tensor, tail: bool, min_tail: float, reverse: bool) -> Tensor:
    dtype = _float_dtype(s)
    s, t = s.to(dtype), t.detach().to(dtype)
    # teacher entries padded with -inf are outside the support; a position with none is 0
    valid = torch.isfinite(t)
    rows = valid.any(dim=-1, keepdim=True)
    valid = valid | ~rows  # such rows are computed on dummy zeros, then zeroed
    ninf = torch.tensor(-math.inf, dtype=dtype, device=s.device)
    s = torch.where(valid, torch.where(rows, s, 0.0), ninf)
    t = torch.where(valid, torch.where(rows, t, 0.0), ninf)
    if tail:
        cap = math.log1p(-min_tail)
        ls = _log1mexp(torch.logsumexp(s, dim=-1).clamp(max=cap)).unsqueeze(-1)
        lt = _log1mexp(torch.logsumexp(t, dim=-1).clamp(max=cap)).unsqueeze(-1)
        s, t = torch.cat([s, ls], dim=-1), torch.cat([t, lt], dim=-1)
        valid = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    else:
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    a, b = (s, t) if reverse else (t, s)
    a, b = torch.where(valid, a, 0.0), torch.where(valid, b, 0.0)
    terms = torch.where(valid, a.exp() * (a - b), 0.0)
    return torch.where(rows[..., 0], terms.sum(dim=-1), 0.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --------------------------------------------------------------------------------------
# the surrogate


def mopd_loss(
    train_logprobs: Tensor,
    rollout_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    orm_advantages: Tensor | None = None,
    alpha: Scalar = 1.0,
    eps_low: Scalar = 0.5,
    eps_high: Scalar = 5.0,
    correction: str | Tensor = "icepop",
    *,
    global_batch_size: int | Tensor | None = None,
    estimator: str | Tensor = "sampled",
    student_topk_logprobs: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    topk_tail: bool = True,
    distill_coef: Scalar = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The MOPD surrogate of one (micro-)batch and its statistics.

    Args:
        train_logprobs: `[B, T]` log pi_theta of the sampled tokens; the only gradient path.
        rollout_logprobs: `[B, T]` log mu_theta from the inference engine.
        teacher_logprobs: `[B, T]` the domain teacher's log-probs of the sampled tokens.
        mask: `[B, T]` 1 on response tokens, 0 elsewhere (values off the mask are ignored,
            even when infinite or NaN).
        orm_advantages: `[B]` outcome advantages (e.g. `grpo_advantages`), or None.
        alpha, eps_low, eps_high: floats, or `[B]` tensors (per sequence, see
            `sequence_settings`).
        correction: a name from `CORRECTIONS` or a `[B]` tensor of indices.
        global_batch_size: the number of sequences in the whole optimizer step, over all
            micro-batches and data-parallel ranks (default: this batch's B). The returned
            loss is this batch's share: summing it over micro-batches and ranks gives the
            loss of the global batch.
        estimator: a name from `ESTIMATORS` or a `[B]` tensor of indices. The top-k ones
            need `student_topk_logprobs` (differentiable) and `teacher_topk_logprobs`,
            both `[B, T, K]` on the teacher's top-k ids.
        topk_tail: whether the top-k KL includes the "rest of the vocabulary" bucket.
        distill_coef: weight of the teacher term (float or `[B]`); 0 leaves only the
            outcome-reward term (GRPO without a teacher, for ablations).

    Returns:
        `(loss, metrics)`: `loss` is a 0-d tensor; `metrics` holds detached local means
        (`reverse_kl`, `discard_low_frac`, `discard_high_frac`, `ratio_abs_dev`, `advantage`,
        `weight`, `topk_kl`, `loss`, `response_length`, `orm_advantage`, and the counts
        `sequences`, `tokens`, `topk_tokens`) and `stats`: a `[B, len(STATS)]` tensor of
        per-sequence sums, to be grouped by domain (`group_stats`), summed across
        micro-batches and ranks, then turned into means with `stats_to_means`.
    """
    batch = train_logprobs.shape[0]
    dtype = _float_dtype(train_logprobs)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=train_logprobs.device)
    train = torch.where(m, train_logprobs.to(dtype), zero)  # the gradient path
    with torch.no_grad():
        rollout = torch.where(m, rollout_logprobs.to(dtype), zero)
        teacher = torch.where(m, teacher_logprobs.to(dtype), zero)
        r = _ratio(train, rollout)
        w = torch.where(m, importance_weights(train, rollout, eps_low, eps_high, correction), zero)
        adv = torch.where(
            m, mopd_advantages(teacher, train, orm_advantages, alpha, distill_coef), zero
        )
        lengths = m.sum(dim=-1)
        inv_len = 1.0 / lengths.clamp(min=1).to(dtype)

    est = _codes(estimator, ESTIMATORS, "estimator", train)[:, 0]
    use_topk = est > 0
    token_loss = -(w * adv) * train
    topk_kl = torch.zeros_like(train)
    if bool(use_topk.any()):
        if student_topk_logprobs is None or teacher_topk_logprobs is None:
            raise ValueError("a top-k estimator needs student_ and teacher_topk_logprobs")
        dense, topk_kl = _dense_token_loss(
            train, r, w, m & use_topk[:, None], est, student_topk_logprobs,
            teacher_topk_logprobs, orm_advantages, alpha, eps_low, eps_high, correction,
            topk_tail, distill_coef,
        )  # fmt: skip
        token_loss = torch.where(use_topk[:, None], dense, token_loss)

    seq_loss = token_loss.sum(dim=-1) * inv_len
    normaliser = batch if global_batch_size is None else global_batch_size
    loss = seq_loss.sum() / normaliser

    with torch.no_grad():
        columns = {
            "sequences": torch.ones_like(inv_len),
            "tokens": lengths.to(dtype),
            "topk_tokens": lengths.to(dtype) * use_topk.to(dtype),
            "loss": seq_loss.detach(),
            "orm_advantage": torch.zeros_like(inv_len)
            if orm_advantages is None
            else orm_advantages.to(dtype),
            "reverse_kl": (train - teacher).sum(-1),
            "advantage": adv.sum(-1),
            "weight": w.sum(-1),
            "ratio_abs_dev": torch.where(m, (r - 1).abs(), zero).sum(-1),
            "discard_low": ((r < _col(eps_low, r)) & m).to(dtype).sum(-1),
            "discard_high": ((r > _col(eps_high, r)) & m).to(dtype).sum(-1),
            "topk_kl": topk_kl.sum(-1),
        }
        stats = torch.stack([columns[name] for name, _ in STATS], dim=-1)
        metrics = stats_to_means(stats.sum(dim=0))
        metrics["stats"] = stats
    return loss, metrics


def _dense_token_loss(
    train: Tensor,
    r: Tensor,
    w: Tensor,
    m: Tensor,
    est: Tensor,
    student_topk: Tensor,
    teacher_topk: Tensor,
    orm_advantages: Tensor | None,
    alpha: Scalar,
    eps_low: Scalar,
    eps_high: Scalar,
    correction: str | Tensor,
    tail: bool,
    distill_coef: Scalar,
) -> tuple[Tensor, Tensor]:
    """Per-token loss of the top-k estimators (`distill_coef * keep * KL - w * alpha *
    A_ORM * log pi`) on positions `m`, and the detached KL there (0 elsewhere)."""
    zero = torch.zeros((), dtype=train.dtype, device=train.device)
    m3 = m.unsqueeze(-1)
    s_k = torch.where(m3, student_topk.to(train.dtype), zero)
    t_k = torch.where(m3, teacher_topk.detach().to(train.dtype), zero)
    kl = torch.where(
        est[:, None] == 1,
        topk_reverse_kl(s_k, t_k, tail=tail),
        topk_forward_kl(s_k, t_k, tail=tail),
    )
    with torch.no_grad():
        corr = _codes(correction, CORRECTIONS, "correction", train)
        inside = (r >= _col(eps_low, r)) & (r <= _col(eps_high, r))
        keep = torch.where(m & ((corr != 1) | inside), 1.0, 0.0).to(train.dtype)
        keep = keep * _col(distill_coef, train)
        orm_term = torch.zeros_like(train)
        if orm_advantages is not None:
            orm_term = _col(alpha, train) * orm_advantages.to(train.dtype)[:, None]
    dense = keep * kl - (w * orm_term) * train
    return dense, torch.where(m, kl.detach(), zero)


# --------------------------------------------------------------------------------------
# statistics across micro-batches, ranks and domains


def group_stats(stats: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Sum per-sequence `stats` `[B, S]` into `[num_groups, S]` by `group_ids` `[B]` (e.g.
    the index of each sequence's domain in a sorted list that every rank shares)."""
    out = stats.new_zeros((num_groups, stats.shape[-1]))
    return out.index_add_(0, group_ids.to(stats.device, torch.long), stats)


def stats_to_means(sums: Tensor) -> dict[str, Tensor]:
    """Turn summed statistics `[..., len(STATS)]` (already reduced across micro-batches and
    ranks) into means: per-token ones divided by the token count, per-sequence ones by the
    sequence count (0 where the count is 0); counts are returned as they are."""
    out: dict[str, Tensor] = {}
    for i, (name, count) in enumerate(STATS):
        value = sums[..., i]
        if count:
            denom = sums[..., STAT_INDEX[count]]
            value = torch.where(denom > 0, value / denom.clamp(min=1e-30), torch.zeros_like(value))
        out[_MEAN_NAMES.get(name, name)] = value
    seqs = sums[..., STAT_INDEX["sequences"]]
    tokens = sums[..., STAT_INDEX["tokens"]]
    out["response_length"] = torch.where(seqs > 0, tokens / seqs.clamp(min=1e-30), tokens * 0)
    return out


# --------------------------------------------------------------------------------------
# per-domain settings


@dataclass
class SequenceSettings:
    """Loss settings of each sequence of a batch (`[B]` tensors), from `sequence_settings`."""

    alpha: Tensor
    distill_coef: Tensor
    eps_low: Tensor
    eps_high: Tensor
    correction: Tensor  # indices into CORRECTIONS
    estimator: Tensor  # indices into ESTIMATORS

    def kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for `mopd_loss`."""
        return {
            "alpha": self.alpha,
            "distill_coef": self.distill_coef,
            "eps_low": self.eps_low,
            "eps_high": self.eps_high,
            "correction": self.correction,
            "estimator": self.estimator,
        }


def sequence_settings(
    cfg: LossConfig,
    domains: Sequence[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SequenceSettings:
    """Per-sequence loss settings for a batch mixing domains, so that one `mopd_loss` call
    computes every sequence with its own domain's `alpha`, bounds, correction and estimator
    (`cfg.per_domain` overrides applied)."""
    per = {d: cfg.for_domain(d) for d in dict.fromkeys(domains)}
    rows = [per[d] for d in domains]

    def floats(name: str) -> Tensor:
        return torch.tensor([getattr(c, name) for c in rows], dtype=dtype, device=device)

    def codes(name: str, names: tuple[str, ...]) -> Tensor:
        values = [names.index(getattr(c, name)) for c in rows]
        return torch.tensor(values, dtype=torch.long, device=device)

    return SequenceSettings(
        alpha=floats("alpha"),
        distill_coef=floats("distill_coef"),
        eps_low=floats("eps_low"),
        eps_high=floats("eps_high"),
        correction=codes("correction", CORRECTIONS),
        estimator=codes("estimator", ESTIMATORS),
    )


# --------------------------------------------------------------------------------------
# vocabulary-parallel log-probs of chosen ids


def vocab_parallel_gather_logprobs(
    logits_shard: Tensor,
    token_ids: Tensor,
    tp_group: dist.ProcessGroup | None = None,
    inplace: bool = False,
    chunk_elements: int = 1 << 22,
    vocab_size: int | None = None,
) -> Tensor:
    """Log-softmax of vocabulary-sharded logits at chosen token ids, never gathering `V`.

    Args:
        logits_shard: `[..., V / tp]`, this rank's contiguous slice of the vocabulary
            (rank `k` of `tp_group` holds ids `[k * V/tp, (k + 1) * V/tp)`, as Megatron's
            vocabulary-parallel output layer does). The full logits when `tp_group` is None.
        token_ids: `[..., K]` global ids (e.g. the sampled token and the teacher's top-k).
        tp_group: the tensor-parallel group, or None.
        inplace: overwrite the logits' storage with their exponentials and then with their
            gradient, as Megatron's cross-entropy does: no `[..., V/tp]` buffer besides the
            logits themselves. The logits must not be read afterwards (an autograd node
            that saved them raises on backward). Needs float32/float64 contiguous logits;
            otherwise one float32 buffer is used.
        chunk_elements: rows are processed in chunks of about this many elements, so the
            subtract / exp / sum passes stay in cache.
        vocab_size: the real vocabulary when the logits carry Megatron's vocabulary padding
            (ids from `vocab_size` on): those columns get no probability. None: no padding.

    Returns `[..., K]` float32 log-probs (float64 for float64 logits), identical on every
    rank of the group. The normaliser uses an all-reduce of the max and of the sum of
    exponentials; each id is read on the rank that holds it and summed across the group.
    Backward gives each rank the gradient of its own shard (the loss is computed
    identically on all ranks, as in Megatron), so the all-reduces pass gradients through.
    """
    return _VocabParallelGather.apply(
        logits_shard, token_ids, tp_group, inplace, chunk_elements, vocab_size
    )


class _VocabParallelGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, group, inplace, chunk_elements, vocab_size):  # type: ignore[override]
        part = logits.shape[-1]
        rank = dist.get_rank(group) if group is not None else 0
        # columns from `real` on are vocabulary padding
        real = part if vocab_size is None else max(0, min(part, vocab_size - rank * part))
        dtype = _float_dtype(logits)
        flat = logits.reshape(-1, part)
        flat_ids = ids.reshape(flat.shape[0], -1).to(flat.device)
        own = inplace and logits.dtype == dtype and flat.data_ptr() == logits.data_ptr()
        with torch.no_grad():
            if real:
                top = flat[:, :real].max(dim=-1).values.to(dtype)
            else:
                top = torch.full((flat.shape[0],), -math.inf, dtype=dtype, device=flat.device)
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            local = flat_ids - rank * part
            inside = (local >= 0) & (local < part)
            local = local.clamp(0, part - 1)
            exps = flat if own else torch.empty(flat.shape, dtype=dtype, device=flat.device)
            both = torch.empty(
                flat.shape[0], flat_ids.shape[1] + 1, dtype=dtype, device=flat.device
            )
            rows = max(1, chunk_elements // max(part, 1))
            for i in range(0, flat.shape[0], rows):
                sl = slice(i, i + rows)
                chunk = torch.sub(flat[sl], top[sl, None], out=exps[sl])
                if real < part:
                    chunk[:, real:] = -math.inf
                both[sl, :-1] = torch.where(inside[sl], chunk.gather(-1, local[sl]), 0.0)
                both[sl, -1] = chunk.exp_().sum(dim=-1)
            if group is not None:
                dist.all_reduce(both, group=group)
            sum_exp = both[:, -1]
            out = both[:, :-1] - sum_exp.log()[:, None]
        # save the input itself when its storage holds the exponentials (a view made here
        # in no-grad mode may not be saved)
        ctx.save_for_backward(logits if own else exps, sum_exp, local, inside)
        ctx.logits_dtype = logits.dtype
        return out.reshape(ids.shape)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        exps, sum_exp, local, inside = ctx.saved_tensors
        exps = exps.reshape(sum_exp.shape[0], -1)
        g = grad_out.reshape(exps.shape[0], -1).to(exps.dtype)
        # d logp_k / d z_v = [v == id_k] - softmax_v  =>  grad = scatter(g) - softmax * sum(g)
        grad = exps.mul_((-g.sum(dim=-1) / sum_exp)[:, None])  # exps are not needed after this
        grad.scatter_add_(-1, local, torch.where(inside, g, 0.0))
        return (
            grad.to(ctx.logits_dtype).reshape(grad_out.shape[:-1] + (-1,)),
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------
# helpers


def _float_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; anything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ratio(train: Tensor, rollout: Tensor) -> Tensor:
    dtype = _float_dtype(train)
    return torch.exp(train.detach().to(dtype) - rollout.detach().to(dtype))


def _col(value: Scalar, like: Tensor) -> Tensor:
    """A float or `[B]` tensor as a `[B, 1]` column broadcastable against `[B, T]`."""
    if isinstance(value, Tensor):
        value = value.to(like.device, like.dtype)
        return value[:, None] if value.dim() == 1 else value
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _codes(value: str | Tensor, names: tuple[str, ...], what: str, like: Tensor) -> Tensor:
    """A name or `[B]` tensor of indices as a `[B, 1]` long tensor."""
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"{what}={value!r}: choose one of {', '.join(names)}")
        return torch.full((like.shape[0], 1), names.index(value), device=like.device)
    return value.to(like.device, torch.long).reshape(-1, 1)
