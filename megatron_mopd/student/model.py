"""The student: a megatron-core `GPTModel` built from `ModelConfig` + `ParallelConfig`.

    layout = init_distributed(cfg.parallel, cfg.model)
    chunks = build_model(cfg.model, cfg.parallel)        # [GPTModel] (one PP stage)

The architecture is the Qwen2 / Qwen3 / Qwen3-MoE / Llama family, with the same
semantics as Hugging Face `transformers` (the weight converter checks log-probs against
them within 1e-5):

- pre-norm decoder, RMSNorm (`layernorm_epsilon`), SwiGLU MLP (`linear_fc1` holds
  `[gate; up]`), no linear biases except optional QKV bias (Qwen2), optional per-head
  q/k RMSNorm (Qwen3), GQA (`num_query_groups`), `kv_channels` as head dim (Qwen3),
  RoPE over the full head dim (`rotary_base`, non-interleaved halves as in HF),
  untied or tied embeddings;
- MoE: a bias-free linear router, softmax over experts then top-k; with
  `moe_router_pre_softmax=False` the top-k probabilities are renormalised (HF
  `norm_topk_prob=True`, computed as a softmax over the top-k logits, which is the same
  thing), with `True` they are not (`norm_topk_prob=False`); optional shared expert with
  optional sigmoid gate (Qwen2-MoE); `alltoall` or `allgather` token dispatcher.
  Every layer is an MoE layer (HF `decoder_sparse_step=1`, no `mlp_only_layers`).

On CPU the local layer spec (`get_gpt_layer_local_spec`, torch norms) is used; with
`transformer_impl="transformer_engine"` (or "auto" when CUDA and Transformer Engine are
present) the TE spec is used, with grouped-GEMM experts. Parameter names differ between
the two (TE fuses the input norm into `linear_qkv`/`linear_fc1`); the TE path is not
tested on these CPU machines.

The vocabulary is padded as Megatron does (`padded_vocab_size`: a multiple of
`model.make_vocab_size_divisible_by * TP`), so any vocabulary runs at any TP; the model
records the real size (`mopd_vocab_size`) for the log-probs (which mask the padding) and
the exports (which drop it). With `model.logits_chunk_tokens > 0` the output layer returns
the hidden states and the log-probs are computed chunk by chunk (`student.logprobs`).

Random initialisation (when no checkpoint is loaded) is *layout independent*: every
parameter is drawn as the full, unsharded tensor from a generator seeded by
`model.seed` and the parameter's global name, then sliced to this rank's shard. So the
same seed gives the same model at TP1, TP2, PP2, EP2, ..., which is what the parity
tests rely on. Norm weights start at 1, biases at 0, linear weights N(0, std) with the
output projections (`linear_proj`, `linear_fc2`) scaled by 1/sqrt(2 * num_layers) as in
Megatron.

Left out (each is a megatron option not wired to the config yet): virtual pipeline
stages, Llama-3 RoPE scaling / YaRN, sliding-window attention, MLA, MoE layer frequency
(dense layers between MoE layers), expert bias / sigmoid routers (DeepSeek-V3), MTP.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import torch
import torch.nn.functional as F

from megatron_mopd.config import ModelConfig, ParallelConfig, check_layout
from megatron_mopd.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """Whether the Transformer Engine layer spec is used (see `model.transformer_impl`)."""
    impl = model_cfg.transformer_impl
    if impl == "local":
        return False
    have_te = _have_transformer_engine()
    if impl == "transformer_engine":
        if not have_te:
            raise ConfigError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not "
                "importable (it needs CUDA); use local or auto"
            )
        return True
    return torch.cuda.is_available() and have_te


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def to_transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> Any:
    """megatron-core's `TransformerConfig` for this model and layout.

    Sets `calculate_per_token_loss=True`: the train step's gradient contract (a loss
    *summed* over micro-batches and DP ranks, see `student.train_step`) relies on it.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mopd.distributed import sequence_parallel_enabled

    check_layout(model_cfg, parallel_cfg)
    dtype = _DTYPES[model_cfg.params_dtype]
    te = use_transformer_engine(model_cfg)
    kw: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        kv_channels=model_cfg.kv_channels,
        # parallel layout
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        expert_model_parallel_size=parallel_cfg.ep,
        expert_tensor_parallel_size=parallel_cfg.etp,
        sequence_parallel=sequence_parallel_enabled(parallel_cfg, model_cfg),
        # architecture
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=model_cfg.init_method_std,
        # numerics
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # kernels: fused ones need CUDA (and apex/TE)
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Megatron's init also marks the TP-sharded weights (`tensor_model_parallel`,
        # `partition_dim`, `partition_stride`), which grad-norm and our init rely on;
        # init_parameters then overwrites the values layout-independently.
        perform_initialization=True,
        # loss / schedule
        calculate_per_token_loss=True,
        # Micro-batches are padded to their own longest row, except with the allgather
        # dispatcher, which needs equal token counts on all EP ranks: there every
        # micro-batch is padded to one shape (see student.logprobs.run_schedule).
        variable_seq_lengths=not uses_allgather_dispatcher(model_cfg),
        moe_token_dispatcher_type=model_cfg.moe_token_dispatcher_type,
    )
    kw.update(recompute_kwargs(model_cfg, te))
    if model_cfg.is_moe:
        kw.update(moe_kwargs(model_cfg, te))
    return TransformerConfig(**kw)


