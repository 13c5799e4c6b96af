"""Build the student and fill it: from a Hugging Face folder, or randomly from the config.

    layout = init_distributed(cfg.parallel, ...)
    chunks, model_cfg = build_student(cfg.model, cfg.parallel)

With `model.hf_path` the architecture comes from the folder's `config.json` (the config's
own architecture fields are placeholders then) and the weights from its safetensors,
each rank reading only its shards (`convert.hf`). With `model.mcore_path` (a Megatron
checkpoint written by `mopd convert hf-to-mcore`) both come from that folder
(`convert.mcore`). Otherwise the config's fields define a randomly initialised model.
"""

from __future__ import annotations

from typing import Any

from megatron_mopd.config import ModelConfig, ParallelConfig, check_layout


def resolve_model_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> ModelConfig:
    """The model config with the real architecture filled in (from `hf_path` or
    `mcore_path` when set), checked against the parallel layout. Cheap: reads the folder's
    JSON only, so callers can run it before any process group exists."""
    if model_cfg.hf_path:
        from megatron_mopd.convert.hf_config import model_config_from_hf

        resolved = model_config_from_hf(model_cfg.hf_path, base=model_cfg)
    elif model_cfg.mcore_path:
        from megatron_mopd.convert.mcore import read_mcore_config

        resolved = read_mcore_config(model_cfg.mcore_path, base=model_cfg)
    else:
        resolved = model_cfg
    check_layout(resolved, parallel_cfg)  # any vocabulary: build_model pads it
    return resolved


def build_student(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig
) -> tuple[list[Any], ModelConfig]:
    """Build this rank's model chunks and return them with the resolved model config.

    With `model_cfg.hf_path` (or `mcore_path`): the architecture is read from that folder
    (dtype, implementation and seed kept from `model_cfg`), the layout re-checked against
    it, and the weights loaded (collective: every rank calls this). Otherwise the model is
    initialised randomly from `model_cfg` (layout independent, seeded by `model.seed`).
    Needs `distributed.init_distributed` first.
    """
    from megatron_mopd.student.model import build_model

    resolved = resolve_model_config(model_cfg, parallel_cfg)
    if resolved.hf_path:
        from megatron_mopd.convert.hf import load_hf_weights

        chunks = build_model(resolved, parallel_cfg, init_params=False)
        load_hf_weights(chunks, resolved.hf_path, resolved)
    elif resolved.mcore_path:
        from megatron_mopd.convert.mcore import load_mcore_checkpoint

        chunks = build_model(resolved, parallel_cfg, init_params=False)
        load_mcore_checkpoint(chunks, resolved.mcore_path)
    else:
        chunks = build_model(resolved, parallel_cfg)
    return chunks, resolved
