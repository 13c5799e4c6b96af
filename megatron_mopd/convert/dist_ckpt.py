"""megatron-core `dist_checkpointing` plumbing shared by Megatron checkpoints
(`convert.mcore`) and training states (`student.state`): the model's sharded state dict and
its strict load, the in-place merge of tensor factories, the CPU context of every save and
load, and the errors a load that does not fit raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def dist_checkpointing_io() -> Iterator[None]:
    """The context of every (synchronous) dist_checkpointing save and load here.

    - Without CUDA, the project's megatron-core patches are applied (idempotent): the
      torch_dist save calls `torch.cuda.synchronize()` and builds flags on the current
      CUDA device (`cpu_torch_namespace` covers both).
    - The writer collects its results through a queue that megatron-core creates, on first
      use, as `multiprocessing.get_context("spawn").Manager().Queue()`: a server process
      that re-imports the `__main__` module (~5-20 s on a 2-core machine, once per process).
      A synchronous save fills and reads that queue in this process only, so a plain
      `queue.Queue` is given for the duration instead.
    """
    import importlib
    import queue

    if not torch.cuda.is_available():
        from megatron_mopd.patches import megatron_core

        megatron_core.apply()
    writer = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    own_queue = getattr(writer, "_results_queue", "absent") is None
    if own_queue:
        writer._results_queue = queue.Queue()
    try:
        yield
    finally:
        if own_queue:
            writer._results_queue = None


# --------------------------------------------------------------------------------------
# the model's sharded state dict


def model_sharded_state_dict(
    model_chunks: list[Any], layer_spec: str | None = None
) -> dict[str, Any]:
    """The sharded state dict of the model chunks (`model`, or `model0`, `model1`, ... with
    several chunks), keyed in the checkpoint by megatron-core's global tensor names: those
    of the chunks' own layer spec, or of `layer_spec` (`local` / `transformer_engine`,
    see `convert.layer_specs`) when given."""
    from megatron_mopd.convert import layer_specs
    from megatron_mopd.convert.mapping import unwrap

    if len(model_chunks) == 1:
        sharded = {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    else:
        sharded = {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}
    if layer_spec is not None and model_chunks:
        own = layer_specs.model_spec(model_chunks[0])
        layer_specs.rename_sharded_keys(
            sharded, layer_specs.model_is_moe(model_chunks[0]), own, layer_spec
        )
    return sharded


def checkpoint_layer_spec(model_chunks: list[Any], ckpt_dir: str) -> tuple[str | None, set[str]]:
    """The layer spec whose names the checkpoint in `ckpt_dir` uses (None when the names
    do not tell: dense models), and its stored keys (read from its metadata file)."""
    from megatron_mopd.convert import layer_specs

    stored = layer_specs.checkpoint_keys(ckpt_dir)
    is_moe = bool(model_chunks) and layer_specs.model_is_moe(model_chunks[0])
    return layer_specs.spec_of_keys(stored, is_moe), stored


def merge_in_place(sharded: dict[str, Any]) -> None:
    """Make the sharded state dict's tensor factories (e.g. the experts' fused fc1, saved as
    two halves) merge without a copy.

    A factory's pieces are views into its parameter and dist_checkpointing loads into them
    in place, so the parameter already holds the merged tensor; megatron-core's merge would
    concatenate them into a new tensor (the whole model's fc1 weights held twice while
    loading). Each factory's `merge_fn` is wrapped to return the parameter itself when every
    loaded piece is a view of it, and to fall back to the original merge otherwise.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for factory in nested_values(sharded):
        if isinstance(factory, ShardedTensorFactory):
            factory.merge_fn = _merge_views(factory.merge_fn, factory.data)


def _merge_views(merge_fn: Any, data: torch.Tensor) -> Any:
    def merge(sub_state_dict: Any) -> Any:
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        parts = list(nested_values(sub_state_dict))
        base = data.untyped_storage().data_ptr()
        if parts and all(
            isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == base for t in parts
        ):
            return data
        return merge_fn(sub_state_dict)

    return merge


def load_model_state(model_chunks: list[Any], loaded: dict[str, Any]) -> None:
    """Copy a loaded `model_sharded_state_dict` into the chunks (strict: every key)."""
    from megatron_mopd.convert.mapping import unwrap

    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
        return
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)


def load_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a dist_checkpointing load raises for a folder that does not fit."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    # torch's CheckpointException derives from BaseException (it wraps each rank's error)
    return (CheckpointingException, CheckpointException, KeyError, RuntimeError, ValueError)


def load_error_text(e: BaseException) -> str:
    """One line describing a failed dist_checkpointing load (the first rank's own error for
    torch's wrapped `CheckpointException`)."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    return " ".join(str(e).split())[:500]
