"""Hugging Face `config.json` <-> `ModelConfig` (the student's architecture).

Supported `model_type`s: `qwen2` (Qwen2/Qwen2.5: q/k/v bias), `qwen3` (q/k RMSNorm per head,
explicit `head_dim`), `qwen3_moe` (routed experts, every layer sparse), `qwen2_moe` (routed
experts plus a sigmoid-gated shared expert), `llama` (no rope scaling, no biases). Every one is
a pre-norm RMSNorm decoder with SwiGLU MLPs and non-interleaved RoPE, which is what the
student's `GPTModel` implements; anything outside that (sliding-window attention, rope
scaling, dense layers inside an MoE model, other activations) is refused with a `UserError`
rather than converted into a model that silently computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from megatron_mopd.config import ModelConfig
from megatron_mopd.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "llama")
_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
# ModelConfig fields that describe the architecture (set from HF); all others (paths, parallel
# and implementation choices, dtype, seed, dispatcher) are kept from the caller's config.
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "layernorm_epsilon",
    "qk_layernorm",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_router_pre_softmax",
)
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face folder; a `UserError` naming the path when
    the folder or file is missing or is not a JSON object."""
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        what = "a file" if os.path.exists(hf_dir) else "no such directory"
        raise UserError(f"Hugging Face model folder {hf_dir}: {what}")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        found = sorted(os.listdir(hf_dir))[:8]
        raise UserError(
            f"{path}: no such file (not a Hugging Face model folder; it holds {found or 'nothing'})"
        )
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _load_transformers_config(hf_dir: str, raw: dict[str, Any]):
    """The `transformers` config object (defaults filled in per architecture)."""
    import transformers

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = raw.get("architectures")
        raise UserError(
            f"{os.path.join(hf_dir, 'config.json')}: model_type={model_type!r} "
            f"(architectures={archs}) is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return transformers.AutoConfig.from_pretrained(hf_dir)
    except (ValueError, TypeError, KeyError, OSError) as e:
        msg = str(e).replace("\n", " ")
        raise UserError(f"{hf_dir}/config.json: transformers cannot read it: {msg}") from None


def _unsupported(hf_dir: str, what: str) -> UserError:
    return UserError(f"{hf_dir}/config.json: {what} is not supported by the Megatron student")


def model_config_from_hf(hf_dir: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    """Read the architecture of the HF model in `hf_dir` into a `ModelConfig`.

    Architecture fields (`ARCH_FIELDS`) come from `config.json`; every other field (paths,
    dtype, implementation, seed, dispatcher) is kept from `base` (defaults when None), and
    `hf_path` is set to `hf_dir`. Raises `UserError` for a missing or unreadable folder or an
    unsupported architecture or feature, naming the path and what was found.
    """
    hf_dir = os.fspath(hf_dir)
    raw = read_hf_config(hf_dir)
    c = _load_transformers_config(hf_dir, raw)
    mt = c.model_type

    if getattr(c, "hidden_act", "silu") != "silu":
        raise _unsupported(hf_dir, f"hidden_act={c.hidden_act!r} (only 'silu', i.e. SwiGLU)")
    rope_scaling = getattr(c, "rope_scaling", None)
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise _unsupported(hf_dir, f"rope_scaling={rope_scaling}")
    if getattr(c, "use_sliding_window", False):
        raise _unsupported(hf_dir, "use_sliding_window=true (sliding-window attention)")
    layer_types = getattr(c, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _unsupported(hf_dir, f"layer_types with {sorted(set(layer_types))}")
    if mt == "llama" and (c.attention_bias or c.mlp_bias):
        raise _unsupported(hf_dir, "llama with attention_bias or mlp_bias")
    if mt in ("qwen3", "qwen3_moe") and c.attention_bias:
        raise _unsupported(hf_dir, f"{mt} with attention_bias=true")
    if getattr(c, "pretraining_tp", 1) != 1:
        raise _unsupported(hf_dir, f"pretraining_tp={c.pretraining_tp}")

    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    values: dict[str, Any] = dict(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        kv_channels=head_dim,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rotary_base=float(c.rope_theta),
        layernorm_epsilon=float(c.rms_norm_eps),
        qk_layernorm=mt in ("qwen3", "qwen3_moe"),
        add_qkv_bias=(mt == "qwen2") or (mt == "qwen2_moe" and c.qkv_bias),
        untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        num_moe_experts=None,
        moe_router_topk=2,
        moe_ffn_hidden_size=None,
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
        moe_router_pre_softmax=False,
    )
    if mt in ("qwen3_moe", "qwen2_moe"):
        sparse_step = getattr(c, "decoder_sparse_step", 1)
        dense_layers = list(getattr(c, "mlp_only_layers", None) or [])
        if sparse_step != 1 or dense_layers:
            raise _unsupported(
                hf_dir,
                f"a mix of dense and MoE layers (decoder_sparse_step={sparse_step}, "
                f"mlp_only_layers={dense_layers}); only all-MoE models are",
            )
        values.update(
            num_moe_experts=c.num_experts,
            moe_router_topk=c.num_experts_per_tok,
            moe_ffn_hidden_size=c.moe_intermediate_size,
            # HF: softmax over all experts, top-k, renormalise when norm_topk_prob. Megatron
            # without pre-softmax takes the top-k logits and softmaxes them, which is the same
            # renormalised distribution; with pre-softmax it keeps the unnormalised top-k.
            moe_router_pre_softmax=not c.norm_topk_prob,
        )
        if mt == "qwen2_moe" and c.shared_expert_intermediate_size:
            values.update(
                moe_shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                moe_shared_expert_gate=True,
            )
    base = base if base is not None else ModelConfig()
    cfg = dataclasses.replace(base, hf_path=hf_dir, mcore_path=None, **values)
    cfg.validate("model")
    return cfg


def hf_model_type(model_cfg: ModelConfig) -> str:
    """The HF `model_type` that represents `model_cfg` (read from its HF folder if it has
    one, else inferred from the architecture's features)."""
    if model_cfg.hf_path and os.path.isfile(os.path.join(model_cfg.hf_path, "config.json")):
        mt = read_hf_config(model_cfg.hf_path).get("model_type")
        if mt in SUPPORTED_MODEL_TYPES:
            return mt
    if model_cfg.is_moe:
        if model_cfg.moe_shared_expert_intermediate_size or model_cfg.add_qkv_bias:
            return "qwen2_moe"
        return "qwen3_moe"
    if model_cfg.add_qkv_bias:
        return "qwen2"
    if model_cfg.qk_layernorm:
        return "qwen3"
    return "llama"


def hf_config_dict(model_cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` (as a dict) for the HF model equivalent to `model_cfg`.

    When `model_cfg.hf_path` holds a config, it is the starting point (token ids, chat
    settings and other fields the student does not model are kept); the architecture fields
    are then overwritten from `model_cfg`.
    """
    mt = hf_model_type(model_cfg)
    out: dict[str, Any] = {}
    if model_cfg.hf_path and os.path.isfile(os.path.join(model_cfg.hf_path, "config.json")):
        out = read_hf_config(model_cfg.hf_path)
    heads = model_cfg.num_attention_heads
    out.update(
        architectures=[_ARCHITECTURES[mt]],
        model_type=mt,
        hidden_act="silu",
        num_hidden_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=model_cfg.num_query_groups or heads,
        head_dim=model_cfg.kv_channels or model_cfg.hidden_size // heads,
        vocab_size=model_cfg.vocab_size,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rotary_base,
        rms_norm_eps=model_cfg.layernorm_epsilon,
        tie_word_embeddings=not model_cfg.untie_embeddings_and_output_weights,
        torch_dtype=dtype,
        dtype=dtype,  # transformers >= 4.56 reads `dtype` before `torch_dtype`
    )
    if mt == "qwen2_moe":
        out["qkv_bias"] = model_cfg.add_qkv_bias
    if mt in ("qwen3", "qwen3_moe", "llama"):
        out["attention_bias"] = False
    if mt == "llama":
        out["mlp_bias"] = False
    if model_cfg.is_moe:
        out.update(
            num_experts=model_cfg.num_moe_experts,
            num_experts_per_tok=model_cfg.moe_router_topk,
            moe_intermediate_size=model_cfg.moe_ffn_hidden_size or model_cfg.ffn_hidden_size,
            norm_topk_prob=not model_cfg.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if mt == "qwen2_moe":
            out["shared_expert_intermediate_size"] = (
                model_cfg.moe_shared_expert_intermediate_size or 0
            )
    return out


def params_dtype_of_hf(hf_dir: str | os.PathLike) -> str | None:
    """The checkpoint's dtype as a `ModelConfig.params_dtype` value (`fp32`, `bf16`,
    `fp16`), or None when `config.json` does not say."""
    raw = read_hf_config(hf_dir)
    return _DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or ""))
