"""Weight sync: push the Megatron student's new weights to the rollout engine.

    version = sync_weights(model_chunks, engine, cfg, step, model_cfg=arch)

Collective: every rank calls it after each optimizer step (the export gathers the shards
of every TP/PP/EP rank); the engine lives on the driver (global rank 0), other ranks pass
`engine=None`. Paths, by engine and `rollout.weight_sync`:

| engine | `weight_sync` | what happens |
| --- | --- | --- |
| embedded | (any) | HF-named tensors gathered to rank 0 and copied into the engine's model in memory |
| sglang | `disk` | an HF folder written atomically to `RUN_DIR/weights/step_N` (temp dir + rename), streamed one tensor at a time, then `POST /update_weights_from_disk`; older folders are removed |
| sglang | `tensor` | buckets of HF-named tensors handed over in memory (`update_weights_from_tensor`: same node; CPU shared memory here, CUDA IPC on GPUs) |
| sglang | `distributed` | buckets broadcast as flat tensors into the servers (`update_weights_from_distributed`, over the group `rollout.factory.build_rollout_engine` formed at start-up: gloo here, NCCL on GPUs) |

Buckets (`rollout.weight_sync_bucket_mb`, default 512 MiB): the export gathers one HF
tensor at a time from its TP/PP/EP shards onto rank 0 (`convert.hf.export_hf_state_dict`);
`buckets` groups them as they come and each bucket is sent before the next is gathered,
so rank 0 holds at most one bucket (plus its serialised or flattened copy), never the
whole model. A tensor larger than the bucket size is a bucket of its own.

Measured against real SGLang on CPU (`tools/bench_weight_sync.py`): see the README. For
the `disk` path the run directory must be visible to the servers (a shared filesystem).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from megatron_mopd.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from megatron_mopd.config import Config, ModelConfig
    from megatron_mopd.rollout.base import RolloutEngine


def weight_version(step: int) -> str:
    """The weight version string of the student after `step` optimizer steps."""
    return f"step_{step}"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _architecture(cfg: Config, model_cfg: ModelConfig | None) -> ModelConfig:
    if model_cfg is not None:
        return model_cfg
    from megatron_mopd.student.load import resolve_model_config

    return resolve_model_config(cfg.model, cfg.parallel)


def sync_weights(
    model_chunks: list[torch.nn.Module],
    engine: RolloutEngine | None,
    cfg: Config,
    step: int,
    model_cfg: ModelConfig | None = None,
    keep_last: int = 1,
) -> str:
    """Push the student's weights to `engine` as version `weight_version(step)`; return it.

    Collective over the default process group. `model_cfg` is the student's architecture
    (read from `model.hf_path` when not given). `keep_last` is how many exported folders
    the disk path keeps (the newest is the one the servers just loaded).
    """
    from megatron_mopd.convert.hf import export_hf_state_dict
    from megatron_mopd.rollout.embedded import EmbeddedRolloutEngine
    from megatron_mopd.rollout.engine_process import SubprocessRolloutEngine

    arch = _architecture(cfg, model_cfg)
    version = weight_version(step)
    is_driver = _rank() == 0
    if is_driver and engine is None:
        raise ValueError("sync_weights: rank 0 (the driver) must hold the rollout engine")
    # every rank decides the same path: non-driver ranks only know the config
    embedded = cfg.rollout.backend == "embedded"
    if is_driver and embedded != isinstance(
        engine, (EmbeddedRolloutEngine, SubprocessRolloutEngine)
    ):
        raise ValueError(
            f"sync_weights: rollout.backend={cfg.rollout.backend!r} but the engine is a "
            f"{type(engine).__name__}"
        )
    tensors = export_hf_state_dict(model_chunks, arch, dst=0)

    if embedded:
        # materialise before touching the engine, so every rank finishes the collective
        # export even if the engine then refuses a tensor
        named = list(tensors)
        if is_driver:
            engine.update_weights_from_state_dict(named, version)
        return version

    mode = cfg.rollout.weight_sync
    if mode == "disk":
        path = _export_folder(tensors, arch, cfg, step, is_driver)
        if is_driver:
            engine.update_weights_from_disk(path, version)
            _remove_old_exports(os.path.dirname(path), step, keep_last)
        return version
    if mode not in ("tensor", "distributed"):
        raise ConfigError(f"rollout.weight_sync={mode!r} is not supported")
    bucketed = buckets(tensors, int(cfg.rollout.weight_sync_bucket_mb * 2**20))
    if not is_driver:
        for _ in bucketed:  # take part in the collective export
            pass
        return version
    try:
        if mode == "tensor":
            send = _client_method(engine, "update_weights_from_tensor")
            send(bucketed, version, tp_size=cfg.rollout.server_tp_size)
        else:  # the group was formed at start-up (rollout.factory.build_rollout_engine)
            _client_method(engine, "update_weights_from_distributed")(bucketed, version)
    finally:
        for _ in bucketed:  # finish the collective export if the engine stopped early
            pass
    return version


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int):
    """Group `(name, tensor)` pairs, in order, into lists of at most `max_bytes` (a tensor
    larger than that alone); each list is yielded as soon as it is full, so only one is
    held at a time when `named` is a generator."""
    bucket: list = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _client_method(engine: Any, name: str):
    method = getattr(engine, name, None)
    if method is None:
        raise ConfigError(
            f"rollout.weight_sync needs {type(engine).__name__}.{name}, which this engine "
            "does not provide; use rollout.weight_sync=disk"
        )
    return method


def exports_dir(cfg: Config) -> str:
    """Where the disk path writes the exported HF folders: `RUN_DIR/weights`."""
    return os.path.join(os.path.abspath(cfg.run_dir), "weights")


def _export_folder(tensors, arch: ModelConfig, cfg: Config, step: int, is_driver: bool) -> str:
    """Write the gathered tensors as `RUN_DIR/weights/step_N` on rank 0, atomically."""
    from megatron_mopd.convert.hf import save_hf_checkpoint

    root = exports_dir(cfg)
    final = os.path.join(root, weight_version(step))
    if not is_driver:
        for _ in tensors:  # take part in the collective export
            pass
        return final
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{weight_version(step)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_dir = cfg.model.tokenizer_path or cfg.model.hf_path
    try:
        save_hf_checkpoint(tensors, arch, tmp, tokenizer_dir=tokenizer_dir)
        if os.path.exists(final):  # a re-run of this step (resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        for _ in tensors:  # finish the collective export so the other ranks do not hang
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_old_exports(root: str, current: int, keep_last: int) -> None:
    """Keep folder `step_{current}` and the `keep_last - 1` newest older ones; folders of
    later steps (left by a run this one resumed before) are stale and removed too."""
    older = []
    for name in os.listdir(root):
        if name.startswith("step_") and name[5:].isdigit():
            step = int(name[5:])
            if step > current:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            elif step < current:
                older.append(step)
    for step in sorted(older, reverse=True)[max(0, keep_last - 1) :]:
        shutil.rmtree(os.path.join(root, weight_version(step)), ignore_errors=True)
