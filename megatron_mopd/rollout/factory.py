"""Build the rollout engine the config asks for; the trainer never knows which it has."""

from __future__ import annotations

import socket

from megatron_mopd.config import Config
from megatron_mopd.errors import ConfigError
from megatron_mopd.rollout.base import RolloutEngine

# rollout.dtype -> the name transformers and SGLang's --dtype use
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def weight_sync_backend(setting: str) -> str:
    """`rollout.weight_sync_backend` resolved: `auto` is nccl with CUDA, gloo without."""
    if setting != "auto":
        return setting
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def embedded_in_subprocess(cfg: Config) -> bool:
    """`rollout.embedded_subprocess` resolved: auto = on when `rollout.overlap` is."""
    setting = cfg.rollout.embedded_subprocess
    return setting == "on" or (setting == "auto" and cfg.rollout.overlap)


def build_rollout_engine(cfg: Config, hf_path: str | None = None) -> RolloutEngine:
    """The engine of `rollout.backend`, imported lazily.

    `embedded` loads the student from `hf_path` (default `model.hf_path`): a student built
    from a Megatron checkpoint or at random must first be exported to an HF folder (see
    `weight_sync`), whose path is passed here. `sglang` talks to `rollout.urls`; with
    `rollout.weight_sync=distributed` it also forms the weight-update group with the
    servers (`rollout.weight_sync_backend`).
    """
    if cfg.rollout.backend == "embedded":
        from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine

        path = hf_path or cfg.model.hf_path
        if not path:
            raise ConfigError(
                "rollout.backend=embedded needs the student as a Hugging Face folder: set "
                "model.hf_path, or export the student and pass its folder"
            )
        kwargs = {
            "hf_path": path,
            "seed": cfg.train.seed,
            "dtype": HF_DTYPES[cfg.rollout.dtype],
            "batch_size": cfg.rollout.batch_size,
        }
        if embedded_in_subprocess(cfg):
            from megatron_mopd.rollout.engine_process import SubprocessRolloutEngine

            return SubprocessRolloutEngine(kwargs, timeout_seconds=cfg.rollout.timeout_seconds)
        return EmbeddedRolloutEngine(**kwargs)
    if cfg.rollout.backend == "sglang":
        from megatron_mopd.rollout.sglang import SGLangRolloutEngine

        # routed experts only with routing replay: the servers need a flag for them
        engine = SGLangRolloutEngine(cfg.rollout, return_routed_experts=cfg.loss.routing_replay)
        try:
            engine.check_dtype(cfg.rollout.dtype)
        except BaseException:
            engine.close()
            raise
        if cfg.rollout.weight_sync == "distributed":
            # the servers join the broadcast group now, once (gloo: tested against real
            # SGLang on CPU; NCCL: GPU clusters, untested here)
            rc = cfg.rollout
            try:
                engine.init_weights_update_group(
                    rc.weight_sync_address or socket.getfqdn(),
                    rc.weight_sync_port,
                    ranks_per_server=rc.server_tp_size,
                    backend=weight_sync_backend(rc.weight_sync_backend),
                )
            except BaseException:
                engine.close()
                raise
        return engine
    raise ConfigError(f"rollout.backend={cfg.rollout.backend!r} is not supported")
