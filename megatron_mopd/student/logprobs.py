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

The vocabulary may carry Megatron's padding (`model.make_vocab_size_divisible_by`): ids
from `vocab_size` on are masked to -inf in every log-softmax (`real_columns`), so they get
no probability and no gradient. With `model.logits_chunk_tokens > 0` the output layer
returns the hidden states (`return_hidden_states`) and `OutputHead` computes the log-probs
over chunks of tokens, recomputing each chunk's logits in backward: the `[T, V]` logits
never exist whole. The loss functions of the schedule go through `output_head(chunks)`.

`MicroBatch` and `make_micro_batches` are the padded batches that `forward_logprobs` and
`student.train_step.train_step` both run through megatron's schedule.

Left out: top-k log-probs of the student (not needed by the sampled MOPD estimator) and
context parallelism.
"""

from __future__ import annotations

import math
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
    def forward(
        ctx, logits: torch.Tensor, target: torch.Tensor, group: Any, vocab_size: int | None
    ) -> torch.Tensor:
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        vocab_local = logits.shape[-1]
        start = rank * vocab_local
        real = real_columns(vocab_local, rank, vocab_size)
        x = logits.float()
        max_ = _row_max(x, real)
        if world > 1:
            dist.all_reduce(max_, op=dist.ReduceOp.MAX, group=group)
        shifted = x - max_.unsqueeze(-1)  # a new tensor: `logits` itself is not modified
        shifted[..., real:] = -math.inf  # padded vocabulary: no probability
        local = target - start
        in_shard = (local >= 0) & (local < vocab_local)
        index = local.clamp(0, vocab_local - 1).unsqueeze(-1)
        picked = torch.where(in_shard, shifted.gather(-1, index).squeeze(-1), 0.0)
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
        return grad_logits.to(ctx.input_dtype), None, None, None


def real_columns(vocab_local: int, rank: int, vocab_size: int | None) -> int:
    """How many of the `vocab_local` columns of TP rank `rank`'s shard are real tokens (the
    rest is Megatron's vocabulary padding, at the end of the padded vocabulary);
    `vocab_size` None: all of them."""
    if vocab_size is None:
        return vocab_local
    return max(0, min(vocab_local, vocab_size - rank * vocab_local))


def _row_max(x: torch.Tensor, real: int) -> torch.Tensor:
    """Max over the last axis's first `real` columns (-inf where there are none)."""
    if real == 0:
        return x.new_full(x.shape[:-1], -math.inf)
    return x[..., :real].max(dim=-1).values


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group: Any = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log p(target) from logits sharded over the vocabulary (fp32 result, differentiable).

    `logits` is `[..., V / tp]`, this rank's contiguous slice of the (padded) vocabulary
    (rank r holds ids `r * V/tp ... (r+1) * V/tp - 1`, as megatron's output layer);
    `target_ids` is `[...]` with global ids. `vocab_size`: the real vocabulary, ids from
    it on are padding and get no probability (None: no padding). Every rank of `tp_group`
    gets the same result.
    """
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_ids {tuple(target_ids.shape)} disagree"
        )
    return _VocabParallelTokenLogprobs.apply(logits, target_ids, tp_group, vocab_size)


def token_logprobs_B_T(
    logits_B_T_V: torch.Tensor,
    tokens_B_T: torch.Tensor,
    tp_group: Any = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """`[B, T]` log-probs of `tokens_B_T` given the logits the model produced for them
    (`logits[:, t]` predicts token t + 1); column 0 is 0. `vocab_size`: see
    `vocab_parallel_token_logprobs`."""
    logprobs = vocab_parallel_token_logprobs(
        logits_B_T_V[:, :-1], tokens_B_T[:, 1:], tp_group, vocab_size
    )
    return torch.nn.functional.pad(logprobs, (1, 0))


# --------------------------------------------------------------------------------------
# the output layer: whole logits, or chunks of tokens recomputed in backward


def return_hidden_states(output_layer: Any) -> None:
    """Make megatron's output layer (a `ColumnParallelLinear`) return its input instead of
    the logits: the final hidden states, with the layer's own input-side communication
    (the all-gather over the sequence under sequence parallelism, whose backward
    reduce-scatters; otherwise a copy whose backward all-reduces over TP). The schedule's
    loss function then computes the log-probs chunk by chunk (`OutputHead`) from the
    layer's weight; the weight's gradient reaches it (and DDP's `main_grad` hooks)
    through autograd as before. Parameter names and checkpoints are unchanged."""
    import types

    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    def forward(self, input_, weight=None, runtime_gather_output=None):
        group = self.tp_group
        if self.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(
                input_, tensor_parallel_output_grad=True, group=group
            )
        elif group is not None and dist.get_world_size(group) > 1:
            # megatron-core's copy_to_tensor_model_parallel_region, called here, left the
            # gradient un-reduced at TP2 without sequence parallelism (a lower grad norm
            # than TP1, tests/test_train_parity.py): our own copy, reduced in backward
            input_ = _CopyToTensorParallel.apply(input_, group)
        return input_, None

    output_layer.forward = types.MethodType(forward, output_layer)
    output_layer.mopd_returns_hidden = True


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward (a copy), all-reduce of the gradient over `group` in backward."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass
class OutputHead:
    """What the schedule's last stage turns into log-probs, and how.

    With `chunk_tokens == 0` the model's output is megatron's logits shard
    `[B, T, V_padded / tp]`; with `chunk_tokens > 0` it is the final hidden states
    `[B, T, H]` (`return_hidden_states`) and `weight` (this rank's `[V_padded / tp, H]`
    output-layer shard) projects them `chunk_tokens` tokens at a time: the `[T, V]`
    logits never exist whole, in forward or in backward (`_ChunkedOutputLogprobs`).
    Either way ids from `vocab_size` on (the padding) get no probability mass.
    """

    tp_group: Any
    vocab_size: int | None = None
    chunk_tokens: int = 0
    weight: torch.Tensor | None = None

    def gather_logprobs(self, output: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`[..., K]` fp32 log-probs at global `ids` `[..., K]` of the distributions in
        `output` (`[..., V_padded / tp]` logits or `[..., H]` hidden states, see above);
        differentiable, identical on every TP rank."""
        if self.chunk_tokens <= 0:
            from megatron_mopd.loss import vocab_parallel_gather_logprobs

            return vocab_parallel_gather_logprobs(
                output, ids, self.tp_group, inplace=False, vocab_size=self.vocab_size
            )
        flat = output.reshape(-1, output.shape[-1])
        out = _ChunkedOutputLogprobs.apply(
            flat,
            self.weight,
            ids.reshape(flat.shape[0], ids.shape[-1]),
            self.tp_group,
            self.vocab_size,
            self.chunk_tokens,
        )
        return out.reshape(ids.shape)

    def token_logprobs_B_T(self, output_B_T_X: torch.Tensor, tokens_B_T: torch.Tensor):
        """`[B, T]` log-probs of `tokens_B_T` (as `token_logprobs_B_T`; column 0 is 0)."""
        if self.chunk_tokens <= 0:
            return token_logprobs_B_T(output_B_T_X, tokens_B_T, self.tp_group, self.vocab_size)
        ids = tokens_B_T[:, 1:].unsqueeze(-1)
        logprobs = self.gather_logprobs(output_B_T_X[:, :-1], ids).squeeze(-1)
        return torch.nn.functional.pad(logprobs, (1, 0))


def output_head(model_chunks: list[Any]) -> OutputHead:
    """The `OutputHead` of the last model chunk (call on the last pipeline stage)."""
    inner = unwrap_model(model_chunks[-1])
    chunk = int(getattr(inner, "mopd_logits_chunk_tokens", 0))
    if not getattr(inner.output_layer, "mopd_returns_hidden", False):
        chunk = 0
    weight = None
    if chunk:
        weight = (
            inner.shared_embedding_or_output_weight()
            if inner.share_embeddings_and_output_weights
            else inner.output_layer.weight
        )
    return OutputHead(
        tp_group=inner.pg_collection.tp,
        vocab_size=getattr(inner, "mopd_vocab_size", None),
        chunk_tokens=chunk,
        weight=weight,
    )


def full_logits(
    model_chunks: list[Any], tokens_B_T: torch.Tensor, position_ids_B_T: torch.Tensor
) -> torch.Tensor:
    """`[B, T, V]` logits over the real vocabulary (padding dropped) of a single-stage TP1
    model, by plain autograd, whole: for references and tests, not for training."""
    out = model_chunks[0](tokens_B_T, position_ids_B_T, None)
    head = output_head(model_chunks)
    if head.chunk_tokens > 0:
        out = torch.matmul(out, head.weight.t())
    return out[..., : head.vocab_size] if head.vocab_size else out


class _ChunkedOutputLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[ids] over chunks of rows, vocabulary sharded over
    `group`. Saves only the hidden states, the weight and one log-normaliser per row; the
    backward recomputes each chunk's logits. The gradient of `hidden` is this rank's part
    (summed over TP by the output layer's input-side communication)."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, group, vocab_size, chunk):  # type: ignore[override]
        rank = 0 if group is None else dist.get_rank(group)
        world = 1 if group is None else dist.get_world_size(group)
        part = weight.shape[0]
        real = real_columns(part, rank, vocab_size)
        ids = ids.to(hidden.device)
        local = ids - rank * part
        inside = (local >= 0) & (local < part)
        local = local.clamp(0, part - 1)
        rows = hidden.shape[0]
        dtype = _compute_dtype(weight)
        out = torch.empty(rows, ids.shape[1], dtype=dtype, device=hidden.device)
        lse = torch.empty(rows, dtype=dtype, device=hidden.device)
        for s in range(0, rows, chunk):
            sl = slice(s, s + chunk)
            z = _chunk_logits(hidden[sl], weight, real)
            top = _row_max(z, part)
            if world > 1:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            z.sub_(top[:, None])
            both = torch.empty(z.shape[0], ids.shape[1] + 1, dtype=z.dtype, device=z.device)
            both[:, :-1] = torch.where(inside[sl], z.gather(-1, local[sl]), 0.0)
            both[:, -1] = z.exp_().sum(dim=-1)
            if world > 1:
                dist.all_reduce(both, group=group)
            log_sum = both[:, -1].log()
            out[sl] = both[:, :-1] - log_sum[:, None]
            lse[sl] = top + log_sum
            del z
        ctx.save_for_backward(hidden, weight, local, inside, lse)
        ctx.meta = (real, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, local, inside, lse = ctx.saved_tensors
        real, chunk = ctx.meta
        grad_hidden = torch.empty_like(hidden)
        dtype = _compute_dtype(weight)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        g_all = grad_out.to(dtype)
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            z = _chunk_logits(hidden[sl], weight, real)
            g = g_all[sl]
            # d logp_k / d z_v = [v == id_k] - softmax_v
            p = z.sub_(lse[sl, None]).exp_()
            grad_z = p.mul_(-g.sum(dim=-1, keepdim=True))
            grad_z.scatter_add_(-1, local[sl], torch.where(inside[sl], g, 0.0))
            grad_z = grad_z.to(weight.dtype)
            grad_hidden[sl] = grad_z @ weight
            grad_weight.addmm_(grad_z.t().to(dtype), hidden[sl].to(dtype))
            del z, p, grad_z
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The log-softmax's dtype: float64 for float64 weights, float32 otherwise."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, real: int) -> torch.Tensor:
    """`[n, V/tp]` logits of a chunk (float32, or float64), computed in the weight's dtype
    as megatron's output layer does (hidden states in another dtype, e.g. an fp32 final
    norm beside bf16 weights, are cast to it), padded columns set to -inf."""
    z = torch.matmul(hidden.to(weight.dtype), weight.t()).to(_compute_dtype(weight))
    if real < z.shape[-1]:
        z[:, real:] = -math.inf
    return z


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
            head = output_head(model_chunks)  # logits, or hidden states projected in chunks
            logprobs = head.token_logprobs_B_T(logits, mb.tokens_B_T.to(logits.device))
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
