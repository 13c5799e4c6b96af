"""The MOPD loss inside Megatron's train step (`student.train_step`).

    out = mopd_train_step(chunks, optimizer, batch, cfg.loss, cfg.train.micro_batch_size,
                          scheduler=scheduler)
    # {"loss", "grad_norm", "skipped", "lr", "reverse_kl", "reverse_kl/<domain>", ...}

How the global batch becomes the single-process gradient, whatever the layout:

- `batch` is the global `TrainBatch`, identical on every rank. Each data-parallel rank
  takes a contiguous, balanced share of its sequences (`dp_share`), cut into the same
  number of micro-batches on every rank: by default `micro_batch_size` rows each, all of
  one shape `[R, T]`; with `train.max_tokens_per_microbatch > 0`, grouped by length under
  that token budget, each padded to its own longest row (`student.micro_batches`; the
  schedule runs with `variable_seq_lengths`, so pipeline stages exchange each shape), the
  count agreed over DP with empty micro-batches. Padding rows have an all-zero mask: they
  add nothing to the loss, the gradient or the statistics.
- Every sequence's term is divided by the *global* number of sequences (`batch.size`),
  and `train_step` sums (never averages) over micro-batches and DP ranks, so the step
  applies the gradient of `loss.mopd_loss` over the whole batch (per-sequence `1/|y|`
  normalisation included), as tests/test_mopd_parallel.py checks at TP2, PP2, EP2, DP2.
- Statistics: each micro-batch returns per-domain sums (`mopd/<domain>/<stat>`, every
  domain every time so the DP all-reduce lines up); `train_step` sums them over
  micro-batches and DP ranks and `summarize` turns them into means per domain
  (`reverse_kl/<domain>`) and over all domains (`reverse_kl`).
- Log-probs: with the sampled estimator, `train_step`'s own vocabulary-parallel log-prob
  of the sampled token. The top-k estimators also need the student's log-probs of the
  teacher's top-k ids, i.e. the logits shard: `train_step(..., logprobs_fn=topk_logprobs)`
  (one pass of `loss.vocab_parallel_gather_logprobs` over the sampled
  token and the K ids, backward written into the logits' own storage).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_mopd.batch import TrainBatch
from megatron_mopd.config import LossConfig
from megatron_mopd.errors import ConfigError
from megatron_mopd.loss import (
    STATS,
    group_stats,
    mopd_loss,
    sequence_settings,
    stats_to_means,
    vocab_parallel_gather_logprobs,
)
from megatron_mopd.student.logprobs import MicroBatch, OutputHead, unwrap_model
from megatron_mopd.student.micro_batches import (
    agree_num_micro_batches,
    plan_token_budget,
    round_up,
)
from megatron_mopd.student.train_step import train_step

PREFIX = "mopd"


# --------------------------------------------------------------------------------------
# splitting the global batch


def dp_share(num_sequences: int, dp_rank: int, dp_size: int) -> list[int]:
    """The global indices of the sequences data-parallel rank `dp_rank` trains on."""
    return torch.tensor_split(torch.arange(num_sequences), dp_size)[dp_rank].tolist()


def micro_batches_for_rank(
    batch: TrainBatch,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    pad_to_multiple_of: int = 1,
    pad_id: int = 0,
    *,
    max_tokens_per_microbatch: int = 0,
    dp_group: Any = None,
) -> list[MicroBatch]:
    """This DP rank's micro-batches of `batch`, the same number on every rank.

    Each holds `tokens_B_T`, `loss_mask_B_T` (the response mask) and in `data` the rollout
    and teacher log-probs, ORM advantages, domain ids, `valid_B` (0 on padding rows) and,
    when present, the teacher's top-k ids and log-probs (`[R, T, K]`).

    With `max_tokens_per_microbatch == 0`: `micro_batch_size` rows each, all of one shape,
    padded to the step's longest sequence. With a budget > 0: this rank's sequences grouped
    by length under that many padded tokens per micro-batch, each padded to its own longest
    row (`student.micro_batches`); the count is agreed over `dp_group` (all-reduce max,
    the ranks with fewer append empty micro-batches), so pass the DP group whenever the
    DP size is > 1.
    """
    if max_tokens_per_microbatch > 0:
        return _token_budget_micro_batches(
            batch, dp_rank, dp_size, max_tokens_per_microbatch, pad_to_multiple_of, pad_id,
            dp_group,
        )  # fmt: skip
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    per_rank = math.ceil(batch.size / dp_size)
    count = max(1, math.ceil(per_rank / micro_batch_size))
    rows = max(1, math.ceil(per_rank / count))
    length = -(-batch.tokens_B_T.shape[1] // pad_to_multiple_of) * pad_to_multiple_of
    mine = dp_share(batch.size, dp_rank, dp_size)
    return [
        _micro_batch(batch, mine[k * rows : (k + 1) * rows], rows, length, pad_id)
        for k in range(count)
    ]


def _token_budget_micro_batches(
    batch: TrainBatch,
    dp_rank: int,
    dp_size: int,
    max_tokens: int,
    multiple: int,
    pad_id: int,
    dp_group: Any,
) -> list[MicroBatch]:
    mine = dp_share(batch.size, dp_rank, dp_size)
    lengths = [int(batch.lengths_B[i]) for i in mine]
    groups = plan_token_budget(lengths, max_tokens, multiple)
    count = agree_num_micro_batches(len(groups), dp_group)
    out = []
    for g in groups:
        length = round_up(max(max(lengths[j] for j in g), 1), multiple)
        out.append(_micro_batch(batch, [mine[j] for j in g], len(g), length, pad_id))
    # empty micro-batches (one all-padding row, zero weight) up to the agreed count
    out += [_micro_batch(batch, [], 1, multiple, pad_id) for _ in range(count - len(groups))]
    return out


def _micro_batch(
    batch: TrainBatch, index: list[int], rows: int, length: int, pad_id: int
) -> MicroBatch:
    idx = torch.tensor(index, dtype=torch.long)

    def take(t: torch.Tensor | None, fill: float) -> torch.Tensor | None:
        if t is None:
            return None
        x = t[idx]
        if x.dim() >= 2:
            x = x[:, :length]  # a token-budget micro-batch: its own longest row only
        if x.dim() >= 2 and x.shape[1] < length:
            pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), fill)
            x = torch.cat([x, pad], dim=1)
        if x.shape[0] < rows:
            x = torch.cat([x, x.new_full((rows - x.shape[0], *x.shape[1:]), fill)])
        return x

    data = {
        "rollout_logprobs_B_T": take(batch.rollout_logprobs_B_T, 0.0),
        "teacher_logprobs_B_T": take(batch.teacher_logprobs_B_T, 0.0),
        "orm_advantages_B": take(batch.orm_advantages_B, 0.0),
        "domain_ids_B": take(batch.domain_ids_B, 0),
        "valid_B": take(torch.ones(batch.size), 0.0),
        "teacher_topk_ids_B_T_K": take(batch.teacher_topk_ids_B_T_K, 0),
        "teacher_topk_logprobs_B_T_K": take(batch.teacher_topk_logprobs_B_T_K, 0.0),
        "routed_experts_B_T_X": take(batch.routed_experts_B_T_X, -1),
    }
    return MicroBatch(
        tokens_B_T=take(batch.tokens_B_T, pad_id),
        lengths_B=take(batch.lengths_B, 1),
        loss_mask_B_T=take(batch.mask_B_T, 0.0),
        data={k: v for k, v in data.items() if v is not None},
        index_B=list(index),
    )


# --------------------------------------------------------------------------------------
# the loss function given to the train step


class MopdLoss:
    """`loss_fn(logprobs, micro_batch) -> (loss, metrics)` for `train_step`.

    `logprobs` is `[R, T]` (the sampled tokens' log-probs, `train_step`'s default) or
    `[R, T, 1 + K]` (`topk_logprobs`: the sampled token, then the teacher's top-k ids).
    Each sequence gets its domain's settings (`loss.sequence_settings`, vectorised), and
    its term is divided by `global_batch_size`. Metrics are per-domain sums of
    `loss.STATS`, named `mopd/<domain>/<stat>`.
    """

    def __init__(self, cfg: LossConfig, domains: Sequence[str], global_batch_size: int):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        self.cfg = cfg
        self.domains = list(domains)
        self.global_batch_size = global_batch_size
        self.settings = sequence_settings(cfg, self.domains)  # one row per domain

    def __call__(
        self, logprobs: torch.Tensor, mb: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = logprobs.device
        data = {k: v.to(device) for k, v in mb.data.items()}
        ids = data["domain_ids_B"]
        kwargs = {k: v.to(device)[ids] for k, v in self.settings.kwargs().items()}
        train, student_topk = (logprobs[..., 0], logprobs[..., 1:]) if logprobs.dim() == 3 else (
            logprobs, None
        )  # fmt: skip
        loss, metrics = mopd_loss(
            train,
            data["rollout_logprobs_B_T"],
            data["teacher_logprobs_B_T"],
            mb.loss_mask_B_T.to(device),
            data["orm_advantages_B"],
            global_batch_size=self.global_batch_size,
            student_topk_logprobs=student_topk,
            teacher_topk_logprobs=data.get("teacher_topk_logprobs_B_T_K"),
            topk_tail=self.cfg.topk_tail,
            **kwargs,
        )
        stats = metrics["stats"] * data["valid_B"].to(metrics["stats"].dtype)[:, None]
        sums = group_stats(stats, ids, len(self.domains))
        out = {
            f"{PREFIX}/{d}/{name}": sums[j, i]
            for j, d in enumerate(self.domains)
            for i, (name, _) in enumerate(STATS)
        }
        return loss, out


def summarize(out: dict[str, Any], domains: Sequence[str]) -> dict[str, Any]:
    """Replace the summed `mopd/<domain>/<stat>` entries of a step's output by means: per
    domain (`<name>/<domain>`, domains without sequences left out) and over all domains
    (`<name>`); other entries (`loss`, `grad_norm`, ...) are kept as they are."""
    sums = torch.zeros(len(domains), len(STATS), dtype=torch.float64)
    result = dict(out)
    for j, d in enumerate(domains):
        for i, (name, _) in enumerate(STATS):
            sums[j, i] = float(result.pop(f"{PREFIX}/{d}/{name}", 0.0))
    for name, value in stats_to_means(sums.sum(dim=0)).items():
        result.setdefault(name, float(value))
    per_domain = stats_to_means(sums)
    for j, d in enumerate(domains):
        if sums[j, 0] > 0:
            result.update({f"{name}/{d}": float(v[j]) for name, v in per_domain.items()})
    return result


# --------------------------------------------------------------------------------------
# the step


def topk_logprobs(output: torch.Tensor, mb: MicroBatch, head: OutputHead) -> torch.Tensor:
    """`[R, T, 1 + K]` log-probs, position t holding those of the distribution that
    predicts token t (column 0 is 0): the sampled token, then the teacher's top-k ids.

    One vocabulary-parallel pass: over the logits shard `[R, T, V / tp]`, the backward
    written into the logits' storage (the schedule does not read them afterwards); or,
    with chunked logits, over the hidden states chunk by chunk (`OutputHead`)."""
    tokens = mb.tokens_B_T.to(output.device)
    top = mb.data["teacher_topk_ids_B_T_K"].to(output.device)
    ids = torch.cat([tokens.unsqueeze(-1), top], dim=-1)
    # output[:, t] predicts token t + 1: gather position t + 1's ids at t
    if head.chunk_tokens > 0:
        return F.pad(head.gather_logprobs(output[:, :-1], ids[:, 1:]), (0, 0, 1, 0))
    ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # (last: unused)
    logprobs = vocab_parallel_gather_logprobs(
        output, ids, head.tp_group, inplace=True, vocab_size=head.vocab_size
    )
    return F.pad(logprobs[:, :-1], (0, 0, 1, 0))


def needs_topk(cfg: LossConfig, batch: TrainBatch) -> bool:
    """Whether a domain present in `batch` uses a top-k estimator."""
    present = sorted({int(i) for i in batch.domain_ids_B.tolist()})
    return any(cfg.for_domain(batch.domains[i]).estimator != "sampled" for i in present)


def mopd_train_step(
    model_chunks: list[Any],
    optimizer: Any,
    batch: TrainBatch,
    cfg: LossConfig,
    micro_batch_size: int,
    *,
    scheduler: Any = None,
    pad_id: int = 0,
    max_tokens_per_microbatch: int = 0,
    pack_sequences: bool = False,
) -> dict[str, Any]:
    """One MOPD optimizer step over the global `batch` (the same on every rank).

    `max_tokens_per_microbatch > 0` (`train.max_tokens_per_microbatch`) replaces the fixed
    `micro_batch_size` by token-budget micro-batches (`micro_batches_for_rank`);
    `pack_sequences` (`train.pack_sequences`, Transformer Engine only, untested) runs each
    of them packed in one THD row. Returns `train_step`'s output (`loss`, `grad_norm`,
    `skipped`, `lr`) with the MOPD statistics as means over all domains and per domain
    (see `summarize`). When the batch carries the rollout engine's routed experts:
    `routing_mismatch_frac`, the fraction of (token, MoE layer) pairs the student routed
    differently (0 under `loss.routing_replay`, which replays them: `student.routing_replay`).
    """
    pgs = unwrap_model(model_chunks[0]).pg_collection
    micro_batches = micro_batches_for_rank(
        batch,
        dist.get_rank(pgs.dp),
        dist.get_world_size(pgs.dp),
        micro_batch_size,
        pad_to_multiple_of=dist.get_world_size(pgs.tp),
        pad_id=pad_id,
        max_tokens_per_microbatch=max_tokens_per_microbatch,
        dp_group=pgs.dp,
    )
    loss_fn = MopdLoss(cfg, batch.domains, batch.size)
    # routing replay (R3) / routing comparison, when the rollouts carry routed experts
    replay = _routing_replay(model_chunks, batch, cfg)
    hook = replay.set_micro_batch if replay is not None else None
    with replay if replay is not None else contextlib.nullcontext():
        out = _train(
            model_chunks,
            optimizer,
            micro_batches,
            loss_fn,
            cfg,
            batch,
            scheduler,
            hook,
            pack_sequences,
        )
    if replay is not None:
        differ, compared = replay.mismatch()
        if compared:
            out["routing_mismatch_frac"] = differ / compared
    return summarize(out, batch.domains)


def _routing_replay(model_chunks: list[Any], batch: TrainBatch, cfg: LossConfig):
    """A `RoutingReplay` when the batch carries routed experts (None otherwise);
    `loss.routing_replay` without them, or without MoE routers, is a config error."""
    from megatron_mopd.student.routing_replay import RoutingReplay, moe_routers

    if batch.routed_experts_B_T_X is None:
        if cfg.routing_replay:
            raise ConfigError(
                "loss.routing_replay=true, but the rollout engine returned no routed experts "
                "(SGLang servers need --enable-return-routed-experts)"
            )
        return None
    if not moe_routers(model_chunks):
        if cfg.routing_replay:
            raise ConfigError("loss.routing_replay=true needs an MoE student (no MoE router)")
        return None
    return RoutingReplay(model_chunks, replay=cfg.routing_replay)


def _train(
    model_chunks,
    optimizer,
    micro_batches,
    loss_fn,
    cfg,
    batch,
    scheduler,
    before_forward,
    pack_sequences,
):
    if needs_topk(cfg, batch):
        if batch.teacher_topk_ids_B_T_K is None or batch.teacher_topk_logprobs_B_T_K is None:
            raise ConfigError(
                "loss.estimator (or a loss.per_domain override) is a top-k estimator but the "
                "teachers returned no top-k log-probs: set teachers.<name>.top_k > 0"
            )
        return train_step(
            model_chunks,
            optimizer,
            micro_batches,
            loss_fn,
            scheduler=scheduler,
            logprobs_fn=topk_logprobs,
            pack_sequences=pack_sequences,
            before_forward=before_forward,
        )
    return train_step(
        model_chunks,
        optimizer,
        micro_batches,
        loss_fn,
        scheduler=scheduler,
        pack_sequences=pack_sequences,
        before_forward=before_forward,
    )
