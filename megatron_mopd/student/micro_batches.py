"""Token-budget micro-batches: the step's sequences grouped by length under a token budget.

    groups = plan_token_budget([812, 90, 4000, 7000, 120], max_tokens=8192)
    # -> [[3], [2], [0, 4, 1]]: indices, longest first; each group costs
    #    len(group) * (its longest length) <= 8192 padded tokens
    count = agree_num_micro_batches(len(groups), dp_group)   # max over the DP group

With `train.max_tokens_per_microbatch > 0` each data-parallel rank sorts its share of the
step's sequences by length (longest first) and fills micro-batches greedily: a sequence
joins the current micro-batch while `rows * longest` (the padded tokens of the micro-batch,
its longest row rounded up to `pad_to_multiple_of`) stays within the budget; each
micro-batch is then padded to its own longest row only, not to the step's longest. A
sequence longer than the budget goes alone (with a warning, once per process).

The loss stays exact whatever the grouping: every sequence's term is divided by the
*global* number of sequences (`student.mopd_step.MopdLoss`) and the step sums over
micro-batches and DP ranks (`student.train_step`), so only which rows share a forward pass
changes, never the sum.

Every rank of the data-parallel group must run the same number of micro-batches: MoE
all-to-all (EP spans DP ranks), pipeline point-to-point and the DDP reduction are
collectives inside or after each forward. Ranks whose lengths give fewer micro-batches
append empty ones (one all-padding row of `pad_to_multiple_of` tokens, zero mask, zero
weight) up to the maximum, agreed by one all-reduce (`agree_num_micro_batches`).

Packed sequences (`train.pack_sequences`, Transformer Engine spec only; *untested here*:
these machines have no CUDA): `pack_micro_batch` lays a micro-batch's rows end to end in
one row with megatron-core's `PackedSeqParams` (THD layout, `cu_seqlens`), positions
restarting at 0 for each sequence, and `unpack_logits` puts the logits back into the
padded `[B, T, V / tp]` layout the loss functions read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
_WARNED_OVERSIZE = False


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def plan_token_budget(
    lengths: Sequence[int], max_tokens: int, pad_to_multiple_of: int = 1
) -> list[list[int]]:
    """Group the indices of `lengths` into micro-batches under a budget of padded tokens.

    Sorted by length (longest first, ties by index), filled greedily: a micro-batch whose
    first (longest) row has padded length L takes rows while `rows * L <= max_tokens`.
    A sequence whose padded length alone exceeds `max_tokens` forms a micro-batch of its
    own (logged once per process). Returns the groups in order, longest first.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        padded = round_up(max(int(lengths[i]), 1), pad_to_multiple_of)
        if groups and (len(groups[-1]) + 1) * longest <= max_tokens:
            groups[-1].append(i)
            continue
        if padded > max_tokens:
            _warn_oversize(padded, max_tokens)
        groups.append([i])
        longest = padded
    return groups


def _warn_oversize(padded: int, max_tokens: int) -> None:
    global _WARNED_OVERSIZE
    if not _WARNED_OVERSIZE:
        _WARNED_OVERSIZE = True
        log.warning(
            "a sequence of %d (padded) tokens exceeds train.max_tokens_per_microbatch=%d: "
            "it runs as a micro-batch of its own (warned once)",
            padded,
            max_tokens,
        )


def padded_tokens(groups: Sequence[Sequence[int]], lengths: Sequence[int], multiple: int = 1):
    """Tokens the forward passes of `groups` process, padding included (for the benches)."""
    return sum(
        len(g) * round_up(max(max(int(lengths[i]) for i in g), 1), multiple) for g in groups if g
    )


def agree_num_micro_batches(count: int, group: Any = None) -> int:
    """The largest `count` over `group` (one all-reduce; `count` itself without a group or
    at group size 1): every rank must run that many micro-batches."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return count
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    t = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


# --------------------------------------------------------------------------------------
# packed sequences (THD; Transformer Engine only; untested on these CPU machines)


def pack_micro_batch(mb: Any, pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, ...]:
    """`(tokens_1_N, position_ids_1_N, packed_seq_params)` for a `MicroBatch`: its rows
    (real lengths `lengths_B`) end to end in one row of `N` tokens (rounded up to
    `pad_to_multiple_of`, the padding a last pseudo-sequence), positions restarting at 0 for
    every sequence, and megatron-core's `PackedSeqParams(qkv_format="thd")` with the
    cumulative sequence lengths. Rows of length 0 (empty padding micro-batches) are kept as
    one token so every row has a slot. *Untested here* (THD attention needs Transformer
    Engine, i.e. CUDA)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [max(int(n), 1) for n in mb.lengths_B.tolist()]
    total = sum(lengths)
    padded = round_up(total, pad_to_multiple_of)
    seq_lens = lengths + ([padded - total] if padded > total else [])
    tokens = torch.cat(
        [mb.tokens_B_T[b, :n] for b, n in enumerate(lengths)]
        + [mb.tokens_B_T.new_zeros(padded - total)]
    )
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(seq_lens),
        max_seqlen_kv=max(seq_lens),
    )
    return tokens.unsqueeze(0), positions.unsqueeze(0), params


def unpack_logits(logits_1_N_V: torch.Tensor, mb: Any) -> torch.Tensor:
    """The packed logits `[1, N, V / tp]` of `pack_micro_batch` back in the micro-batch's
    padded layout `[B, T, V / tp]` (zeros after each row's end; differentiable)."""
    B, T = mb.tokens_B_T.shape
    lengths = [max(int(n), 1) for n in mb.lengths_B.tolist()]
    rows, start = [], 0
    for n in lengths:
        piece = logits_1_N_V[0, start : start + n]
        rows.append(torch.nn.functional.pad(piece, (0, 0, 0, T - n)))
        start += n
    return torch.stack(rows)
