"""One optimisation step of the student through Megatron's schedule, DDP and optimizer.

    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg.parallel)
    optimizer, scheduler = build_optimizer(chunks, cfg.train, cfg.parallel)
    batches = make_micro_batches(seqs, cfg.train.micro_batch_size, pad_to_multiple_of=tp)
    out = train_step(chunks, optimizer, batches, loss_fn, scheduler=scheduler)
    # out = {"loss": float, "grad_norm": float, "skipped": bool, "lr": float, **metrics}

Gradient contract (what `loss_fn` must return, and what the step does with it):

    loss_fn(token_logprobs_B_T, micro_batch) -> (loss, metrics)

`token_logprobs_B_T[b, i]` is log p(tokens[b, i] | tokens[b, :i]) (column 0 is 0) and
carries the gradient. The gradient applied is the gradient of the *sum* of `loss` over
all micro-batches of the step and over all data-parallel ranks: megatron does not divide
by the number of micro-batches nor by the DP size (`calculate_per_token_loss=True` with a
`finalize_model_grads` that ignores the token count; DDP's gradient scaling is 1). So a
caller that scales each sequence's term by 1 / (number of sequences in the *global*
batch, all micro-batches and DP ranks together) gets exactly the single-process gradient
of the mean over the global batch, whatever the layout. `next_token_loss` is the
token-mean next-token NLL written that way (used by the tests).

`metrics` is a dict of scalars; like the loss, each is summed over micro-batches and DP
ranks (pre-scale them the same way to report means). The returned `loss` and metrics are
these sums, available on every rank (computed on the last pipeline stage, reduced over
DP, broadcast over PP). `grad_norm` is the global norm before clipping. A step whose
gradients contain inf/NaN on any rank is skipped on every rank (no update, the LR
schedule does not advance) and reported with `skipped=True`.

Communication overlap (`parallel.overlap_grad_reduce`, `parallel.overlap_param_gather`,
`parallel.ddp_bucket_size`) goes into megatron's `DistributedDataParallelConfig` as is:
gradients are reduced bucket by bucket while the backward pass runs, and, with the
distributed optimizer, parameters are all-gathered bucket by bucket. MOPD reads the
weights right after every step (weight sync to the rollout engine, checkpoints), so the
parameter all-gather is completed at the end of `train_step` instead of overlapping the
next forward: `overlap_param_gather` changes where it waits, not the values (parity
tested on gloo, tests/test_micro_batches.py).

Left out: virtual pipeline stages, MoE auxiliary-loss scaling by the global batch (the aux
loss, if enabled, is summed like the main loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_mopd.config import ParallelConfig, TrainConfig
from megatron_mopd.student.logprobs import (
    MicroBatch,
    OutputHead,
    output_head,
    run_schedule,
    unwrap_model,
)

LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, Any]]]
LogprobsFn = Callable[[torch.Tensor, MicroBatch, OutputHead], torch.Tensor]


def wrap_ddp(model_chunks: list[Any], parallel_cfg: ParallelConfig) -> list[Any]:
    """Wrap each chunk in megatron's `DistributedDataParallel` (and, for bf16/fp16 params,
    in `Float16Module` first, as megatron's trainer does). Gradients are accumulated and
    reduced in fp32, summed (not averaged) over DP: see the module docstring."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = unwrap_model(model_chunks[0]).config
    ddp_config = DistributedDataParallelConfig(**ddp_config_kwargs(parallel_cfg))
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        wrapped.append(
            DistributedDataParallel(
                config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
            )
        )
    return wrapped


def ddp_config_kwargs(parallel_cfg: ParallelConfig) -> dict[str, Any]:
    """megatron's `DistributedDataParallelConfig` fields for `parallel_cfg`: fp32 gradient
    reduction, summed over DP (the gradient contract), and the overlap / bucket settings."""
    from megatron_mopd.errors import ConfigError

    if parallel_cfg.overlap_param_gather and not parallel_cfg.use_distributed_optimizer:
        raise ConfigError(
            "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true"
        )
    return dict(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        bucket_size=parallel_cfg.ddp_bucket_size,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )


def finish_param_sync(model_chunks: list[Any]) -> None:
    """Complete the distributed optimizer's parameter all-gather now (a no-op unless
    `parallel.overlap_param_gather`, where megatron would finish it in the next forward):
    afterwards every rank's parameters hold the updated values."""
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(
    model_chunks: list[Any], train_cfg: TrainConfig, parallel_cfg: ParallelConfig
) -> tuple[Any, Any]:
    """Megatron's Adam (`get_megatron_optimizer`; the distributed optimizer when
    `parallel.use_distributed_optimizer`) and its LR scheduler, for DDP-wrapped chunks.

    The schedule: linear warmup over `train.lr_warmup_steps` steps (step k, counted from
    1, uses `lr * k / warmup`), then `train.lr_decay_style` down to `train.min_lr` at
    `train.max_steps`. Also points the model config at this optimizer (loss scaling) and
    at the summing `finalize_model_grads` of the gradient contract.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = unwrap_model(model_chunks[0]).config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.clip_grad,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    warmup = max(0, train_cfg.lr_warmup_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=min(train_cfg.min_lr, train_cfg.lr),
        lr_warmup_steps=warmup,
        lr_decay_steps=max(train_cfg.max_steps, warmup + 1),
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=max(train_cfg.max_steps, 1),
        wd_incr_style="constant",
    )
    if warmup:
        scheduler.step(increment=1)  # megatron's step 0 has lr = 0: start at lr / warmup
    configure_schedule(model_chunks, optimizer)
    return optimizer, scheduler


def configure_schedule(model_chunks: list[Any], optimizer: Any) -> None:
    """Point the shared TransformerConfig at `optimizer` and the summing gradient
    finalisation (idempotent; `build_optimizer` and `train_step` call it)."""
    from megatron.core.distributed import finalize_model_grads

    config = unwrap_model(model_chunks[0]).config
    if not config.calculate_per_token_loss:
        raise RuntimeError(
            "the model config needs calculate_per_token_loss=True (build it with "
            "megatron_mopd.student.model.build_model)"
        )

    def finalize_summed(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        # Megatron would divide the gradients by the global token count here; the
        # gradient contract keeps them summed.
        finalize_model_grads(
            model, num_tokens=None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
        )

    config.finalize_model_grads_func = finalize_summed
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in model_chunks if hasattr(chunk, "no_sync")]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else (no_sync or None)


def train_step(
    model_chunks: list[Any],
    optimizer: Any,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn,
    *,
    scheduler: Any = None,
    logprobs_fn: LogprobsFn | None = None,
    pack_sequences: bool = False,
    before_forward: Callable[[MicroBatch], None] | None = None,
) -> dict[str, Any]:
    """Forward and backward over `micro_batches`, then one optimizer step.

    `pack_sequences` runs each micro-batch as one packed THD row (`train.pack_sequences`:
    Transformer Engine spec only, refused on the local spec; untested here).

    See the module docstring for the gradient contract of `loss_fn` and what is returned.
    Every rank of the layout calls this with its own DP share of the micro-batches (the
    same number of micro-batches on every DP rank); ranks of one model-parallel group pass
    the same ones. `logprobs_fn(output, micro_batch, head)` replaces the default (the
    sampled tokens' vocabulary-parallel log-probs) when the loss needs more, e.g. the
    log-probs of a teacher's top-k ids (`student.mopd_step.topk_logprobs`): `output` is
    the last stage's output (logits shard, or hidden states with chunked logits) and
    `head.gather_logprobs(output, ids)` turns it into log-probs (`logprobs.OutputHead`).
    `before_forward(micro_batch)` runs just before each micro-batch's forward (routing
    replay sets the routers' targets there, `student.routing_replay`).
    """
    inner = unwrap_model(model_chunks[0])
    pgs = inner.pg_collection
    configure_schedule(model_chunks, optimizer)
    for chunk in model_chunks:
        chunk.train()
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
    optimizer.zero_grad()

    def loss_func_for(mb: MicroBatch):
        def loss_func(logits: torch.Tensor):
            head = output_head(model_chunks)  # logits, or hidden states projected in chunks
            if logprobs_fn is None:
                logprobs = head.token_logprobs_B_T(logits, mb.tokens_B_T.to(logits.device))
            else:
                logprobs = logprobs_fn(logits, mb, head)
            loss, metrics = loss_fn(logprobs, mb)
            reduced = {"loss": float(loss.detach())}
            reduced.update({k: float(v) for k, v in metrics.items()})
            return loss, torch.tensor(0, dtype=torch.int), reduced

        return loss_func

    if pack_sequences:
        stored = run_packed_schedule(model_chunks, micro_batches, loss_func_for, before_forward)
    else:
        stored = run_schedule(
            model_chunks,
            micro_batches,
            loss_func_for,
            forward_only=False,
            before_forward=before_forward,
        )

    if _grads_nonfinite(model_chunks):
        optimizer.zero_grad()
        skipped, grad_norm = True, float("nan")
    else:
        success, grad_norm, _ = optimizer.step()
        skipped = not success
        if grad_norm is None and not skipped:
            grad_norm = optimizer.get_grad_norm()
        if not skipped and scheduler is not None:
            scheduler.step(increment=1)
    finish_param_sync(model_chunks)
    out = _reduce_stored(stored, pgs)
    out["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
    out["skipped"] = skipped
    out["lr"] = float(optimizer.param_groups[0]["lr"])
    return out


def uses_transformer_engine_spec(model: Any) -> bool:
    """Whether the model's layers are Transformer Engine modules."""
    return any("transformer_engine" in type(m).__module__ for m in unwrap_model(model).modules())


def run_packed_schedule(
    model_chunks: list[Any],
    micro_batches: list[MicroBatch],
    loss_func_for: Callable[[MicroBatch], Callable[[torch.Tensor], tuple]],
    before_forward: Callable[[MicroBatch], None] | None = None,
) -> list[dict[str, Any]]:
    """`run_schedule` (training) with every micro-batch packed into one THD row
    (`micro_batches.pack_micro_batch`, `PackedSeqParams`); the loss functions get the
    logits back in the padded `[B, T, V / tp]` layout. Needs the Transformer Engine spec
    (THD attention is a TE kernel): refused on the local spec. *Untested here* (no CUDA).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mopd.errors import ConfigError
    from megatron_mopd.student.micro_batches import pack_micro_batch, unpack_logits

    if not uses_transformer_engine_spec(model_chunks[0]):
        raise ConfigError(
            "train.pack_sequences=true needs the Transformer Engine layer spec (THD attention); "
            "this model uses the local spec (model.transformer_impl): set pack_sequences=false"
        )
    if not micro_batches:
        return []
    inner = unwrap_model(model_chunks[0])
    tp = inner.config.tensor_model_parallel_size
    device = next(inner.parameters()).device
    packed = [(mb, *pack_micro_batch(mb, tp)) for mb in micro_batches]
    batches = iter(packed)

    def forward_step(data_iterator: Any, model: Any):
        mb, tokens, positions, params = next(data_iterator)
        if before_forward is not None:
            before_forward(mb)
        for name in ("cu_seqlens_q", "cu_seqlens_kv"):
            setattr(params, name, getattr(params, name).to(device))
        output = model(tokens.to(device), positions.to(device), None, packed_seq_params=params)
        inner_loss = loss_func_for(mb)
        return output, lambda logits: inner_loss(unpack_logits(logits, mb))

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model_chunks,
        num_microbatches=len(packed),
        seq_length=max(p[1].shape[1] for p in packed),
        micro_batch_size=1,
        forward_only=False,
    )


def _grads_nonfinite(model_chunks: list[Any]) -> bool:
    """Whether any rank holds an inf/NaN gradient (one all-reduce over the world)."""
    bad = False
    for chunk in model_chunks:
        buffers = getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", [])
        if buffers:
            bad |= any(not bool(torch.isfinite(b.grad_data).all()) for b in buffers)
        else:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                bad |= g is not None and not bool(torch.isfinite(g).all())
    flag = torch.tensor([1.0 if bad else 0.0], device=_device(model_chunks))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _reduce_stored(stored: list[dict[str, float]], pgs: Any) -> dict[str, Any]:
    """Sum the per-micro-batch dicts (last stage), all-reduce over DP, broadcast over PP."""
    pp_size = dist.get_world_size(pgs.pp)
    is_last = dist.get_rank(pgs.pp) == pp_size - 1
    payload: list[Any] = [None]
    if is_last:
        keys = sorted({k for d in stored for k in d})
        sums = torch.tensor([sum(d.get(k, 0.0) for d in stored) for k in keys], dtype=torch.float64)
        if dist.get_world_size(pgs.dp) > 1 and keys:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if (dist.get_backend(pgs.dp) == "nccl")
                else torch.device("cpu")
            )
            sums = sums.to(device)
            dist.all_reduce(sums, group=pgs.dp)
        payload = [dict(zip(keys, sums.cpu().tolist()))]
    if pp_size > 1:
        dist.broadcast_object_list(
            payload, src=dist.get_global_rank(pgs.pp, pp_size - 1), group=pgs.pp
        )
    return dict(payload[0])


def _device(model_chunks: list[Any]) -> torch.device:
    return next(unwrap_model(model_chunks[0]).parameters()).device


def next_token_loss(global_num_tokens: int | float) -> LossFn:
    """A loss for tests: `-sum(mask * logprobs) / global_num_tokens` per micro-batch.

    `global_num_tokens` is the number of loss tokens in the whole step (all micro-batches,
    all DP ranks), so the summed gradient is that of the token-mean NLL. The metric
    `tokens` sums to the number of loss tokens seen.
    """
    if not global_num_tokens or global_num_tokens <= 0 or math.isnan(global_num_tokens):
        raise ValueError(f"global_num_tokens={global_num_tokens} must be > 0")

    def loss_fn(token_logprobs_B_T: torch.Tensor, mb: MicroBatch):
        mask = mb.loss_mask_B_T.to(token_logprobs_B_T.device, token_logprobs_B_T.dtype)
        loss = -(mask * token_logprobs_B_T).sum() / global_num_tokens
        return loss, {"tokens": mask.sum()}

    return loss_fn
