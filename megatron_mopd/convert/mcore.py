"""Megatron checkpoints: megatron-core `dist_checkpointing` (torch_dist) folders that load at
any parallel layout, and the HF <-> Megatron conversions built on them.

    hf_to_mcore("Qwen3-30B-A3B", "q3.mcore")                      # one process, or torchrun
    chunks = build_model(read_mcore_config("q3.mcore"), parallel, init_params=False)
    load_mcore_checkpoint(chunks, "q3.mcore")                     # any TP/PP/EP/ETP layout
    mcore_to_hf("q3.mcore", "q3.hf", dtype="bf16")                # back to an SGLang folder

A Megatron checkpoint folder (`MCORE_DIR`) holds:

    metadata.json, .metadata, common.pt, __*_*.distcp   dist_checkpointing, torch_dist format:
                                                        every tensor stored once, by global key
    mopd_model.json      the architecture (`ModelConfig` fields), the layout it was saved at,
                         the dtype, and the size of every checkpoint file (a partial copy is
                         detected before anything is loaded)
    config.json          the source model's HF config (token ids and the other fields HF
                         needs, so `mcore_to_hf` writes an equivalent one)
    tokenizer.json ...   the source model's tokenizer files, so `mopd convert mcore-to-hf`
                         and `mopd logprobs --mcore` need nothing else

The tensors are keyed by megatron-core's own global names (`decoder.layers.self_attention.
linear_qkv.weight`, stacked over layers and experts), so any layout reads the slices it needs
("resharding on load"); the conversion to HF names happens only in `convert.hf`. Folders are
written under a temporary name and renamed when complete.

Memory (one process, measured by `tools/bench_convert.py`): `hf_to_mcore` holds the model
once plus, while `convert.hf` reads the safetensors through mmap, the pages it touched;
`mcore_to_hf` holds the model and streams each tensor into its safetensors file
(`convert.hf.SafetensorsStreamWriter`); the experts' fused `linear_fc1` halves load in place
(`dist_ckpt.merge_in_place`). Under torchrun each rank holds its shards.

Layer specs: the local spec (CPU) and the Transformer Engine spec (GPU) store the same keys
except the pre-MLP norm of MoE layers (`decoder.layers.mlp.linear_fc1.layer_norm_weight`
local, `decoder.layers.pre_mlp_layernorm.weight` TE; see `convert.layer_specs`). A save
writes the model's own names, or another spec's (`layer_spec=`, `mopd convert hf-to-mcore
--transformer-impl`); a load reads the names from the checkpoint's metadata and renames the
model's keys to match, and skips `_extra_state` objects the checkpoint lacks. Tested on CPU
by renaming the keys of local-spec models (TE itself cannot be built here).

Vocabulary padding: the embedding and output layer are stored with the rows the model had
at save time (`model.vocab_size` rounded up to `make_vocab_size_divisible_by * TP`, recorded
as `saved_layout.padded_vocab_size`); `mopd_model.json` records the real vocabulary. A load
at another padding (another TP) reads the rows it needs: megatron-core marks those two
tensors `allow_shape_mismatch`, so rows beyond the stored ones start at zero and stored rows
beyond the model's are not read. Only padding rows differ, so nothing real is lost.

Left out: virtual pipeline stages (several chunks per rank) are handled by the format
(`model0`, `model1`, ...) but not exercised. Async saves are not used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_mopd.config import ModelConfig, ParallelConfig, check_layout, check_world_size
from megatron_mopd.convert.dist_ckpt import (
    checkpoint_layer_spec,
    dist_checkpointing_io,
    load_error_text,
    load_errors,
    load_model_state,
    merge_in_place,
    model_sharded_state_dict,
)
from megatron_mopd.errors import ConfigError, UserError

MODEL_FILE = "mopd_model.json"
FORMAT = "megatron_mopd.mcore"
FORMAT_VERSION = 1
# a folder "has a tokenizer" when it holds one of these (tokenizer_config.json alone is not one)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")
# what `mcore_to_hf` writes per safetensors shard at most (the peak memory above the model)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _arch_fields() -> tuple[str, ...]:
    """ModelConfig fields stored in mopd_model.json: the architecture (`convert.hf_config`'s
    list, plus the router's scaling factor, which changes the computation)."""
    from megatron_mopd.convert.hf_config import ARCH_FIELDS

    return tuple(ARCH_FIELDS) + ("moe_router_topk_scaling_factor",)


# --------------------------------------------------------------------------------------
# small collective helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and give its result to every rank; a `UserError` raised there is
    raised on every rank (so no rank waits in a collective for one that gave up)."""
    rank, world = _rank_world()
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [("ok", fn())]
        except UserError as e:
            payload = [("error", str(e))]
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise UserError(value)
    return value


def _all_ok(error: str | None) -> None:
    """Raise on every rank if any rank hit an error (the first one's message)."""
    _, world = _rank_world()
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)


# --------------------------------------------------------------------------------------
# the folder: checks and metadata


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """True when `folder` holds tokenizer files (`tokenizer.json`, `.model` or `vocab.json`)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_MARKERS)


def _require_tokenizer(folder: str, what: str) -> None:
    if not has_tokenizer(folder):
        raise UserError(
            f"{folder}: no tokenizer ({what} needs one of {', '.join(TOKENIZER_MARKERS)}); "
            "copy the model's tokenizer files there or pass --tokenizer DIR"
        )


def _check_new_folder(path: str, flag: str) -> None:
    """`UserError` unless `path` can be created: absent (or an empty folder) under a
    writable folder (missing parent folders are created)."""
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"{flag} {path}: exists and is not empty; choose a new folder or remove it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is not a folder")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
        raise UserError(f"{flag} {path}: cannot create it ({ancestor} is not a writable folder)")


def _tmp_name(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-mopd")


def _checkpoint_files(folder: str) -> dict[str, int]:
    """The dist_checkpointing files of `folder` with their sizes."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name in ("metadata.json", "common.pt", ".metadata") or name.endswith(".distcp"):
            out[name] = os.path.getsize(os.path.join(folder, name))
    return out


def read_mcore_metadata(mcore_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `mopd_model.json` of a Megatron checkpoint folder, after checking that the
    folder is complete; a `UserError` naming the path and the problem otherwise (missing
    folder, not a checkpoint, a save that did not finish, a missing or truncated file)."""
    mcore_dir = os.fspath(mcore_dir)
    if not os.path.exists(mcore_dir):
        tmp = _tmp_name(mcore_dir)
        hint = f" ({tmp} exists: a conversion did not finish)" if os.path.exists(tmp) else ""
        raise UserError(f"Megatron checkpoint {mcore_dir}: no such directory{hint}")
    if not os.path.isdir(mcore_dir):
        raise UserError(f"Megatron checkpoint {mcore_dir}: not a directory")
    path = os.path.join(mcore_dir, MODEL_FILE)
    found = sorted(os.listdir(mcore_dir))
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(mcore_dir, "model.safetensors")) or os.path.isfile(
            os.path.join(mcore_dir, "model.safetensors.index.json")
        ):
            raise UserError(
                f"Megatron checkpoint {mcore_dir}: this is a Hugging Face folder, not a "
                "Megatron checkpoint (convert it with `mopd convert hf-to-mcore`)"
            )
        raise UserError(
            f"Megatron checkpoint {mcore_dir}: no {MODEL_FILE} (not written by `mopd convert "
            f"hf-to-mcore`, or the save did not finish); the folder holds {found[:8] or 'nothing'}"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"{path}: not a megatron_mopd checkpoint description (no format={FORMAT!r})"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {meta.get('version')} is not supported "
            f"(this megatron_mopd reads version {FORMAT_VERSION})"
        )
    if not os.path.isfile(os.path.join(mcore_dir, "metadata.json")):
        raise UserError(
            f"Megatron checkpoint {mcore_dir}: no metadata.json (a partial checkpoint: the "
            "dist_checkpointing save did not finish)"
        )
    for name, size in (meta.get("files") or {}).items():
        full = os.path.join(mcore_dir, name)
        if not os.path.isfile(full):
            raise UserError(f"Megatron checkpoint {mcore_dir}: {name} is missing (partial copy?)")
        if os.path.getsize(full) != size:
            raise UserError(
                f"Megatron checkpoint {mcore_dir}: {name} has {os.path.getsize(full)} bytes, "
                f"expected {size} (truncated or partial copy?)"
            )
    return meta


def read_mcore_config(mcore_dir: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    """The architecture of the Megatron checkpoint in `mcore_dir` as a `ModelConfig`.

    Architecture fields come from `mopd_model.json`; every other field (dtype, implementation,
    dispatcher, seed) is kept from `base` (without `base`: defaults, and the checkpoint's
    dtype). `mcore_path` is set to the folder, `hf_path` cleared, and `tokenizer_path` set to
    the folder when it holds a tokenizer (unless `base` names one). Cheap: reads JSON only.
    Raises `UserError` for a missing, partial or foreign folder (see `read_mcore_metadata`).
    """
    mcore_dir = os.fspath(mcore_dir)
    meta = read_mcore_metadata(mcore_dir)
    model = meta.get("model")
    if not isinstance(model, dict):
        raise UserError(f'{os.path.join(mcore_dir, MODEL_FILE)}: no "model" section')
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise UserError(
            f"{os.path.join(mcore_dir, MODEL_FILE)}: unknown model fields {unknown} (written by "
            "a newer megatron_mopd?)"
        )
    values = {k: v for k, v in model.items() if k in _arch_fields()}
    if base is None:
        base = ModelConfig(params_dtype=meta.get("params_dtype", "fp32"))
    tokenizer = base.tokenizer_path or (mcore_dir if has_tokenizer(mcore_dir) else None)
    cfg = dataclasses.replace(
        base, hf_path=None, mcore_path=mcore_dir, tokenizer_path=tokenizer, **values
    )
    try:
        cfg.validate("model")
    except ConfigError as e:
        raise UserError(f"{os.path.join(mcore_dir, MODEL_FILE)}: {e}") from None
    return cfg


def _model_meta(
    model_cfg: ModelConfig, files: dict[str, int], source: str | None, layer_spec: str | None
) -> dict:
    import megatron.core
    from megatron.core import parallel_state as ps

    from megatron_mopd.student.model import padded_vocab_size

    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        # informational: loads read the names from the checkpoint's own metadata
        "layer_spec": layer_spec,
        "model": {k: getattr(model_cfg, k) for k in _arch_fields()},
        "params_dtype": model_cfg.params_dtype,
        "saved_layout": {
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(),
            "world_size": _rank_world()[1],
            # the embedding / output rows stored (Megatron's padding at the save layout;
            # a load at another padding reads the real rows, see module docstring)
            "padded_vocab_size": padded_vocab_size(
                model_cfg, ps.get_tensor_model_parallel_world_size()
            ),
        },
        "source": source,
        "megatron_core": getattr(megatron.core, "__version__", None),
        "files": files,
    }


def write_mcore_description(
    folder: str | os.PathLike,
    model_cfg: ModelConfig,
    source: str | None = None,
    layer_spec: str | None = None,
) -> None:
    """Write `mopd_model.json` into a folder where a dist_checkpointing save has just
    finished (call it on one rank, after the save): the architecture, the layout, and the
    size of every checkpoint file. With it the folder is a Megatron checkpoint that
    `read_mcore_config`, `load_mcore_checkpoint` and `mopd convert mcore-to-hf` accept."""
    folder = os.fspath(folder)
    meta = _model_meta(model_cfg, _checkpoint_files(folder), source, layer_spec)
    _write_json(os.path.join(folder, MODEL_FILE), meta)


def _copy_hf_side_files(src: str | None, tokenizer_dir: str | None, dst: str) -> None:
    """Copy the HF config and tokenizer files next to the checkpoint."""
    from megatron_mopd.convert.hf import TOKENIZER_FILES

    if src and os.path.isfile(os.path.join(src, "config.json")):
        shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    tok = tokenizer_dir or src
    if tok:
        for name in TOKENIZER_FILES:
            path = os.path.join(tok, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(dst, name))


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# save / load


def save_mcore_checkpoint(
    model_chunks: list[Any],
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike,
    hf_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    layer_spec: str | None = None,
) -> str:
    """Save the model as a Megatron checkpoint folder that loads at any layout; return it.

    Collective (every rank of the layout calls it). Writes dist_checkpointing's torch_dist
    files of `model.sharded_state_dict()` plus `mopd_model.json` (the architecture of
    `model_cfg`), and copies `config.json` and the tokenizer files of `hf_dir` (default
    `model_cfg.hf_path`; tokenizer from `tokenizer_dir` when given). Everything is written
    under a temporary name and renamed when complete, so `out_dir` is never partial. Raises
    `UserError` (on every rank) when `out_dir` exists and is not empty. `layer_spec`
    (`local` / `transformer_engine`): write that spec's tensor names instead of the model's
    own (`convert.layer_specs`); either loads under both specs.
    """
    from megatron.core import dist_checkpointing

    from megatron_mopd.convert import layer_specs

    out_dir = os.path.abspath(os.fspath(out_dir))
    src = os.fspath(hf_dir) if hf_dir is not None else model_cfg.hf_path
    tok = os.fspath(tokenizer_dir) if tokenizer_dir is not None else None
    tmp = _tmp_name(out_dir)

    def prepare() -> None:
        _check_new_folder(out_dir, "output")
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that did not finish
        os.makedirs(tmp)

    _on_rank0(prepare)
    spec = layer_spec or layer_specs.model_spec(model_chunks[0])
    with dist_checkpointing_io():
        dist_checkpointing.save(model_sharded_state_dict(model_chunks, spec), tmp)

    def publish() -> None:
        _copy_hf_side_files(src, tok, tmp)
        write_mcore_description(tmp, model_cfg, source=src, layer_spec=spec)
        if os.path.isdir(out_dir):  # an empty folder given as the destination
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)

    _on_rank0(publish)
    return out_dir


def load_mcore_checkpoint(model_chunks: list[Any], mcore_dir: str | os.PathLike) -> None:
    """Fill this rank's model chunks from the Megatron checkpoint in `mcore_dir`.

    Collective. Works at any TP/PP/EP/ETP layout whatever layout the checkpoint was saved at
    (each rank reads the slices its parameters need). Also reads the model part of a
    training checkpoint saved with its `model_cfg` (`student.state.save_training_state`).
    Raises `UserError` for a missing or partial folder, or one whose tensors do not fit the
    model.
    """
    from megatron.core import dist_checkpointing

    from megatron_mopd.convert import layer_specs

    mcore_dir = os.fspath(mcore_dir)
    read_mcore_metadata(mcore_dir)  # every rank sees the same shared folder
    spec, stored = checkpoint_layer_spec(model_chunks, mcore_dir)
    sharded = model_sharded_state_dict(model_chunks, spec)  # the checkpoint's names
    skipped = layer_specs.missing_extra_states(sharded, stored)
    merge_in_place(sharded)
    error = None
    try:
        with dist_checkpointing_io():
            loaded = dist_checkpointing.load(sharded, mcore_dir)
    except load_errors() as e:
        error = f"Megatron checkpoint {mcore_dir}: does not fit this model: {load_error_text(e)}"
    _all_ok(error)
    layer_specs.fill_extra_states(loaded, skipped)
    load_model_state(model_chunks, loaded)


# --------------------------------------------------------------------------------------
# conversions


def _check_layout_for(model_cfg: ModelConfig, parallel: ParallelConfig, where: str) -> None:
    """The layout against the model and the world size, before any process group exists."""
    from megatron_mopd.distributed import torchrun_env

    parallel.validate("parallel")
    try:
        check_layout(model_cfg, parallel)  # any vocabulary: build_model pads it
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None
    _, world_size, _ = torchrun_env()
    if dist.is_initialized():
        world_size = dist.get_world_size()
    try:
        check_world_size(parallel, world_size)
    except ConfigError as e:
        raise UserError(f"{e} (--tp/--pp/--ep split the model under torchrun)") from None


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    parallel: ParallelConfig | None = None,
    params_dtype: str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    layer_spec: str | None = None,
) -> str:
    """Convert the HF model in `hf_dir` into a Megatron checkpoint folder `out_dir`.

    In one process the whole model is built at TP1/PP1/EP1; under torchrun, at `parallel`
    (each rank reads only its HF slices and writes only its shards), for models too big for
    one process. Either way the folder loads at any layout. The dtype is `params_dtype`
    (`fp32`/`bf16`/`fp16`), by default the HF checkpoint's own. Creates (and tears down) the
    process groups itself. Every input check (architecture, tokenizer, layout, output folder)
    runs before any process group exists and raises a one-line `UserError`. `layer_spec`
    names the tensors as that layer spec stores them (`local` / `transformer_engine`;
    default: the spec the model is built with here); the folder loads under both.
    """
    from megatron_mopd.convert.hf_config import model_config_from_hf, params_dtype_of_hf
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.load import build_student

    hf_dir = os.fspath(hf_dir)
    parallel = parallel or ParallelConfig()
    dtype = params_dtype or params_dtype_of_hf(hf_dir) or "fp32"
    model_cfg = model_config_from_hf(hf_dir, base=ModelConfig(params_dtype=dtype))
    _require_tokenizer(os.fspath(tokenizer_dir) if tokenizer_dir else hf_dir, "hf-to-mcore")
    _check_layout_for(model_cfg, parallel, hf_dir)
    _check_new_folder(os.fspath(out_dir), "--out")

    init_distributed(parallel, model_cfg, seed=model_cfg.seed)
    try:
        chunks, model_cfg = build_student(model_cfg, parallel)
        return save_mcore_checkpoint(
            chunks, model_cfg, out_dir, hf_dir, tokenizer_dir, layer_spec=layer_spec
        )
    finally:
        destroy()


def _write_hf_folder(
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    out_dir: str,
    max_shard_bytes: int,
    tokenizer_dir: str,
) -> str | None:
    """Write the HF folder through a temporary name; the error message, or None."""
    from megatron_mopd.convert.hf import save_hf_checkpoint

    tmp = _tmp_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf_checkpoint(tensors, config, tmp, max_shard_bytes, tokenizer_dir=tokenizer_dir)
        if os.path.isdir(out_dir):  # an empty folder given as the destination
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"--out {out_dir}: cannot write the HF folder ({e})"
    return None


def mcore_to_hf(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    parallel: ParallelConfig | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Convert the Megatron checkpoint in `mcore_dir` into an HF folder `out_dir`.

    Writes `config.json`, safetensors (`model.safetensors`, or shards of at most
    `max_shard_bytes` with `model.safetensors.index.json`) in `dtype` (`fp32`/`bf16`/`fp16`;
    default: the checkpoint's), and the tokenizer files: what
    `transformers.AutoModelForCausalLM.from_pretrained` and SGLang load. In one process the
    model is built at TP1/PP1/EP1, whatever layout the checkpoint was saved at; under
    torchrun at `parallel`, gathered to rank 0 one tensor at a time. The folder is written
    under a temporary name and renamed when complete. Input errors are one-line `UserError`s
    raised before any process group exists.
    """
    from megatron_mopd.convert.hf import export_hf_state_dict
    from megatron_mopd.convert.hf_config import hf_config_dict
    from megatron_mopd.distributed import destroy, init_distributed
    from megatron_mopd.student.model import build_model

    mcore_dir = os.fspath(mcore_dir)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parallel = parallel or ParallelConfig()
    model_cfg = read_mcore_config(mcore_dir)  # the checkpoint's dtype
    if dtype is not None and dtype not in _TORCH_DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(_TORCH_DTYPES)}")
    out_dtype = dtype or model_cfg.params_dtype
    tok = os.fspath(tokenizer_dir) if tokenizer_dir else mcore_dir
    _require_tokenizer(tok, "mcore-to-hf (SGLang and transformers load it from the HF folder)")
    _check_layout_for(model_cfg, parallel, mcore_dir)
    _check_new_folder(out_dir, "--out")
    has_config = os.path.isfile(os.path.join(mcore_dir, "config.json"))
    config = hf_config_dict(
        dataclasses.replace(model_cfg, hf_path=mcore_dir if has_config else None, mcore_path=None),
        dtype=_DTYPE_NAMES[out_dtype],
    )
    # transformers >= 4.56 names it `dtype` (and reads it before `torch_dtype`): keep both right
    config["torch_dtype"] = config["dtype"] = _DTYPE_NAMES[out_dtype]

    init_distributed(parallel, model_cfg, seed=model_cfg.seed)
    try:
        chunks = build_model(model_cfg, parallel, init_params=False, megatron_init=False)
        load_mcore_checkpoint(chunks, mcore_dir)
        tensors = export_hf_state_dict(chunks, model_cfg, dst=0, dtype=_TORCH_DTYPES[out_dtype])
        error = None
        if _rank_world()[0] == 0:
            error = _write_hf_folder(tensors, config, out_dir, max_shard_bytes, tok)
        for _ in tensors:  # the gather is collective: every rank runs it to the end
            pass
        _all_ok(error)
    finally:
        destroy()
    return out_dir
