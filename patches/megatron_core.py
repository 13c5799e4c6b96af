"""CPU patches for megatron-core 0.16.1 (applied only when CUDA is absent).

    from megatron_mopd.patches import megatron_core
    megatron_core.apply()      # idempotent; a no-op (returns False) when CUDA is available

megatron-core assumes a GPU in a few dozen places. Every patch is listed in `PATCHES`
below (name, upstream functions, the megatron-core version it was written for, why).
Before anything is changed, `apply()` checks `megatron.core.__version__` and the
signature of every upstream function a patch touches against the one recorded here
(`_RECORDED_SIGNATURES`), and raises `MegatronPatchError` on any difference: a new
megatron-core release must be re-read before these patches are trusted with it.
`revert()` undoes everything (tests use it).

How the patches work, from the least to the most invasive:

- `cpu_torch_namespace`: most CUDA assumptions are calls such as
  `torch.cuda.current_device()`, `torch.cuda.Stream()`, `torch.cuda.synchronize()` or
  `torch.zeros(..., device="cuda")` written inside megatron functions. Instead of copying
  those (often long) functions, the name `torch` inside each listed megatron module is
  rebound to a view of `torch` whose `cuda` namespace places tensors on the CPU and whose
  streams/events are no-ops, and whose tensor factories map `device="cuda"` to the CPU.
  Nothing outside those modules sees the view; the view's attributes are the real torch
  objects (a snapshot of `torch.__dict__`), so the hot path costs nothing. A global
  `TorchFunctionMode` doing the same costs 10-20% of a step (`tools/bench_student.py`
  measures it); this costs ~0.
- Small functions with CUDA-only logic are replaced by our own CPU versions (RNG
  tracker, split sizes for all-to-all, uneven gather/scatter under gloo, the torch norm
  under sequence parallelism).
- `cuda_tensor_names`: a few functions test `param.type() == 'torch.cuda.FloatTensor'`
  or call `tensor.cuda()`; they run inside a context in which `Tensor.type()` names CPU
  tensors as their CUDA counterparts and `Tensor.cuda()` is the identity (a class-level
  override for the duration of those calls only; megatron calls them from one thread).

Left out: CUDA graphs, fused kernels (apex/TE), Megatron-FSDP, inference engines,
activation offloading, MTP, hybrid context parallelism, `tensor_parallel.data` broadcasts:
this project does not call them on CPU, so they keep their CUDA assumptions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

MEGATRON_CORE_VERSION = "0.16.1"

_MC = "megatron.core"


class MegatronPatchError(RuntimeError):
    """megatron-core is not the version (or the code) these patches were written for."""


@dataclass(frozen=True)
class Patch:
    """One CPU patch: what it changes upstream, for which version, and why."""

    name: str
    targets: tuple[str, ...]  # "module:Qualified.name" of every upstream function relied on
    why: str
    install: str  # name of the function in this module that installs it
    version: str = MEGATRON_CORE_VERSION


# --------------------------------------------------------------------------------------
# THE table of patches

PATCHES: tuple[Patch, ...] = (
    Patch(
        name="rng_tracker",
        targets=(
            f"{_MC}.tensor_parallel.random:_get_cuda_rng_state",
            f"{_MC}.tensor_parallel.random:_set_cuda_rng_state",
            f"{_MC}.tensor_parallel.random:CudaRNGStatesTracker.add",
            f"{_MC}.tensor_parallel.random:CudaRNGStatesTracker.fork",
        ),
        why="the RNG tracker reads and writes CUDA generators; on CPU the tracked states "
        "are states of the CPU default generator (forked the same way)",
        install="_install_rng_tracker",
    ),
    Patch(
        name="cpu_torch_namespace",
        targets=tuple(
            f"{_MC}.{m}:{f}"
            for m, fs in (
                # module -> the functions in it that use torch.cuda / device="cuda"
                ("parallel_state", ("initialize_model_parallel", "update_pg_timeout")),
                (
                    "utils",
                    (
                        "GlobalMemoryBuffer.get_tensor",
                        "local_multi_tensor_l2_norm",
                        "nvtx_range_push",
                        "nvtx_range_pop",
                    ),
                ),
                (
                    "tensor_parallel.layers",
                    (
                        "VocabParallelEmbedding.__init__",
                        "ColumnParallelLinear.__init__",
                        "RowParallelLinear.__init__",
                        "LinearWithGradAccumulationAndAsyncCommunication.backward",
                    ),
                ),
                (
                    "tensor_parallel.mappings",
                    (
                        "_gather_along_last_dim",
                        "_gather_along_first_dim",
                        "_reduce_scatter_along_first_dim",
                        "_AllToAll.forward",
                    ),
                ),
                (
                    "tensor_parallel.utils",
                    (
                        "split_tensor_into_1d_equal_chunks",
                        "gather_split_1d_tensor",
                    ),
                ),
                (
                    "transformer.utils",
                    (
                        "get_default_causal_mask",
                        "get_sliding_window_causal_mask",
                    ),
                ),
                ("transformer.attention", ("Attention._allocate_memory",)),
                ("transformer.dot_product_attention", ("DotProductAttention.__init__",)),
                ("transformer.transformer_layer", ("TransformerLayer.get_layer_static_inputs",)),
                ("transformer.module", ("GraphableMegatronModule.get_layer_static_inputs",)),
                ("transformer.mlp", ("apply_swiglu_sharded_factory",)),
                ("transformer.moe.router", ("Router.gating", "TopKRouter.__init__")),
                ("transformer.moe.experts", ("GroupedMLP.__init__",)),
                ("transformer.moe.moe_utils", ("track_moe_metrics", "maybe_move_tensor_to_cpu")),
                (
                    "transformer.moe.shared_experts",
                    (
                        "SharedExpertMLP.__init__",
                        "SharedExpertMLP.get_output",
                    ),
                ),
                (
                    "transformer.moe.token_dispatcher",
                    (
                        "MoEAlltoAllTokenDispatcher.__init__",
                        "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
                    ),
                ),
                ("models.gpt.gpt_model", ("GPTModel._preprocess",)),
                (
                    "models.common.embeddings.rotary_pos_embedding",
                    (
                        "RotaryEmbedding.__init__",
                        "RotaryEmbedding.get_emb",
                    ),
                ),
                (
                    "pipeline_parallel.schedules",
                    (
                        "forward_backward_no_pipelining",
                        "forward_backward_pipelining_without_interleaving",
                        "forward_backward_pipelining_with_interleaving",
                    ),
                ),
                (
                    "pipeline_parallel.p2p_communication",
                    (
                        "P2PCommunicator._communicate_shapes",
                        "P2PCommunicator._communicate",
                    ),
                ),
                ("distributed.distributed_data_parallel", ("DistributedDataParallel.__init__",)),
                # the torch_dist save: a synchronize and flags built on the current device
                (
                    "dist_checkpointing.strategies.filesystem_async",
                    ("FileSystemWriterAsync.preload_tensors",),
                ),
                (
                    "dist_checkpointing.strategies.state_dict_saver",
                    ("save_state_dict_async_finalize", "verify_global_md_reuse"),
                ),
                (
                    "distributed.param_and_grad_buffer",
                    (
                        "_ParamAndGradBucketGroup.start_grad_sync",
                        "_ParamAndGradBucketGroup.finish_grad_sync",
                        "_ParamAndGradBuffer.__init__",
                    ),
                ),
                (
                    "optimizer.optimizer",
                    (
                        "MixedPrecisionOptimizer.__init__",
                        "Float16OptimizerWithFloat16Params.__init__",
                        "FP32Optimizer.__init__",
                        "ChainedOptimizer.get_loss_scale",
                    ),
                ),
                (
                    "optimizer.distrib_optimizer",
                    (
                        "DistributedOptimizer.__init__",
                        "DistributedOptimizer.load_state_dict",
                        "DistributedOptimizer.get_parameter_state_dp_zero",
                    ),
                ),
                (
                    "optimizer.clip_grads",
                    (
                        "get_grad_norm_fp32",
                        "clip_grad_by_total_norm_fp32",
                        "count_zeros_fp32",
                    ),
                ),
                (
                    "optimizer.grad_scaler",
                    (
                        "MegatronGradScaler.__init__",
                        "DynamicGradScaler.__init__",
                    ),
                ),
                (
                    "rerun_state_machine",
                    (
                        "RerunStateMachine.validate_result",
                        "RerunStateMachine._reduce_any",
                    ),
                ),
            )
            for f in fs
        ),
        why="torch.cuda.current_device() placements, torch.cuda streams/events/synchronize "
        "(p2p, DDP, MoE dispatcher, torch_dist checkpoint save) and device='cuda' literals "
        "(causal mask, schedules, optimizer, grad clipping, checkpoint flags); inside these "
        "modules only, `torch` is a CPU view",
        install="_install_cpu_torch_namespace",
    ),
    Patch(
        name="alltoall_split_sizes",
        targets=(f"{_MC}.transformer.moe.moe_utils:maybe_move_tensor_to_cpu",),
        why="the all-to-all dispatcher converts its split sizes to numpy only for CUDA "
        "tensors; gloo's all_to_all_single then gets tensors and raises TypeError",
        install="_install_alltoall_split_sizes",
    ),
    Patch(
        name="uneven_gather_scatter",
        targets=(
            f"{_MC}.tensor_parallel.mappings:_gather_along_first_dim",
            f"{_MC}.tensor_parallel.mappings:_reduce_scatter_along_first_dim",
        ),
        why="with ETP>1 the dispatchers all-gather / reduce-scatter uneven splits, which "
        "only NCCL supports (gloo: 'invalid tensor size'): pad to equal sizes / all-reduce "
        "and slice",
        install="_install_uneven_gather_scatter",
    ),
    Patch(
        name="sequence_parallel_norm",
        targets=(f"{_MC}.transformer.torch_norm:WrappedTorchNorm.__new__",),
        why="MoE with TP needs sequence parallelism, but the local (torch) norm asserts it "
        "is off; the patched norm marks its parameters `sequence_parallel` so "
        "finalize_model_grads all-reduces their gradients over TP",
        install="_install_sequence_parallel_norm",
    ),
    Patch(
        name="te_general_gemm",
        targets=(f"{_MC}.transformer.moe.moe_utils:RouterGatingLinearFunction.forward",),
        why="0.16.1 only: `te_general_gemm` is undefined when Transformer Engine is absent "
        "(NameError in the router's gating linear)",
        install="_install_te_general_gemm",
    ),
    Patch(
        name="cuda_tensor_names",
        targets=(
            f"{_MC}.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
            f"{_MC}.optimizer.distrib_optimizer:"
            "DistributedOptimizer._build_model_and_main_param_groups",
            f"{_MC}.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
            f"{_MC}.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
            f"{_MC}.models.common.language_module.language_module:"
            "LanguageModule.setup_embeddings_and_output_layer",
        ),
        why="these test `param.type() == 'torch.cuda.FloatTensor'` (distributed optimizer, "
        "grad clipping, fp16/bf16 optimizer) or call `tensor.cuda()` (tied embeddings "
        "with PP); they run with CPU tensors named as CUDA ones",
        install="_install_cuda_tensor_names",
    ),
)


# Normalised signatures of every target, as found in megatron-core 0.16.1 (see
# `_signature`: annotations dropped, non-literal defaults shown as `...`).
_RECORDED_SIGNATURES: dict[str, str] = {
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state": "(device='cuda', clone=False, graph_safe=False)",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state": "(new_state, device=-1, graph_safe=False)",
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add": "(self, name, seed)",
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork": "(self, name='model-parallel-rng')",
    "megatron.core.parallel_state:initialize_model_parallel": "(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, pipeline_model_parallel_comm_backend=None, use_sharp=False, context_parallel_size=1, hierarchical_context_parallel_sizes=None, hybrid_context_parallel=False, expert_model_parallel_size=1, num_distributed_optimizer_instances=1, expert_tensor_parallel_size=None, nccl_communicator_config_path=None, distributed_timeout_minutes=30, order='tp-cp-ep-dp-pp', get_embedding_ranks=None, get_position_embedding_ranks=None, create_gloo_process_groups=True, high_priority_stream_groups=None, sharp_enabled_group=None, create_all_gather_group=False)",
    "megatron.core.parallel_state:update_pg_timeout": "(timeout, pg=None)",
    "megatron.core.utils:GlobalMemoryBuffer.get_tensor": "(self, tensor_shape, dtype, name, mem_alloc_context=None)",
    "megatron.core.utils:local_multi_tensor_l2_norm": "(chunk_size, noop_flag, tensor_lists, per_tensor, *args)",
    "megatron.core.utils:nvtx_range_push": "(msg=None, suffix=None)",
    "megatron.core.utils:nvtx_range_pop": "(msg=None, suffix=None)",
    "megatron.core.tensor_parallel.layers:VocabParallelEmbedding.__init__": "(self, num_embeddings, embedding_dim, *, init_method, reduce_scatter_embeddings=False, config, tp_group=None)",
    "megatron.core.tensor_parallel.layers:ColumnParallelLinear.__init__": "(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False, stride=1, keep_master_weight_for_test=False, skip_bias_add=False, skip_weight_param_allocation=False, embedding_activation_buffer=None, grad_output_buffer=None, is_expert=False, tp_comm_buffer_name=None, disable_grad_reduce=False, tp_group=None)",
    "megatron.core.tensor_parallel.layers:RowParallelLinear.__init__": "(self, input_size, output_size, *, config, init_method, bias, input_is_parallel, skip_bias_add, stride=1, keep_master_weight_for_test=False, is_expert=False, tp_comm_buffer_name=None, tp_group=None)",
    "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward": "(ctx, grad_output)",
    "megatron.core.tensor_parallel.mappings:_gather_along_last_dim": "(input_, group)",
    "megatron.core.tensor_parallel.mappings:_gather_along_first_dim": "(input_, group, output_split_sizes=None, use_global_buffer=False)",
    "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim": "(input_, group, input_split_sizes=None, use_global_buffer=False)",
    "megatron.core.tensor_parallel.mappings:_AllToAll.forward": "(ctx, group, input, output_split_sizes, input_split_sizes)",
    "megatron.core.tensor_parallel.utils:split_tensor_into_1d_equal_chunks": "(tensor, new_buffer=False, tp_group=None)",
    "megatron.core.tensor_parallel.utils:gather_split_1d_tensor": "(tensor, tp_group=None)",
    "megatron.core.transformer.utils:get_default_causal_mask": "(sq)",
    "megatron.core.transformer.utils:get_sliding_window_causal_mask": "(sq, skv, window_size)",
    "megatron.core.transformer.attention:Attention._allocate_memory": "(self, inference_max_sequence_length, batch_size, dim, dtype)",
    "megatron.core.transformer.dot_product_attention:DotProductAttention.__init__": "(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None)",
    "megatron.core.transformer.transformer_layer:TransformerLayer.get_layer_static_inputs": "(self, seq_length, micro_batch_size)",
    "megatron.core.transformer.module:GraphableMegatronModule.get_layer_static_inputs": "(self, seq_length, micro_batch_size)",
    "megatron.core.transformer.mlp:apply_swiglu_sharded_factory": "(original_sh_ten, sharded_offsets, singleton_local_shards=False)",
    "megatron.core.transformer.moe.router:Router.gating": "(self, input)",
    "megatron.core.transformer.moe.router:TopKRouter.__init__": "(self, config, pg_collection=None)",
    "megatron.core.transformer.moe.experts:GroupedMLP.__init__": "(self, num_local_experts, config, pg_collection=None)",
    "megatron.core.transformer.moe.moe_utils:track_moe_metrics": "(loss_scale, iteration, writer=None, wandb_writer=None, total_loss_dict=None, per_layer_logging=False, force_initialize=False, track_names=None, num_layers=None, moe_layer_freq=None, mtp_num_layers=None, pg_collection=None)",
    "megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu": "(tensor, as_numpy=False, record_stream=False)",
    "megatron.core.transformer.moe.shared_experts:SharedExpertMLP.__init__": "(self, config, submodules, gate, pg_collection=None)",
    "megatron.core.transformer.moe.shared_experts:SharedExpertMLP.get_output": "(self)",
    "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.__init__": "(self, num_local_experts, local_expert_indices, config, pg_collection=None)",
    "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize": "(self, point, tokens_per_expert=None)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync.preload_tensors": "(write_buckets, non_blocking=True)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver:save_state_dict_async_finalize": "(storage_writer, global_metadata, dist_wrapper)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver:verify_global_md_reuse": "(loaded_all_plans, local_plan, rank, dist_wrapper)",
    "megatron.core.models.gpt.gpt_model:GPTModel._preprocess": "(self, input_ids, position_ids, decoder_input=None, inference_context=None, packed_seq_params=None, padding_mask=None)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding.__init__": "(self, kv_channels, rotary_percent, rotary_interleaved=False, seq_len_interpolation_factor=None, rotary_base=10000, rope_scaling=False, rope_scaling_factor=8.0, use_cpu_initialization=False, cp_group=None)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding.get_emb": "(self, max_seq_len, offset=0)",
    "megatron.core.pipeline_parallel.schedules:forward_backward_no_pipelining": "(*, forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size, decoder_seq_length=None, forward_only=False, collect_non_loss_data=False, first_val_step=None, adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None, force_all_reduce=False)",
    "megatron.core.pipeline_parallel.schedules:forward_backward_pipelining_without_interleaving": "(*, forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size, decoder_seq_length=None, forward_only=False, collect_non_loss_data=False, first_val_step=None, adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None, force_all_reduce=False)",
    "megatron.core.pipeline_parallel.schedules:forward_backward_pipelining_with_interleaving": "(*, forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size, decoder_seq_length=None, forward_only=False, collect_non_loss_data=False, first_val_step=None, adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None, force_all_reduce=False)",
    "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate_shapes": "(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)",
    "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator._communicate": "(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape, wait_on_reqs=True)",
    "megatron.core.distributed.distributed_data_parallel:DistributedDataParallel.__init__": "(self, config, ddp_config, module, disable_bucketing=False, pg_collection=None)",
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync": "(self, force_all_reduce=False)",
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.finish_grad_sync": "(self, force_all_reduce=False)",
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__": "(self, ddp_config, param_dtype, grad_dtype, params, data_parallel_group, bucket_size, param_to_name, gradient_scaling_factor, param_indices, nccl_ub, pg_collection=None)",
    "megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.__init__": "(self, optimizer, config, grad_scaler, init_state_fn)",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__": "(self, optimizer, config, grad_scaler, init_state_fn)",
    "megatron.core.optimizer.optimizer:FP32Optimizer.__init__": "(self, optimizer, config, init_state_fn)",
    "megatron.core.optimizer.optimizer:ChainedOptimizer.get_loss_scale": "(self)",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__": "(self, optimizer, config, grad_scaler, init_state_fn, model_chunks, per_model_buffers, data_parallel_group, data_parallel_group_gloo, data_parallel_group_idx, distributed_optimizer_instance_id)",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict": "(self, state_dict)",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero": "(self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False)",
    "megatron.core.optimizer.clip_grads:get_grad_norm_fp32": "(grads_for_norm, norm_type=2, grad_stats_parallel_group=None)",
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": "(parameters, max_norm, total_norm, use_decoupled_grad=False)",
    "megatron.core.optimizer.clip_grads:count_zeros_fp32": "(parameters, grad_stats_parallel_group, use_decoupled_grad=False, tp_group=None)",
    "megatron.core.optimizer.grad_scaler:MegatronGradScaler.__init__": "(self, initial_scale)",
    "megatron.core.optimizer.grad_scaler:DynamicGradScaler.__init__": "(self, initial_scale, min_scale, growth_factor, backoff_factor, growth_interval, hysteresis)",
    "megatron.core.rerun_state_machine:RerunStateMachine.validate_result": "(self, result, rejection_func, message, comparison_func=None, tolerance=0.0, fatal=True)",
    "megatron.core.rerun_state_machine:RerunStateMachine._reduce_any": "(self, value)",
    "megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__": "(cls, config, hidden_size, eps=1e-05, persist_layer_norm=False, zero_centered_gamma=False, normalization='LayerNorm')",
    "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward": "(ctx, inp, weight, bias, router_dtype)",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups": "(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)",
    "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer": "(self)",
}


# --------------------------------------------------------------------------------------
# apply / revert

_APPLIED = False
_UNDO: list[Callable[[], None]] = []
log = logging.getLogger(__name__)


def apply(force: bool = False) -> bool:
    """Apply every patch in `PATCHES` (once per process); return True if they are applied.

    Does nothing and returns False when CUDA is available (unless `force`). Raises
    `MegatronPatchError` when megatron-core's version or a patched function's signature
    differs from what the patches were written for; nothing is changed in that case.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_versions()
    for patch in PATCHES:
        globals()[patch.install]()
    _APPLIED = True
    log.debug("applied %d megatron-core CPU patches", len(PATCHES))
    return True


