"""The student's training state (model, optimizer, LR schedule) as one dist_checkpointing
folder that resumes at another parallel layout.

    save_training_state(chunks, optimizer, scheduler, "ckpt/step_00000020/mcore")
    ...  # later, possibly at another TP/PP/EP/DP layout
    load_training_state(chunks, optimizer, scheduler, "ckpt/step_00000020/mcore")

Collective: every rank calls both. The folder holds (megatron-core torch_dist format):

- the model: `model.sharded_state_dict()`, keyed by megatron-core's global tensor names (the
  same keys as `convert.mcore` checkpoints: saved with `model_cfg`, the folder also gets
  `mopd_model.json`, and `load_mcore_checkpoint` and `mopd convert mcore-to-hf` read its
  model part);
- the optimizer: Adam's moments (and fp32 main parameters with bf16/fp16 models). With the
  distributed optimizer they are saved `fully_reshardable` by default (in model space,
  gathered over DP at save, each rank reading its shard's whole state and keeping its
  slice at load), the one distributed-optimizer format that reshards over TP/PP/EP as well
  as DP, or `dp_reshardable` (`checkpoint.optimizer_format`: megatron's buckets, each rank
  reading its own part in place; resumes only at the saved TP/PP/EP, which is checked);
  without it, per-parameter tensors of the model's shapes, which reshard natively;
- the LR scheduler's state and a small description, as common (rank-0) state.

torch's Adam (used when neither Apex nor Transformer Engine is installed, e.g. on CPU) keeps a
per-parameter `step` tensor, which megatron-core 0.16.1 handles in three wrong ways, all
worked around here: its distributed optimizer expects it to exist (an optimizer that has not
stepped yet gets the state a first step creates), its fully_reshardable load copies it from
a checkpoint that does not hold it (KeyError 'step'), and its `load_state_dict` gives every
parameter the same step tensor, which Adam then increments once per parameter (wrong bias
correction after a resume). See `load_optimizer_state`.

What is *not* here, because the run-level checkpoint (`run.py` with `checkpoint.py`) saves it
beside this folder: the step counter, RNG states, data position, rollout weight version.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron_mopd.config import ModelConfig
from megatron_mopd.errors import UserError

STATE_VERSION = 1
# how the distributed optimizer's state is saved (`checkpoint.optimizer_format`):
# fully_reshardable resumes at any layout; dp_reshardable only at the saved TP/PP/EP, but
# loads without a full-size copy of the state
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")


def sharding_metadata(optimizer_format: str = "fully_reshardable") -> dict[str, Any]:
    """megatron-core's sharding metadata for `optimizer_format`, plus, without CUDA, the
    memory-efficient variant of `fully_reshardable` (gathers over DP with gloo to DP rank 0;
    the default all-gathers with `.cuda()` tensors). Both variants write interchangeable
    checkpoints."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format {optimizer_format!r} is not one of {OPTIMIZER_FORMATS}")
    meta = {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}
    if optimizer_format == "fully_reshardable" and not torch.cuda.is_available():
        meta["distrib_optim_fully_reshardable_mem_efficient"] = True
    return meta


def _model_layout() -> list[int]:
    """[TP, PP, EP, expert TP] of this process (what a dp_reshardable state is tied to)."""
    from megatron.core import parallel_state as ps

    return [
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    ]


def _megatron_optimizers(optimizer: Any) -> list[Any]:
    """The megatron optimizers inside a (possibly chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _uses_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _megatron_optimizers(optimizer))


def ensure_optimizer_state(optimizer: Any) -> None:
    """Give every parameter of a not-yet-stepped optimizer the state a first step would
    create (zero moments, step 0), which megatron's checkpointing expects to exist.

    Equivalent to a fresh optimizer: torch's Adam starts from exactly these values.
    """
    for opt in _megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        init = getattr(opt, "init_state_fn", None)
        if init is not None and any(
            len(inner.state[p]) == 0 for g in inner.param_groups for p in g["params"]
        ):
            init(inner, getattr(opt, "config", None))
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if state and "step" not in state:
                        state["step"] = torch.tensor(0.0, dtype=torch.float32)


def optimizer_step(optimizer: Any) -> int | None:
    """Adam's step count (the same for every parameter), or None before the first step."""
    for opt in _megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state:
                return int(state["step"])
        for group in inner.param_groups:
            if group.get("step") is not None:
                return int(group["step"])
    return None


