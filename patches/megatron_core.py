"""CPU patches for megatron-core 0.16.1 (applied only when CUDA is absent).

    from megatron_mopd.patches import megatron_core
    megatron_core.apply()      # idempotent; a no-op (returns False) when CUDA is available

megatron-core assumes a GPU in a few dozen places. Every patch is listed in `PATCHES`
below (name, upstream functions, the megatron-core version it was written for, why).
Before anything is changed, `apply()` checks `megatron.core.__version__` and the
signature of every upstream function a patch touches against the one recorded here
(`_RECORDED_SIGNATURES`), and raises `MegatronPatchError` on any difference: a new
megatron-core release must be re-read before these patches are trusted with it.
`revert()` undoes everything (tests use it). The installers named in the table, and the
CPU stand-ins they install, are in `megatron_core_cpu.py`.

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
import importlib
import inspect
import logging
import types
from collections.abc import Callable
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
    install: str  # name of the function in megatron_core_cpu.py that installs it
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
        name="checkpoint_without_output_fp8",
        targets=(f"{_MC}.tensor_parallel.random:CheckpointWithoutOutput.__init__",),
        why="0.16.1: `CheckpointWithoutOutput(fp8=False)` sets `self.fp8 = fp8 is not None`, "
        "i.e. True, so selective recompute of layernorm / mlp / moe (model.recompute_modules) "
        "calls Transformer Engine's FP8GlobalStateManager: a NameError without TE. The "
        "patched __init__ treats fp8=False as no FP8 (None)",
        install="_install_checkpoint_without_output_fp8",
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
    "megatron.core.tensor_parallel.random:CheckpointWithoutOutput.__init__": "(self, fp8=False)",
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
    installers = _installers()
    for patch in PATCHES:
        getattr(installers, patch.install)()
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


def _installers() -> types.ModuleType:
    """The module holding each patch's installer (imported on first use: it imports this
    one)."""
    from . import megatron_core_cpu

    return megatron_core_cpu


def cuda_tensor_names() -> contextlib.AbstractContextManager[None]:
    """Inside: `Tensor.type()` names CPU tensors as CUDA ones (`torch.FloatTensor` ->
    `torch.cuda.FloatTensor`) and `Tensor.cuda()` returns the tensor itself."""
    return _installers().cuda_tensor_names()