def moe_kwargs(model_cfg: ModelConfig, transformer_engine: bool) -> dict[str, Any]:
    """The `TransformerConfig` MoE fields of an MoE model (softmax router in fp32, aux-loss
    balancing when `model.moe_aux_loss_coeff` > 0, grouped GEMM with Transformer Engine)."""
    return dict(
        num_moe_experts=model_cfg.num_moe_experts,
        moe_router_topk=model_cfg.moe_router_topk,
        moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size or model_cfg.ffn_hidden_size,
        moe_shared_expert_intermediate_size=model_cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model_cfg.moe_shared_expert_gate,
        moe_router_pre_softmax=model_cfg.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=model_cfg.moe_router_topk_scaling_factor,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if model_cfg.moe_aux_loss_coeff else "none",
        moe_grouped_gemm=transformer_engine,
        moe_permute_fusion=False,
        # routing replay (R3): every router gets megatron's RouterReplay; it routes by
        # itself unless student.routing_replay sets a replay action for a step
        moe_enable_routing_replay=True,
    )


def recompute_kwargs(model_cfg: ModelConfig, transformer_engine: bool) -> dict[str, Any]:
    """The `TransformerConfig` activation-recomputation fields from `model.recompute_*`
    (empty when `model.recompute_granularity` is null: nothing recomputed)."""
    if model_cfg.recompute_granularity is None:
        return {}
    kw: dict[str, Any] = dict(
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method,
        recompute_num_layers=model_cfg.recompute_num_layers,
    )
    if model_cfg.recompute_granularity == "selective":
        modules = list(model_cfg.recompute_modules or ["core_attn"])
        if "moe_act" in modules and not transformer_engine:
            raise ConfigError(
                "model.recompute_modules: moe_act needs grouped-GEMM experts, which only the "
                "Transformer Engine spec uses here (model.transformer_impl); on the local spec "
                "use moe or mlp"
            )
        kw["recompute_modules"] = modules
    return kw


def padded_vocab_size(model_cfg: ModelConfig, tp: int) -> int:
    """The vocabulary the embedding and output layer hold: `model.vocab_size` rounded up to
    a multiple of `model.make_vocab_size_divisible_by * tp` (Megatron's rule), so any
    vocabulary splits over any TP. The padded rows are zero on load and random init, dropped
    on export, and their logits are masked out of every log-softmax."""
    from megatron_mopd.student.memory import padded_vocab_size as rule

    return rule(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)


def uses_allgather_dispatcher(model_cfg: ModelConfig) -> bool:
    """True for MoE models with the allgather token dispatcher."""
    return model_cfg.is_moe and model_cfg.moe_token_dispatcher_type == "allgather"


def layer_spec(model_cfg: ModelConfig) -> Any:
    """The megatron layer spec: TE on GPU (see `use_transformer_engine`), local otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = model_cfg.num_moe_experts if model_cfg.is_moe else None
    if use_transformer_engine(model_cfg):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=bool(experts), qk_layernorm=model_cfg.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=experts,
        moe_grouped_gemm=False,
        qk_layernorm=model_cfg.qk_layernorm,
        normalization="RMSNorm",
    )


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    init_params: bool = True,
    megatron_init: bool = True,
) -> list[Any]:
    """Build this rank's model chunks: `[GPTModel]` holding this rank's PP stage.

    Needs `distributed.init_distributed` first. With `init_params` (the default) the
    parameters get the layout-independent random init described in the module docstring;
    pass False when a checkpoint is loaded next. `megatron_init=False` also skips
    Megatron's own initialisation (which, on CPU, builds each weight's full unsharded
    master copy and marks the TP-sharded weights): parameters are only allocated, the
    least memory for loading a checkpoint to export it, but not for training (the grad
    norm needs those marks). Parameters live on the CPU without CUDA, else on the current
    CUDA device.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call megatron_mopd.distributed.init_distributed() before build_model()")
    if ps.get_tensor_model_parallel_world_size() != parallel_cfg.tp or (
        ps.get_pipeline_model_parallel_world_size() != parallel_cfg.pp
    ):
        raise RuntimeError("build_model: parallel_cfg differs from the initialised layout")
    config = to_transformer_config(model_cfg, parallel_cfg)
    if not megatron_init:
        if init_params:
            raise ValueError("build_model: init_params needs megatron_init")
        config.perform_initialization = False
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg),
        vocab_size=padded_vocab_size(model_cfg, parallel_cfg.tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model_cfg.rotary_base,
    )
    # the real vocabulary (exports drop the padded rows, log-probs mask them) and how the
    # output layer runs: see student.logprobs.OutputHead
    model.mopd_vocab_size = model_cfg.vocab_size
    model.mopd_logits_chunk_tokens = model_cfg.logits_chunk_tokens
    if model.post_process and model_cfg.logits_chunk_tokens > 0:
        from megatron_mopd.student.logprobs import return_hidden_states

        return_hidden_states(model.output_layer)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    chunks = [model]
    if init_params:
        init_parameters(chunks, model_cfg, seed=model_cfg.seed)
    return chunks


