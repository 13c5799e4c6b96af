"""Build the student and fill it: from a Hugging Face folder, or randomly from the config.

    layout = init_distributed(cfg.parallel, ...)
    chunks, model_cfg = build_student(cfg.model, cfg.parallel)

With `model.hf_path` the architecture comes from the folder's `config.json` (the config's
own architecture fields are placeholders then) and the weights from its safetensors,
each rank reading only its shards (`convert.hf`). Left out for now: `model.mcore_path`
(a Megatron checkpoint written by `mopd convert hf-to-mcore`); it raises a clear error.
"""

from __future__ import annotations

from typing import Any

from megatron_mopd.config import ModelConfig, ParallelConfig, check_layout
from megatron_mopd.errors import UserError


def resolve_model_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> ModelConfig:
    """The model config with the real architecture filled in (from `hf_path` when set),
    checked against the parallel layout. Cheap: reads `config.json` only, so callers can
    run it before any process group exists."""
    from megatron_mopd.convert.hf_config import model_config_from_hf

    if model_cfg.hf_path:
        resolved = model_config_from_hf(model_cfg.hf_path, base=model_cfg)
    elif model_cfg.mcore_path:
        raise UserError(
            f"model.mcore_path={model_cfg.mcore_path}: loading Megatron checkpoints is not "
            "implemented yet; use model.hf_path"
        )
    else:
        resolved = model_cfg
    check_layout(resolved, parallel_cfg)
    return resolved


def build_student(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig
) -> tuple[list[Any], ModelConfig]:
    """Build this rank's model chunks and return them with the resolved model config.

    With `model_cfg.hf_path`: the architecture is read from HF (parallel, dtype and
    implementation fields kept from `model_cfg`), the layout re-checked against it, and
    the HF weights loaded (collective: every rank calls this). Otherwise the model is
    initialised randomly from `model_cfg` (layout independent, seeded by `model.seed`).
    Needs `distributed.init_distributed` first.
    """
    from megatron_mopd.student.model import build_model

    resolved = resolve_model_config(model_cfg, parallel_cfg)
    if resolved.hf_path:
        from megatron_mopd.convert.hf import load_hf_weights

        chunks = build_model(resolved, parallel_cfg, init_params=False)
        load_hf_weights(chunks, resolved.hf_path, resolved)
    else:
        chunks = build_model(resolved, parallel_cfg)
    return chunks, resolved
