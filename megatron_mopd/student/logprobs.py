"""Per-token log-probs of the student, from vocabulary-sharded logits.

    logprobs = forward_logprobs(chunks, [[1, 5, 7, 2], [1, 9, 2]], micro_batch_size=2)
    # -> [tensor of 3 values, tensor of 2 values]: log p(ids[i] | ids[:i]), i >= 1

Convention (as everywhere in the project): position i holds log p(token i | tokens < i).
Batched tensors keep the token axis: `token_logprobs_B_T[b, i]` is the log-prob of
`tokens_B_T[b, i]`, and column 0 (no context) is 0. `forward_logprobs` returns, per
sequence, the `len - 1` values of positions 1..len-1.

The vocabulary is never gathered: megatron's output layer leaves logits sharded over the
TP group (`[B, T, V / tp]`), and `vocab_parallel_token_logprobs` computes
`logit[target] - logsumexp(logits)` with two all-reduces (max, sum of exps) and a third
for the target's logit, with its own backward (softmax minus one-hot, per shard).

`MicroBatch` and `make_micro_batches` are the padded batches that `forward_logprobs` and
`student.train_step.train_step` both run through megatron's schedule.

Left out: top-k log-probs of the student (not needed by the sampled MOPD estimator) and
context parallelism.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------
# vocabulary-parallel log-probs


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[target] with the vocabulary sharded over `group`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Any) -> torch.Tensor:
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        vocab_local = logits.shape[-1]
        start = rank * vocab_local
        x = logits.float()
        max_ = x.max(dim=-1).values
        if world > 1:
            dist.all_reduce(max_, op=dist.ReduceOp.MAX, group=group)
        shifted = x - max_.unsqueeze(-1)  # a new tensor: `logits` itself is not modified
        local = target - start
        in_shard = (local >= 0) & (local < vocab_local)
        index = local.clamp(0, vocab_local - 1).unsqueeze(-1)
        picked = shifted.gather(-1, index).squeeze(-1) * in_shard
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if world > 1:
            both = torch.stack([picked, sum_exp])
            dist.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]
        logprobs = picked - sum_exp.log()
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, in_shard)
        ctx.input_dtype = logits.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, index, in_shard = ctx.saved_tensors
        grad_logits = softmax.mul_(-grad.unsqueeze(-1))  # softmax is not needed after this
        grad_logits.scatter_add_(-1, index, (grad * in_shard).unsqueeze(-1))
        return grad_logits.to(ctx.input_dtype), None, None


def vocab_parallel_token_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, tp_group: Any = None
) -> torch.Tensor:
    """log p(target) from logits sharded over the vocabulary (fp32 result, differentiable).

    `logits` is `[..., V / tp]`, this rank's contiguous slice of the vocabulary (rank r
    holds ids `r * V/tp ... (r+1) * V/tp - 1`, as megatron's output layer); `target_ids`
    is `[...]` with global ids. Every rank of `tp_group` gets the same result.
    """
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_ids {tuple(target_ids.shape)} disagree"
        )
    return _VocabParallelTokenLogprobs.apply(logits, target_ids, tp_group)


def token_logprobs_B_T(
    logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor, tp_group: Any = None
) -> torch.Tensor:
    """`[B, T]` log-probs of `tokens_B_T` given the logits the model produced for them
    (`logits[:, t]` predicts token t + 1); column 0 is 0."""
    logprobs = vocab_parallel_token_logprobs(logits_B_T_V[:, :-1], tokens_B_T[:, 1:], tp_group)
    return torch.nn.functional.pad(logprobs, (1, 0))


# --------------------------------------------------------------------------------------
# micro-batches


@dataclass
class MicroBatch:
    """Right-padded token sequences for one forward pass (tensors named by shape).

    `loss_mask_B_T[b, i]` says whether the log-prob of token i of row b counts in the
    loss (default: every real token but the first). `data` holds any further per-token
    (`[B, T]`) or per-row (`[B]`) tensors the loss needs (teacher log-probs, advantages,
    rollout log-probs, ...); `index_B` are the rows' positions in the caller's list.
    With the allgather MoE dispatcher, a batch may carry extra all-padding rows (length 0,
    mask 0) beyond `len(index_B)`: losses must give fully masked rows zero weight.
    """

    tokens_B_T: torch.Tensor
    lengths_B: torch.Tensor
    loss_mask_B_T: torch.Tensor
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    index_B: list[int] = field(default_factory=list)

    @property
    def position_ids_B_T(self) -> torch.Tensor:
        """0..T-1 on every row (sequences are right-padded)."""
        B, T = self.tokens_B_T.shape
        return torch.arange(T, device=self.tokens_B_T.device).unsqueeze(0).expand(B, T)


def make_micro_batches(
    sequences: Sequence[Sequence[int]],
    micro_batch_size: int,
    *,
    loss_masks: Sequence[Sequence[float]] | None = None,
    data: dict[str, Sequence[Sequence[float]] | Sequence[float]] | None = None,
    pad_to_multiple_of: int = 1,
    pad_id: int = 0,
    sort_by_length: bool = False,
) -> list[MicroBatch]:
    """Split `sequences` into micro-batches of at most `micro_batch_size` rows, each
    right-padded with `pad_id` to its longest row rounded up to `pad_to_multiple_of`
    (use the TP size: sequence parallelism splits the token axis over TP).

    `loss_masks[i]` (length `len(sequences[i])`) overrides the default mask of sequence i;
    `data[key][i]` is a per-token list (padded with 0) or a per-row number.
    `sort_by_length` groups similar lengths (less padding); `index_B` records the order.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    order = list(range(len(sequences)))
    if sort_by_length:
        order.sort(key=lambda i: -len(sequences[i]))
    batches = []
    for start in range(0, len(order), micro_batch_size):
        rows = order[start : start + micro_batch_size]
        lengths = [len(sequences[i]) for i in rows]
        if min(lengths) < 1:
            raise ValueError("make_micro_batches: empty sequence")
        T = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
        tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T)
        for b, i in enumerate(rows):
            tokens[b, : lengths[b]] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            if loss_masks is None:
                mask[b, 1 : lengths[b]] = 1.0
            else:
                if len(loss_masks[i]) != lengths[b]:
                    raise ValueError(
                        f"loss_masks[{i}] has {len(loss_masks[i])} values, "
                        f"sequence {i} has {lengths[b]} tokens"
                    )
                mask[b, : lengths[b]] = torch.as_tensor(list(loss_masks[i]), dtype=torch.float)
        extra = {}
        for key, values in (data or {}).items():
            first = values[rows[0]]
            if isinstance(first, int | float):
                extra[key] = torch.tensor([float(values[i]) for i in rows])
            else:
                t = torch.zeros(len(rows), T)
                for b, i in enumerate(rows):
                    t[b, : len(values[i])] = torch.as_tensor(list(values[i]), dtype=torch.float)
                extra[key] = t
        batches.append(MicroBatch(tokens, torch.tensor(lengths), mask, extra, rows))
    return batches