def is_applied() -> bool:
    """True when `apply()` has patched megatron-core in this process."""
    return _APPLIED


def revert() -> None:
    """Undo every patch (in reverse order); `apply()` may be called again afterwards."""
    global _APPLIED
    while _UNDO:
        _UNDO.pop()()
    _APPLIED = False


def check_versions() -> None:
    """Raise `MegatronPatchError` unless megatron-core and every target match the records."""
    import megatron.core

    found = getattr(megatron.core, "__version__", None)
    if found != MEGATRON_CORE_VERSION:
        raise MegatronPatchError(
            f"megatron-core {found} is installed but the CPU patches in {__name__} were "
            f"written for {MEGATRON_CORE_VERSION}: install megatron-core=={MEGATRON_CORE_VERSION} "
            "or re-check every patch in PATCHES against the new release"
        )
    for patch in PATCHES:
        if patch.version != found:
            raise MegatronPatchError(
                f"patch {patch.name} was written for megatron-core {patch.version}, found {found}"
            )
        for target in patch.targets:
            recorded = _RECORDED_SIGNATURES.get(target)
            current = _signature(_resolve(target))
            if recorded != current:
                raise MegatronPatchError(
                    f"patch {patch.name}: the signature of {target} changed "
                    f"(recorded {recorded}, found {current}); re-read the upstream function "
                    "and update the patch before using this megatron-core"
                )


