"""Assemble rollouts, teacher scores and rewards into the tensors the train step reads.

All `[B, T]` tensors are indexed by token position in `prompt + response`, with the
project's convention: a log-prob at position i is log p(tokens[i] | tokens[:i]); position
0 and prompt positions carry 0 and are excluded by `mask_B_T` (1 on response tokens,
the stop token included). Sequences are right-padded with `pad_id`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_mopd.types import Rollout, ScoreResult


@dataclass
class TrainBatch:
    """One global batch of scored rollouts (identical on every rank after broadcast)."""

    tokens_B_T: torch.Tensor  # long
    mask_B_T: torch.Tensor  # float 0/1, response tokens
    rollout_logprobs_B_T: torch.Tensor  # log mu
    teacher_logprobs_B_T: torch.Tensor  # log pi_teacher of the sampled tokens
    orm_advantages_B: torch.Tensor  # GRPO advantage per sequence (0 when unused)
    domain_ids_B: torch.Tensor  # long, index into `domains`
    domains: list[str]
    lengths_B: torch.Tensor  # long, prompt + response length
    teacher_topk_ids_B_T_K: torch.Tensor | None = None
    teacher_topk_logprobs_B_T_K: torch.Tensor | None = None
    # the rollout engine's MoE routing (routing replay): int32 [B, T, num_layers * top_k],
    # position i = the experts of token i; -1 where the engine fed no token (the last)
    routed_experts_B_T_X: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of sequences."""
        return self.tokens_B_T.shape[0]

    def select(self, index: torch.Tensor | slice) -> TrainBatch:
        """The sub-batch of the given sequences (for data-parallel and micro-batch splits)."""

        def pick(t):
            return None if t is None else t[index]

        return TrainBatch(
            tokens_B_T=pick(self.tokens_B_T),
            mask_B_T=pick(self.mask_B_T),
            rollout_logprobs_B_T=pick(self.rollout_logprobs_B_T),
            teacher_logprobs_B_T=pick(self.teacher_logprobs_B_T),
            orm_advantages_B=pick(self.orm_advantages_B),
            domain_ids_B=pick(self.domain_ids_B),
            domains=self.domains,
            lengths_B=pick(self.lengths_B),
            teacher_topk_ids_B_T_K=pick(self.teacher_topk_ids_B_T_K),
            teacher_topk_logprobs_B_T_K=pick(self.teacher_topk_logprobs_B_T_K),
            routed_experts_B_T_X=pick(self.routed_experts_B_T_X),
            extras=self.extras,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (for broadcasting)."""
        out = {
            k: getattr(self, k)
            for k in (
                "tokens_B_T",
                "mask_B_T",
                "rollout_logprobs_B_T",
                "teacher_logprobs_B_T",
                "orm_advantages_B",
                "domain_ids_B",
                "lengths_B",
                "teacher_topk_ids_B_T_K",
                "teacher_topk_logprobs_B_T_K",
                "routed_experts_B_T_X",
            )
        }
        return {k: v for k, v in out.items() if v is not None}


def build_train_batch(
    rollouts: list[Rollout],
    scores: list[ScoreResult],
    domains_per_seq: list[str],
    domains: list[str],
    orm_advantages: torch.Tensor | None = None,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
) -> TrainBatch:
    """Pack sequences (prompt + response) right-padded into one `TrainBatch`."""
    if not (len(rollouts) == len(scores) == len(domains_per_seq)):
        raise ValueError("rollouts, scores and domains must have the same length")
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    T = max(lengths)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    B = len(rollouts)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T)
    mu = torch.zeros(B, T)
    teacher = torch.zeros(B, T)
    has_topk = any(s.top_ids is not None for s in scores)
    k = max((s.top_ids.shape[-1] for s in scores if s.top_ids is not None), default=0)
    topk_ids = torch.zeros(B, T, k, dtype=torch.long) if has_topk else None
    topk_lp = torch.full((B, T, k), float("-inf")) if has_topk else None
    for i, (r, s) in enumerate(zip(rollouts, scores)):
        p, n = len(r.prompt_ids), len(r.response_ids)
        if len(r.rollout_logprobs) != n or len(s.logprobs) != n:
            raise ValueError(
                f"sequence {i}: {n} response tokens but {len(r.rollout_logprobs)} rollout "
                f"and {len(s.logprobs)} teacher log-probs"
            )
        tokens[i, : p + n] = torch.tensor(r.prompt_ids + r.response_ids)
        mask[i, p : p + n] = 1.0
        mu[i, p : p + n] = torch.tensor(r.rollout_logprobs, dtype=torch.float32)
        teacher[i, p : p + n] = torch.tensor(s.logprobs, dtype=torch.float32)
        if s.top_ids is not None and n:
            kk = s.top_ids.shape[-1]  # a teacher with a smaller k: the rest stays -inf
            topk_ids[i, p : p + n, :kk] = s.top_ids
            topk_lp[i, p : p + n, :kk] = s.top_logprobs
    index = {d: j for j, d in enumerate(domains)}
    routed = _routed_experts(rollouts, T)
    return TrainBatch(
        tokens_B_T=tokens,
        mask_B_T=mask,
        rollout_logprobs_B_T=mu,
        teacher_logprobs_B_T=teacher,
        orm_advantages_B=orm_advantages if orm_advantages is not None else torch.zeros(B),
        domain_ids_B=torch.tensor([index[d] for d in domains_per_seq], dtype=torch.long),
        domains=list(domains),
        lengths_B=torch.tensor(lengths, dtype=torch.long),
        teacher_topk_ids_B_T_K=topk_ids,
        teacher_topk_logprobs_B_T_K=topk_lp,
        routed_experts_B_T_X=routed,
    )


def _routed_experts(rollouts: list[Rollout], T: int) -> torch.Tensor | None:
    """`[B, T, X]` int32 of the rollouts' `routed_experts` (None unless all have them)."""
    if not rollouts or any(r.routed_experts is None for r in rollouts):
        return None
    flat = [
        torch.as_tensor(r.routed_experts).reshape(len(r.prompt_ids) + len(r.response_ids) - 1, -1)
        for r in rollouts
    ]
    widths = {f.shape[1] for f in flat}
    if len(widths) != 1:
        raise ValueError(f"rollouts disagree on the routed experts per token: {sorted(widths)}")
    out = torch.full((len(rollouts), T, widths.pop()), -1, dtype=torch.int32)
    for i, f in enumerate(flat):
        out[i, : f.shape[0]] = f.to(torch.int32)
    return out


def broadcast_batch(batch: TrainBatch | None, src: int = 0, group=None) -> TrainBatch:
    """Send rank `src`'s batch to every rank of `group` (CPU tensors over gloo/NCCL)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        assert batch is not None
        return batch
    holder = [None]
    if dist.get_rank() == src:
        holder = [batch]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]