def pad_to_common_shape(micro_batches: list[MicroBatch]) -> list[MicroBatch]:
    """Pad every micro-batch to the largest `[B, T]` of all of them on all ranks (one
    all-reduce over the default group). Added rows and columns are masked padding (token
    0, loss mask 0, data 0); `index_B` and `lengths_B` keep describing the real rows.
    Needed when megatron runs without `variable_seq_lengths` (allgather dispatcher)."""
    shape = torch.tensor([max(mb.tokens_B_T.shape[d] for mb in micro_batches) for d in (0, 1)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        moved = shape.to(_comm_device(None))
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        shape = moved.cpu()
    B, T = int(shape[0]), int(shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            return torch.nn.functional.pad(t, (0, B - t.shape[0]))
        return torch.nn.functional.pad(t, (0, T - t.shape[1], 0, B - t.shape[0]))

    return [
        MicroBatch(
            tokens_B_T=pad(mb.tokens_B_T),
            lengths_B=pad(mb.lengths_B),
            loss_mask_B_T=pad(mb.loss_mask_B_T),
            data={k: pad(v) for k, v in mb.data.items()},
            index_B=mb.index_B,
        )
        for mb in micro_batches
    ]


# --------------------------------------------------------------------------------------
# running micro-batches through megatron's schedule


def unwrap_model(model: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def run_schedule(
    model_chunks: list[Any],
    micro_batches: list[MicroBatch],
    loss_func_for: Callable[[MicroBatch], Callable[[torch.Tensor], tuple]],
    *,
    forward_only: bool,
    before_forward: Callable[[MicroBatch], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `micro_batches` through megatron's `get_forward_backward_func` (so PP works).

    `loss_func_for(mb)` returns the schedule's loss function for micro-batch `mb`: it
    receives the output layer's vocabulary-sharded logits `[B, T, V / tp]` (last stage
    only) and returns megatron's `(loss, num_tokens, reduced_dict)`; `before_forward(mb)`,
    when given, runs just before each micro-batch's forward. Returns the
    `reduced_dict`s, one per micro-batch, on the last pipeline stage (`[]` elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    config = unwrap_model(model_chunks[0]).config
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel and any(mb.tokens_B_T.shape[1] % tp for mb in micro_batches):
        raise ValueError(
            f"sequence parallelism splits the token axis over TP={tp}: build the micro-batches "
            f"with make_micro_batches(..., pad_to_multiple_of={tp})"
        )
    if not config.variable_seq_lengths:
        micro_batches = pad_to_common_shape(micro_batches)
    device = next(unwrap_model(model_chunks[0]).parameters()).device
    batches = iter(micro_batches)

    def forward_step(data_iterator: Any, model: Any):
        mb = next(data_iterator)
        if before_forward is not None:
            before_forward(mb)
        tokens = mb.tokens_B_T.to(device)
        output = model(tokens, mb.position_ids_B_T.to(device), None)
        return output, loss_func_for(mb)

    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens_B_T.shape[1] for mb in micro_batches),
        micro_batch_size=max(mb.tokens_B_T.shape[0] for mb in micro_batches),
        forward_only=forward_only,
    )


@torch.no_grad()
def forward_logprobs(
    model_chunks: list[Any],
    sequences: Sequence[Sequence[int]],
    micro_batch_size: int,
) -> list[torch.Tensor]:
    """Log-probs of every token of every sequence but the first, on every rank.

    Runs the sequences (this DP rank's share; every rank of the model-parallel group
    passes the same list) through megatron's schedule in forward-only mode, so any
    TP/PP/EP layout works. Returns, in the order of `sequences`, one fp32 CPU tensor of
    `len(seq) - 1` values per sequence: `out[k][i - 1] = log p(seq[i] | seq[:i])`. The
    values are computed on the last pipeline stage and broadcast over the PP group, so
    every rank returns them.
    """
    inner = unwrap_model(model_chunks[0])
    tp_group, pp_group = inner.pg_collection.tp, inner.pg_collection.pp
    tp = dist.get_world_size(tp_group)
    batches = make_micro_batches(
        sequences, micro_batch_size, pad_to_multiple_of=tp, sort_by_length=True
    )

    def loss_func_for(mb: MicroBatch):
        def loss_func(logits: torch.Tensor):
            logprobs = token_logprobs_B_T(logits, mb.tokens_B_T.to(logits.device), tp_group)
            zero = logprobs.new_zeros(())
            return zero, torch.tensor(0, dtype=torch.int), {"logprobs_B_T": logprobs.cpu()}

        return loss_func

    modes = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    try:
        reduced = run_schedule(model_chunks, batches, loss_func_for, forward_only=True)
    finally:
        for chunk, mode in zip(model_chunks, modes):
            chunk.train(mode)

    total = sum(max(len(s) - 1, 0) for s in sequences)
    flat = torch.empty(total, dtype=torch.float32)
    if reduced:  # last stage: lay the values out in the caller's order
        out: list[torch.Tensor | None] = [None] * len(sequences)
        for mb, r in zip(batches, reduced):
            for b, i in enumerate(mb.index_B):
                out[i] = r["logprobs_B_T"][b, 1 : int(mb.lengths_B[b])]
        flat = torch.cat([t for t in out if t is not None]) if total else flat
    if dist.get_world_size(pp_group) > 1:
        last = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        moved = flat.to(_comm_device(pp_group))
        dist.broadcast(moved, src=last, group=pp_group)
        flat = moved.cpu()
    return list(torch.split(flat, [max(len(s) - 1, 0) for s in sequences]))


def _comm_device(group: Any) -> torch.device:
    backend = dist.get_backend(group) if group is not None else dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