# --------------------------------------------------------------------------------------
# helpers


def _resolve(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    return obj


def _signature(fn: Any) -> str:
    """A stable text form of `fn`'s signature: names, kinds, literal defaults."""
    sig = inspect.signature(fn)
    params = []
    for p in sig.parameters.values():
        default = p.default
        if default is not inspect.Parameter.empty and not (
            default is None or isinstance(default, bool | int | float | str)
        ):
            default = ...
        params.append(p.replace(annotation=inspect.Parameter.empty, default=default))
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _setattr(obj: Any, name: str, value: Any) -> None:
    """setattr that `revert()` can undo."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    _UNDO.append(undo)


def _replace_function(module_name: str, name: str, new: Callable) -> Callable:
    """Replace module-level function `name` in its module and wherever a loaded megatron
    module imported it by name; return the original."""
    module = importlib.import_module(module_name)
    old = getattr(module, name)
    functools.update_wrapper(new, old)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("megatron."):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                _setattr(mod, attr, new)
    return old


def _replace_method(target: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace method `Class.name` (given as "module:Class.name") by `wrap(original)`."""
    module_name, _, qualname = target.partition(":")
    cls_path, _, name = qualname.rpartition(".")
    owner: Any = importlib.import_module(module_name)
    for part in cls_path.split("."):
        owner = getattr(owner, part)
    raw = vars(owner)[name]
    if isinstance(raw, staticmethod | classmethod):
        kind = type(raw)
        new = kind(functools.update_wrapper(wrap(raw.__func__), raw.__func__))
    else:
        new = functools.update_wrapper(wrap(raw), raw)
    _setattr(owner, name, new)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


# --------------------------------------------------------------------------------------
# rng_tracker


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    name_default = "default-rng"

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # As upstream, minus its "CPU RNG state changed" warning: here the CPU default
        # generator *is* the generator whose states the tracker swaps.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != name_default:
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current rng state {self._current_state_name} is not {name} on exit"
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != name_default:
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    mod = mrandom.__name__
    _replace_function(mod, "_get_cuda_rng_state", get_state)
    _replace_function(mod, "_set_cuda_rng_state", set_state)
    _replace_method(f"{mod}:CudaRNGStatesTracker.add", lambda orig: add)
    _replace_method(f"{mod}:CudaRNGStatesTracker.fork", lambda orig: fork)


# --------------------------------------------------------------------------------------
# cpu_torch_namespace


class _NullEvent:
    """A CUDA event stand-in: recording and waiting are no-ops on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NullStream:
    """A CUDA stream stand-in: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


_NULL_STREAM = _NullStream()


class _NullNvtx:
    @staticmethod
    def range_push(msg: str) -> None:
        pass

    @staticmethod
    def range_pop() -> None:
        pass

    @staticmethod
    @contextlib.contextmanager
    def range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield


class _CpuCudaNamespace(types.ModuleType):
    """Stands in for `torch.cuda` inside the patched megatron modules."""

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda on a CPU-only machine (megatron patches)")
        self.current_device = lambda: torch.device("cpu")
        self.Stream = _NullStream
        self.Event = _NullEvent
        self.stream = lambda stream=None: contextlib.nullcontext()
        self.current_stream = lambda device=None: _NULL_STREAM
        self.default_stream = lambda device=None: _NULL_STREAM
        self.synchronize = lambda device=None: None
        self.empty_cache = lambda: None
        self.is_current_stream_capturing = lambda: False
        self.nvtx = _NullNvtx

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return factory


class _CpuTorchView(types.ModuleType):
    """`torch` as seen by a patched megatron module: the real objects, except `cuda` and
    the tensor factories that megatron calls with `device="cuda"`."""

    FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange")

    def __init__(self) -> None:
        super().__init__("torch", "torch with a CPU `cuda` namespace (megatron patches)")
        for key, value in vars(torch).items():
            if not key.startswith("__"):
                self.__dict__[key] = value
        self.cuda = _CpuCudaNamespace()
        for name in self.FACTORIES:
            self.__dict__[name] = _cpu_factory(getattr(torch, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _view_modules() -> list[str]:
    patch = next(p for p in PATCHES if p.name == "cpu_torch_namespace")
    return sorted({t.partition(":")[0] for t in patch.targets})


def _install_cpu_torch_namespace() -> None:
    view = _CpuTorchView()
    for name in _view_modules():
        module = importlib.import_module(name)
        if vars(module).get("torch") is not torch:
            raise MegatronPatchError(f"{name} does not bind `torch` at module level")
        _setattr(module, "torch", view)


# --------------------------------------------------------------------------------------
# alltoall_split_sizes


def _install_alltoall_split_sizes() -> None:
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts only CUDA tensors; gloo needs plain sequences as split sizes.
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    _replace_function(
        f"{_MC}.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu
    )


# --------------------------------------------------------------------------------------
# uneven_gather_scatter


def _install_uneven_gather_scatter() -> None:
    mod = f"{_MC}.tensor_parallel.mappings"
    mappings = importlib.import_module(mod)
    orig_gather = mappings._gather_along_first_dim
    orig_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig_gather(input_, group, None, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((width * len(sizes), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        return torch.cat([gathered[i * width : i * width + s] for i, s in enumerate(sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return orig_scatter(input_, group, None, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    _replace_function(mod, "_gather_along_first_dim", gather)
    _replace_function(mod, "_reduce_scatter_along_first_dim", reduce_scatter)


# --------------------------------------------------------------------------------------
# sequence_parallel_norm


def _install_sequence_parallel_norm() -> None:
    def wrap(orig_new: Callable) -> Callable:
        def __new__(
            cls,
            config,
            hidden_size,
            eps=1e-5,
            persist_layer_norm=False,
            zero_centered_gamma=False,
            normalization="LayerNorm",
        ):
            if not config.sequence_parallel:
                return orig_new(
                    cls,
                    config,
                    hidden_size,
                    eps,
                    persist_layer_norm,
                    zero_centered_gamma,
                    normalization,
                )
            # Build the same torch norm with sequence parallelism off, then mark its
            # parameters so their gradients are summed over the TP group.
            config_nosp = _ConfigWithoutSP(config)
            norm = orig_new(
                cls,
                config_nosp,
                hidden_size,
                eps,
                persist_layer_norm,
                zero_centered_gamma,
                normalization,
            )
            for param in norm.parameters():
                param.sequence_parallel = True
            return norm

        return __new__

    _replace_method(f"{_MC}.transformer.torch_norm:WrappedTorchNorm.__new__", wrap)


class _ConfigWithoutSP:
    """A read-only view of a TransformerConfig with `sequence_parallel=False`."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name == "sequence_parallel":
            return False
        return getattr(self._config, name)


# --------------------------------------------------------------------------------------
# te_general_gemm


def _install_te_general_gemm() -> None:
    moe_utils = importlib.import_module(f"{_MC}.transformer.moe.moe_utils")
    if "te_general_gemm" not in vars(moe_utils):
        _setattr(moe_utils, "te_general_gemm", None)


# --------------------------------------------------------------------------------------
# cuda_tensor_names

_CUDA_NAMES_DEPTH = 0


@contextlib.contextmanager
def cuda_tensor_names() -> Iterator[None]:
    """Inside: `Tensor.type()` names CPU tensors as CUDA ones (`torch.FloatTensor` ->
    `torch.cuda.FloatTensor`) and `Tensor.cuda()` returns the tensor itself."""
    global _CUDA_NAMES_DEPTH
    if _CUDA_NAMES_DEPTH:
        _CUDA_NAMES_DEPTH += 1
        try:
            yield
        finally:
            _CUDA_NAMES_DEPTH -= 1
        return
    base_type = torch.Tensor.type

    def type_(self, *args: Any, **kwargs: Any) -> Any:
        result = base_type(self, *args, **kwargs)
        if not args and not kwargs and result.startswith("torch.") and ".cuda." not in result:
            return "torch.cuda." + result[len("torch.") :]
        return result

    def cuda_(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    saved = {k: vars(torch.Tensor).get(k) for k in ("type", "cuda")}
    torch.Tensor.type = type_
    torch.Tensor.cuda = cuda_
    _CUDA_NAMES_DEPTH = 1
    try:
        yield
    finally:
        _CUDA_NAMES_DEPTH = 0
        for key, value in saved.items():
            if value is None:
                delattr(torch.Tensor, key)
            else:
                setattr(torch.Tensor, key, value)


def _with_cuda_tensor_names(fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_tensor_names():
            return fn(*args, **kwargs)

    return wrapper


def _install_cuda_tensor_names() -> None:
    patch = next(p for p in PATCHES if p.name == "cuda_tensor_names")
    for target in patch.targets:
        module_name, _, qualname = target.partition(":")
        if "." in qualname:
            _replace_method(target, _with_cuda_tensor_names)
        else:
            module = importlib.import_module(module_name)
            _replace_function(
                module_name, qualname, _with_cuda_tensor_names(getattr(module, qualname))
            )