# --------------------------------------------------------------------------------------
# layout-independent initialisation

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"(\.local_experts\.)(\d+)\.")  # local spec: one module per expert
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.weight)(\d+)$")  # TE grouped GEMM


def global_param_name(name: str, model: Any, model_cfg: ModelConfig) -> str:
    """The name of a local parameter in the unsharded TP1/PP1/EP1 model: layer numbers
    offset by this PP stage's first layer, expert numbers by this EP rank's first expert.
    (`name` without the DDP `module.` prefix.)"""
    if name == "output_layer.weight" and getattr(
        model, "share_embeddings_and_output_weights", False
    ):
        return "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
    offset = _first_layer(model)
    name = _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", name, count=1)
    if model_cfg.is_moe and is_expert_param(name):
        from megatron.core import parallel_state as ps

        per_rank = model_cfg.num_moe_experts // ps.get_expert_model_parallel_world_size()
        first = ps.get_expert_model_parallel_rank() * per_rank
        name = _EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + first}.", name, count=1)
        name = _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + first}", name)
    return name


def _first_layer(model: Any) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return layers[0].layer_number - 1  # megatron numbers layers globally from 1


def param_shard_info(
    param: torch.nn.Parameter, is_expert: bool
) -> tuple[int | None, int, int, int]:
    """(partition_dim or None, stride, world size, rank) of a parameter's TP sharding:
    routed-expert parameters are sharded over the expert-TP group, the others over TP."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return None, 1, 1, 0
    if is_expert:
        world, rank = (
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(),
        )
    else:
        world, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return param.partition_dim, getattr(param, "partition_stride", 1), world, rank


def shard_full_tensor(full: torch.Tensor, dim: int | None, stride: int, world: int, rank: int):
    """This rank's shard of an unsharded tensor, as megatron's CPU init slices it:
    `stride * world` chunks along `dim`, chunks `rank, rank + world, ...` concatenated."""
    if dim is None or world == 1:
        return full
    chunks = torch.chunk(full, stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def init_parameters(model_chunks: list[Any], model_cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter independently of the parallel layout (see module doc)."""
    std = model_cfg.init_method_std
    out_std = std / math.sqrt(2.0 * model_cfg.num_layers)
    for model in model_chunks:
        inner = _unwrap(model)
        with torch.no_grad():
            for name, param in inner.named_parameters():
                gname = global_param_name(name, inner, model_cfg)
                if name.endswith("bias"):
                    param.zero_()
                    continue
                if _is_norm(name):
                    param.fill_(1.0)
                    continue
                dim, stride, world, rank = param_shard_info(param, is_expert_param(name))
                if ".linear_fc1." in gname and dim is not None:
                    stride = 2  # SwiGLU: each TP rank holds [gate_r; up_r] (whatever TE records)
                shape = list(param.shape)
                if dim is not None:
                    shape[dim] *= world
                gen = torch.Generator().manual_seed(_name_seed(seed, gname))
                scale = out_std if (".linear_proj." in gname or ".linear_fc2." in gname) else std
                vocab = gname in _VOCAB_PARAMS
                padded = shape[0] if vocab else 0
                if vocab:  # drawn at the real vocabulary (the same at every padding), then padded
                    shape[0] = model_cfg.vocab_size
                full = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
                if vocab:
                    full = F.pad(full, (0, 0, 0, padded - shape[0]))
                param.copy_(shard_full_tensor(full, dim, stride, world, rank).to(param.dtype))


_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def is_expert_param(name: str) -> bool:
    """True for parameters of routed experts (not the shared expert, not the router)."""
    return ".mlp.experts." in f".{name}"


def _is_norm(name: str) -> bool:
    return "layernorm" in name or "layer_norm" in name or name.endswith("norm.weight")


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model