def _grad_scaler_state(optimizer: Any) -> dict | None:
    for opt in _megatron_optimizers(optimizer):
        if getattr(opt, "grad_scaler", None) is not None:
            return opt.grad_scaler.state_dict()
    return None


def load_optimizer_state(optimizer: Any, state_dict: Any, info: dict[str, Any]) -> None:
    """Load a (possibly chained) optimizer from a loaded training state.

    `state_dict` is the loaded `optimizer` entry; `info` the saved `mopd_state` (step count,
    grad scaler, number of optimizers). The distributed optimizer is loaded at any layout:
    the tensors come from the `fully_reshardable` parameter state (requested in this
    layout's structure), and the rest (param groups) from this optimizer's own
    configuration with the saved step count. Two reasons not to use megatron's
    `load_state_dict` as is (megatron-core 0.16.1): the number of optimizers differs across
    layouts (expert parameters get their own optimizer only when EP > 1), so the saved
    param groups do not always match; and with torch's Adam,
    `load_parameter_state_from_fully_reshardable` copies every entry of the torch state,
    including the `step` the checkpoint does not hold (KeyError 'step'), so the steps are
    set aside while the parameter state loads (and then given one tensor per parameter:
    megatron's `load_state_dict` shares one, which torch's Adam would increment once per
    parameter on every step). Without the distributed optimizer, megatron's
    own `load_state_dict` is used; it needs the same number of optimizers as when saved.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = _megatron_optimizers(optimizer)
    parts = (
        [state_dict] if len(optimizers) == 1 else [state_dict[i] for i in range(len(optimizers))]
    )
    if not all(isinstance(o, DistributedOptimizer) for o in optimizers):
        if info.get("num_optimizers") != len(optimizers):
            raise UserError(
                f"the optimizer state was saved with {info.get('num_optimizers')} optimizer(s) "
                f"(expert parameters get their own when EP > 1), this layout has "
                f"{len(optimizers)}: resume across EP=1 and EP>1 with "
                "parallel.use_distributed_optimizer=true"
            )
        optimizer.load_state_dict(state_dict)
        return
    step = info.get("optimizer_step")
    for opt, part in zip(optimizers, parts):
        kind = part.get("param_state_sharding_type", "fully_reshardable")
        if kind not in OPTIMIZER_FORMATS:
            raise UserError(
                f"optimizer state saved as {kind!r}; supported: {', '.join(OPTIMIZER_FORMATS)}"
            )
        own = opt.state_dict()
        for group in own["optimizer"]["param_groups"]:
            if step is not None:
                group["step"] = step
        if info.get("grad_scaler") is not None and opt.grad_scaler is not None:
            own["grad_scaler"] = info["grad_scaler"]
        opt.load_state_dict(own)  # param groups and step; allocates the state
        inner = opt.optimizer
        steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
        try:
            if kind == "dp_reshardable":
                # not under no_grad in megatron-core 0.16.1: with fp32 parameters (their own
                # main parameters) the copy into a leaf that requires grad fails
                with torch.no_grad():
                    opt.load_parameter_state_from_dp_reshardable(part["param_state"])
            else:
                opt.load_parameter_state_from_fully_reshardable(part["param_state"])
        finally:
            for p, value in steps.items():
                # megatron gives every parameter the *same* step tensor, which torch's Adam
                # then increments once per parameter: each gets its own copy
                inner.state[p]["step"] = value.clone() if torch.is_tensor(value) else value


def _check_resumable_layout(info: dict[str, Any], in_dir: str) -> None:
    """A dp_reshardable optimizer state resumes only at the TP/PP/EP it was saved at."""
    if not info.get("distributed_optimizer") or info.get("optimizer_format") != "dp_reshardable":
        return
    layout = _model_layout()
    if info.get("model_layout") == layout:
        return
    names = ("TP", "PP", "EP", "expert TP")
    saved = " ".join(f"{n}{v}" for n, v in zip(names, info.get("model_layout") or []))
    now = " ".join(f"{n}{v}" for n, v in zip(names, layout))
    raise UserError(
        f"training checkpoint {in_dir}: its optimizer state was saved with "
        f"checkpoint.optimizer_format=dp_reshardable at {saved}, which resumes only at "
        f"that layout; this run is {now}. Resume at the saved layout (then save with "
        "checkpoint.optimizer_format=fully_reshardable to change it)"
    )


def training_sharded_state_dict(
    model_chunks: list[Any],
    optimizer: Any,
    scheduler: Any,
    is_loading: bool,
    optimizer_format: str = "fully_reshardable",
    layer_spec: str | None = None,
) -> dict[str, Any]:
    """The sharded state dict saved by `save_training_state` (model, optimizer, scheduler),
    keyed by the names of `layer_spec` (`convert.layer_specs`; default: the model's own),
    the optimizer's keys following the model's."""
    from megatron_mopd.convert.dist_ckpt import model_sharded_state_dict

    state: dict[str, Any] = model_sharded_state_dict(model_chunks, layer_spec)
    model_part = dict(state)
    info: dict[str, Any] = {
        "version": STATE_VERSION,
        "optimizer": optimizer is not None,
        "scheduler": scheduler is not None,
    }
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        info.update(
            num_optimizers=len(_megatron_optimizers(optimizer)),
            distributed_optimizer=_uses_distributed_optimizer(optimizer),
            optimizer_step=optimizer_step(optimizer),
            grad_scaler=_grad_scaler_state(optimizer),
            optimizer_format=optimizer_format,
            model_layout=_model_layout(),
        )
        state["optimizer"] = optimizer.sharded_state_dict(
            model_part, is_loading=is_loading, metadata=sharding_metadata(optimizer_format)
        )
    state["mopd_state"] = info
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def save_training_state(
    model_chunks: list[Any],
    optimizer: Any,
    scheduler: Any,
    out_dir: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    optimizer_format: str = "fully_reshardable",
    layer_spec: str | None = None,
) -> None:
    """Save model, optimizer and LR scheduler to `out_dir` (collective; every rank calls it).

    `optimizer_format` (`checkpoint.optimizer_format`) is how the distributed optimizer's
    state is written: `fully_reshardable` resumes at any TP/PP/EP/DP layout, but each rank
    then reads the whole optimizer state of its model shard into new tensors (a transient
    of the full fp32 state: ~7x the bf16 weights of the shard, tools/bench_resume.py);
    `dp_reshardable` is megatron's bucket layout: each rank reads only its own part, in
    place, and the state resumes only at the saved TP/PP/EP (at any DP size: tested from
    DP2 to DP1).

    `out_dir` must be empty or absent; the run-level checkpoint manager publishes the
    enclosing folder atomically (`checkpoint.CheckpointManager.save`). `optimizer` and
    `scheduler` may be None (model only). With `model_cfg`, the folder also gets
    `mopd_model.json`, which makes it a Megatron checkpoint that
    `convert.mcore.load_mcore_checkpoint` and `mopd convert mcore-to-hf --tokenizer DIR` read
    (the model part). `layer_spec`: save under that layer spec's tensor names instead of
    the model's own (`convert.layer_specs`; resumes under either spec).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_mopd.convert.dist_ckpt import dist_checkpointing_io
    from megatron_mopd.convert.mcore import write_mcore_description

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    from megatron_mopd.convert.layer_specs import model_spec

    spec = layer_spec or model_spec(model_chunks[0])
    state = training_sharded_state_dict(
        model_chunks,
        optimizer,
        scheduler,
        is_loading=False,
        optimizer_format=optimizer_format,
        layer_spec=spec,
    )
    with dist_checkpointing_io():
        dist_checkpointing.save(state, out_dir)  # ends with a barrier
    if model_cfg is not None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            write_mcore_description(out_dir, model_cfg, layer_spec=spec)
        if dist.is_initialized():
            dist.barrier()


def load_training_state(
    model_chunks: list[Any], optimizer: Any, scheduler: Any, in_dir: str | os.PathLike
) -> None:
    """Load what `save_training_state` wrote into freshly built chunks/optimizer/scheduler,
    at any layout (collective). The optimizer and scheduler are loaded only when given.

    The scheduler must be configured as when it was saved (peak and minimum LR, warmup,
    decay): a difference raises `UserError`; its step count is the checkpoint's.
    """
    in_dir = os.fspath(in_dir)
    if not os.path.isdir(in_dir):
        raise UserError(f"training checkpoint {in_dir}: no such directory")
    if not os.path.isfile(os.path.join(in_dir, "metadata.json")):
        raise UserError(
            f"training checkpoint {in_dir}: no metadata.json (a partial checkpoint: the save "
            "did not finish)"
        )
    from megatron.core import dist_checkpointing

    from megatron_mopd.convert import layer_specs
    from megatron_mopd.convert.dist_ckpt import (
        checkpoint_layer_spec,
        dist_checkpointing_io,
        load_error_text,
        load_errors,
        load_model_state,
        merge_in_place,
    )

    common = dist_checkpointing.load_common_state_dict(in_dir)
    info = common.get("mopd_state") or {}
    if info.get("version") != STATE_VERSION:
        raise UserError(
            f"training checkpoint {in_dir}: not a megatron_mopd training state "
            f"(version {info.get('version')!r}, expected {STATE_VERSION})"
        )
    if optimizer is not None and not info.get("optimizer"):
        raise UserError(f"training checkpoint {in_dir}: saved without optimizer state")
    if scheduler is not None and not info.get("scheduler"):
        raise UserError(f"training checkpoint {in_dir}: saved without LR scheduler state")

    saved_format = info.get("optimizer_format", "fully_reshardable")
    if optimizer is not None and _uses_distributed_optimizer(optimizer):
        _check_resumable_layout(info, in_dir)
    # the checkpoint's layer-spec names (local or TE; the optimizer's keys follow the model's)
    spec, stored = checkpoint_layer_spec(model_chunks, in_dir)
    state = training_sharded_state_dict(
        model_chunks,
        optimizer,
        scheduler,
        is_loading=True,
        optimizer_format=saved_format,
        layer_spec=spec,
    )
    skipped = layer_specs.missing_extra_states(state, stored)
    merge_in_place(state)  # fused fc1 halves: no concatenated copy of every expert's fc1
    try:
        with dist_checkpointing_io():
            loaded = dist_checkpointing.load(state, in_dir)
    except load_errors() as e:
        raise UserError(
            f"training checkpoint {in_dir}: does not fit this model: {load_error_text(e)}"
        ) from None
    layer_specs.fill_extra_states(loaded, skipped)
    load_model_state(model_chunks, loaded)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"], info)
    if scheduler is not None:
        scheduler.num_steps = 0  # load_state_dict steps forward by the saved count
        try:
            scheduler.load_state_dict(loaded["scheduler"])
        except AssertionError as e:
            raise UserError(
                f"training checkpoint {in_dir}: the LR schedule differs from the saved one ({e}); "
                "resume with the same train.lr / min_lr / lr_warmup_steps / max_steps"
            ) from None
