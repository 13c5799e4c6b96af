"""Parameter and checkpoint names of megatron-core's two GPT layer specs, and the mapping
between them, so a checkpoint written under one spec loads under the other.

megatron-core 0.16 builds a decoder layer from one of two specs (`models/gpt/
gpt_layer_specs.py`):

- `local` (`get_gpt_layer_local_spec`, torch modules; what runs on CPU): a separate
  `input_layernorm` and `pre_mlp_layernorm`, experts as `SequentialMLP`
  (`mlp.experts.local_experts.{i}.linear_fc1.weight`). Its `sharded_state_dict_keys_map`
  stores `input_layernorm.*` as `self_attention.linear_qkv.layer_norm_*` and
  `pre_mlp_layernorm.*` as `mlp.linear_fc1.layer_norm_*`, *for dense and MoE layers alike*.
- `transformer_engine` (`get_gpt_layer_with_transformer_engine_spec`, GPU): the input norm
  fused into `linear_qkv` (`self_attention.linear_qkv.layer_norm_weight`); in dense layers
  the pre-MLP norm fused into `linear_fc1` (`mlp.linear_fc1.layer_norm_weight`), but in MoE
  layers a separate `pre_mlp_layernorm` (a `TENorm`, stored as `pre_mlp_layernorm.weight`:
  there is no `linear_fc1` to fuse it into); grouped experts `TEGroupedMLP`
  (`mlp.experts.linear_fc1.weight{i}`), stored under the same keys as `SequentialMLP`'s.

So the checkpoint keys agree everywhere except one: the pre-MLP norm of MoE layers,
`decoder.layers.mlp.linear_fc1.layer_norm_weight` (local) vs
`decoder.layers.pre_mlp_layernorm.weight` (TE). q/k layernorms (`self_attention.
q_layernorm.weight`), the router, shared experts and the output layer are named alike.
The `_extra_state` objects (TE's FP8 metadata; `None` in local modules) may also differ
between the specs; a load skips those the checkpoint lacks (`missing_extra_states`).

The module (`named_parameters`) names differ in more places; `module_param_name` maps them
(input norm, dense pre-MLP norm, experts), for code that matches parameters by name.

Not covered: multi-latent attention, TE's op fuser (`use_te_op_fuser`, other keys), and
models mixing dense and MoE layers (`moe_layer_freq`; not built by this project).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

LOCAL = "local"
TE = "transformer_engine"
SPECS = (LOCAL, TE)

# checkpoint (sharded) keys of the MoE layers' pre-MLP norm under each spec
_MOE_PRE_MLP_NORM = {
    LOCAL: "decoder.layers.mlp.linear_fc1.layer_norm_",
    TE: "decoder.layers.pre_mlp_layernorm.",
}
_EXTRA_STATE = "._extra_state"


def _check(spec: str) -> None:
    if spec not in SPECS:
        raise ValueError(f"layer spec {spec!r} is not one of {SPECS}")


def checkpoint_key(key: str, is_moe: bool, src: str, dst: str) -> str:
    """The checkpoint (sharded tensor) key that `key`, written under spec `src`, has under
    spec `dst`. Works on model keys and on the optimizer keys built from them
    (`optimizer.state.exp_avg.decoder.layers....`). Dense models: the keys agree."""
    _check(src)
    _check(dst)
    if src == dst or not is_moe:
        return key
    old, new = _MOE_PRE_MLP_NORM[src], _MOE_PRE_MLP_NORM[dst]
    i = key.find(old)
    if i < 0 or (i > 0 and key[i - 1] != "."):
        return key
    return key[:i] + new + key[i + len(old) :]


# module parameter names (inside a layer): local -> TE, for dense and MoE layers
_LOCAL_TO_TE_DENSE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_LOCAL_TO_TE_MOE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
}
_LAYER = re.compile(r"^(.*?decoder\.layers\.\d+\.)(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def module_param_name(name: str, is_moe: bool, src: str, dst: str) -> str:
    """The `named_parameters()` name that parameter `name` of a model built with spec `src`
    has in the same model built with spec `dst` (grouped-GEMM experts for TE, as
    `student.model.layer_spec` builds them). Names outside decoder layers agree."""
    _check(src)
    _check(dst)
    if src == dst:
        return name
    m = _LAYER.match(name)
    if not m:
        return name
    head, rest = m.groups()
    table = _LOCAL_TO_TE_MOE if is_moe else _LOCAL_TO_TE_DENSE
    if src == TE:
        table = {v: k for k, v in table.items()}
    if rest in table:
        return head + table[rest]
    if src == LOCAL:
        e = _LOCAL_EXPERT.match(rest)
        if e:
            return f"{head}mlp.experts.{e.group(2)}.{e.group(3)}{e.group(1)}"
    else:
        e = _TE_EXPERT.match(rest)
        if e:
            return f"{head}mlp.experts.local_experts.{e.group(3)}.{e.group(1)}.{e.group(2)}"
    return name


def model_spec(chunk: Any) -> str:
    """The layer spec a built `GPTModel` chunk uses: TE when its input norm is fused into
    `linear_qkv` (TE's `layer_norm_weight` parameter), local otherwise."""
    from megatron_mopd.convert.mapping import unwrap

    for name, _ in unwrap(chunk).named_parameters():
        if name.endswith("self_attention.linear_qkv.layer_norm_weight"):
            return TE
        if name.endswith("input_layernorm.weight"):
            return LOCAL
    return LOCAL


def model_is_moe(chunk: Any) -> bool:
    """True when the chunk's layers are MoE layers (its `TransformerConfig` has experts)."""
    from megatron_mopd.convert.mapping import unwrap

    return bool(getattr(unwrap(chunk).config, "num_moe_experts", None))


def spec_of_keys(keys: Iterable[str], is_moe: bool) -> str | None:
    """The spec a checkpoint with these sharded keys was written under, or None when the
    keys do not tell (dense models, where both specs write the same keys)."""
    if not is_moe:
        return None
    found = None
    for key in keys:
        for spec, marker in _MOE_PRE_MLP_NORM.items():
            i = key.find(marker)
            if i >= 0 and (i == 0 or key[i - 1] == "."):
                found = spec
                break
        if found:
            return found
    return None


def _sharded_items(sharded: Any) -> Iterable[Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(sharded):
        if hasattr(value, "key") and hasattr(value, "replica_id"):
            yield value


def rename_sharded_keys(sharded: Any, is_moe: bool, src: str, dst: str) -> int:
    """Rename, in place, the checkpoint keys of a sharded state dict built under spec `src`
    to those of spec `dst` (the dict's own keys, the module names, are kept, so the loaded
    values still go to the right parameters). Returns how many keys changed."""
    changed = 0
    if src == dst or not is_moe:
        return 0
    for item in _sharded_items(sharded):
        new = checkpoint_key(item.key, is_moe, src, dst)
        if new != item.key:
            item.key = new
            changed += 1
    return changed


def checkpoint_keys(ckpt_dir: str) -> set[str]:
    """Every tensor key and object key (`ShardedObject.key`) stored in a dist_checkpointing
    folder (reads its metadata file only)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    keys = set()
    for value in load_sharded_metadata(ckpt_dir).values():
        keys.add(value.key)
    return keys


def missing_extra_states(sharded: Any, stored: set[str]) -> list[tuple[list[Any], Any]]:
    """Remove from a sharded state dict (in place) the `_extra_state` objects the checkpoint
    does not hold (written under the other spec, or by an older megatron-core), and return
    where they were: `(path of dict keys, key)` pairs for `fill_extra_states`."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    removed: list[tuple[list[Any], Any]] = []

    def walk(d: Any, path: list[Any]) -> None:
        if isinstance(d, dict):
            items = list(d.items())
        elif isinstance(d, list):
            items = list(enumerate(d))
        else:
            return
        for k, v in items:
            if (
                isinstance(v, ShardedObject)
                and v.key.endswith(_EXTRA_STATE)
                and v.key not in stored
                and isinstance(d, dict)
            ):
                del d[k]
                removed.append((path, k))
            else:
                walk(v, [*path, k])

    walk(sharded, [])
    return removed


def fill_extra_states(loaded: Any, removed: list[tuple[list[Any], Any]]) -> None:
    """Put `None` (no extra state: what local modules hold, and what TE modules accept
    outside FP8) where `missing_extra_states` removed an object, so a strict
    `load_state_dict` finds every key."""
    for path, key in removed:
        d = loaded
        for p in path:
            d = d[p]
        d[key] = None
