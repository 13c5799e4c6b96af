"""The Hugging Face <-> Megatron weight bridge, written by hand for this project.

    cfg = model_config_from_hf(hf_dir)                  # architecture only
    chunks = build_model(cfg, parallel)                 # any TP/PP/EP/ETP layout
    load_hf_weights(chunks, hf_dir, cfg)                # each rank reads only its shards
    save_hf_checkpoint(export_hf_state_dict(chunks, cfg), cfg, out_dir)   # and back

Why not mbridge (the bridge public Megatron RL trainers use): it hard-codes the Transformer
Engine layer spec (the CPU student uses the local spec, with separate norms and
`local_experts.{i}` names), it needs transformers < 5, and in a probe on this project's
machines it exported Qwen3-MoE experts wrongly at EP2 (rank 1's experts came out wrong).
`megatron-bridge` needs Python 3.12 and imports Transformer Engine unconditionally. The
mapping itself is small (see `mapping.py`); owning it lets us test it at every layout.

Loading streams: each rank opens the safetensors files with `safe_open` and reads only the
slices its parameters need, so a rank never holds more than its shard of a tensor.
Loading fails loudly, on every rank at once, if a parameter has no HF source, a shape does
not match, or an HF tensor is used by no rank. Exporting gathers one parameter at a time
to one rank with point-to-point sends, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_mopd.config import ModelConfig
from megatron_mopd.convert.hf_config import hf_config_dict, model_config_from_hf
from megatron_mopd.convert.mapping import (
    ChunkLayout,
    ParamMap,
    chunk_layout,
    map_parameter,
    to_hf,
    to_megatron,
    unwrap,
)
from megatron_mopd.errors import UserError

# HF tensors that carry no weights (old checkpoints saved RoPE's inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------------------
# reading


class HFCheckpoint:
    """Lazy reader of a folder of safetensors files (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise UserError(f"{index}: not a safetensors index ({e!r})") from None
            self.files = {name: os.path.join(self.dir, fn) for name, fn in weight_map.items()}
        elif os.path.isfile(single):
            from safetensors import safe_open

            with _open(single, safe_open) as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            found = sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else "no such directory"
            raise UserError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                f"(found {found}); convert .bin weights to safetensors first"
            )
        for path in set(self.files.values()):
            if not os.path.isfile(path):
                raise UserError(f"{path}: listed in the safetensors index but missing")
        self._handles: dict[str, Any] = {}

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self.files)

    def _handle(self, path: str):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = _open(path, safe_open).__enter__()
        return self._handles[path]

    def shape(self, name: str) -> list[int]:
        """The shape of tensor `name` without reading it."""
        return list(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self.files:
            raise UserError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self._handle(self.files[name]).get_slice(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        """Tensor `name`, or only rows/columns `start:stop` along `dim` (0 or 1)."""
        sl = self._slice(name)
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[start:stop]
        return sl[:, start:stop]

    def close(self) -> None:
        """Release the open files."""
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _open(path: str, safe_open):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


# --------------------------------------------------------------------------------------
# loading


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _read_shard(ckpt: HFCheckpoint, pm: ParamMap, name: str, rows: int | None) -> torch.Tensor:
    """This rank's slice of HF tensor `name` for `pm` (`rows`: the local vocab rows)."""
    if pm.shard_dim is None:
        return ckpt.read(name)
    size = ckpt.shape(name)[pm.shard_dim]
    if pm.vocab:
        start = pm.shard * rows
        stop = min(start + rows, size)
        part = ckpt.read(name, 0, min(start, size), stop)
        if part.shape[0] < rows:  # Megatron's vocab padding: zero rows
            pad = part.new_zeros((rows - part.shape[0], *part.shape[1:]))
            part = torch.cat([part, pad], dim=0)
        return part
    if size % pm.shards:
        raise UserError(
            f"{ckpt.dir}: tensor {name} has {size} entries along dim {pm.shard_dim}, "
            f"not divisible into {pm.shards} parallel shards"
        )
    step = size // pm.shards
    return ckpt.read(name, pm.shard_dim, pm.shard * step, (pm.shard + 1) * step)


def load_hf_weights(
    model_chunks: list[torch.nn.Module],
    hf_dir: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
) -> None:
    """Fill this rank's model chunks with the weights of the HF checkpoint in `hf_dir`.

    Collective over the default process group (every rank calls it). Each rank reads only
    the slices its parameters need. Raises on every rank (a `UserError` for a checkpoint that
    does not fit, `RuntimeError` for a parameter the bridge cannot map) when any parameter
    stays unset or any HF tensor is used by no rank.
    """
    cfg = model_cfg if model_cfg is not None else model_config_from_hf(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    used: set[str] = set()
    error: tuple[str, str] | None = None
    try:
        with torch.no_grad():
            for chunk in model_chunks:
                chunk = unwrap(chunk)
                layout = chunk_layout(chunk)
                for name, param in chunk.named_parameters():
                    _load_param(ckpt, cfg, layout, name, param, used)
                    # drop the memory map: pages read so far would otherwise stay resident
                    # (about one more copy of the model at the end of a conversion)
                    ckpt.close()
    except UserError as e:
        error = ("user", str(e))
    except KeyError as e:
        error = ("bug", f"no HF source for Megatron parameter {e.args[0]!r}")
    finally:
        ckpt.close()
    results = _all_gather((error, sorted(used)))
    errors = [err for err, _ in results if err is not None]
    if errors:
        kind, msg = errors[0]
        raise (UserError if kind == "user" else RuntimeError)(msg)
    all_used = set().union(*(set(u) for _, u in results))
    if not cfg.untie_embeddings_and_output_weights:
        all_used.add("lm_head.weight")  # a tied checkpoint may store the head anyway
    unused = sorted(n for n in ckpt.names() - all_used if not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
        raise UserError(
            f"{ckpt.dir}: {len(unused)} tensor(s) not used by the Megatron model, e.g. "
            f"{', '.join(unused[:5])}{more}; the checkpoint does not match the architecture"
        )


def _load_param(
    ckpt: HFCheckpoint,
    cfg: ModelConfig,
    layout: ChunkLayout,
    name: str,
    param: torch.nn.Parameter,
    used: set[str],
) -> None:
    pm = map_parameter(name, layout, cfg)
    rows = param.shape[0] if pm.vocab else None
    pieces = [_read_shard(ckpt, pm, n, rows) for n in pm.hf_names]
    try:
        value = to_megatron(pm, pieces, cfg)
    except RuntimeError:  # pieces that cannot be interleaved or concatenated
        value = None
    if value is None or tuple(value.shape) != tuple(param.shape):
        shapes = ", ".join(f"{n} {tuple(ckpt.shape(n))}" for n in pm.hf_names)
        raise UserError(
            f"{ckpt.dir}: {shapes} do not fit Megatron parameter {name} of local shape "
            f"{tuple(param.shape)}; the checkpoint does not match its config.json"
        )
    param.data.copy_(value)
    used.update(pm.hf_names)


# --------------------------------------------------------------------------------------
# exporting


def export_hf_state_dict(
    model_chunks: list[torch.nn.Module],
    model_cfg: ModelConfig | None = None,
    dst: int = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Gather the full HF-named weights of a model at any layout, one tensor at a time.

    Collective over the default process group: *every* rank must exhaust the iterator, in
    step; tensors are yielded on rank `dst` only (other ranks yield nothing). Names and
    order follow HF (embedding, layers in order, final norm, `lm_head` unless tied); values
    are cast to `dtype` (default: the parameters' own). Memory on `dst` is bounded by one
    parameter and its HF pieces. Without `model_cfg` the shapes it needs (heads, groups,
    head dim, experts, vocabulary) are read from the first chunk.
    """
    if model_cfg is None:
        model_cfg = arch_of_chunk(model_chunks[0])
    rank, _ = _world()
    local: dict[tuple[str, int], tuple[ParamMap, torch.Tensor]] = {}
    for chunk in model_chunks:
        chunk = unwrap(chunk)
        layout = chunk_layout(chunk)
        for name, param in chunk.named_parameters():
            try:
                pm = map_parameter(name, layout, model_cfg)
            except KeyError:
                raise RuntimeError(f"no HF name for Megatron parameter {name!r}") from None
            if name == "output_layer.weight" and layout.tied:
                continue  # the tied head is the embedding
            local[(pm.key, pm.shard)] = (pm, param.detach())
    catalog = {k: (pm, tuple(t.shape), t.dtype) for k, (pm, t) in local.items()}
    # receive buffers live where this rank's parameters do (the CPU here, a GPU with NCCL)
    device = next(iter(local.values()))[1].device if local else torch.device("cpu")
    plans = _all_gather(catalog)
    # owner of each (key, shard): the lowest rank holding it
    owners: dict[tuple[str, int], int] = {}
    meta: dict[tuple[str, int], tuple[ParamMap, tuple[int, ...], torch.dtype]] = {}
    first: dict[str, ParamMap] = {}
    for r, cat in enumerate(plans):
        for k, m in cat.items():
            owners.setdefault(k, r)
            meta.setdefault(k, m)
            first.setdefault(k[0], m[0])
    for key in sorted(first, key=lambda k: first[k].order):
        pm = first[key]
        missing = [s for s in range(pm.shards) if (key, s) not in owners]
        if missing:
            raise RuntimeError(f"export: no rank holds shard(s) {missing} of {key}")
        shards: list[torch.Tensor] = []
        for s in range(pm.shards):
            owner = owners[(key, s)]
            if rank == owner and rank == dst:
                shards.append(local[(key, s)][1])
            elif rank == owner:
                dist.send(local[(key, s)][1].contiguous(), dst)
            elif rank == dst:
                _, shape, pdtype = meta[(key, s)]
                buf = torch.empty(shape, dtype=pdtype, device=device)
                dist.recv(buf, owner)
                shards.append(buf)
        if rank == dst:
            yield from _to_hf_tensors(pm, shards, model_cfg, dtype)


def arch_of_chunk(chunk: torch.nn.Module) -> ModelConfig:
    """The architecture fields the mapping needs, read from a built `GPTModel` chunk."""
    inner = unwrap(chunk)
    tc = inner.config
    return ModelConfig(
        num_layers=tc.num_layers,
        hidden_size=tc.hidden_size,
        ffn_hidden_size=tc.ffn_hidden_size,
        num_attention_heads=tc.num_attention_heads,
        num_query_groups=tc.num_query_groups,
        kv_channels=tc.kv_channels,
        vocab_size=getattr(inner, "mopd_vocab_size", inner.vocab_size),  # without padding
        num_moe_experts=tc.num_moe_experts,
        untie_embeddings_and_output_weights=not inner.share_embeddings_and_output_weights,
    )


def _to_hf_tensors(
    pm: ParamMap, shards: list[torch.Tensor], cfg: ModelConfig, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    per_shard = [to_hf(pm, s, cfg) for s in shards]
    for i, name in enumerate(pm.hf_names):
        parts = [p[i] for p in per_shard]
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=pm.shard_dim)
        if pm.vocab:
            full = full[: cfg.vocab_size]
        full = full.detach().clone().contiguous()  # no shared storage in the file
        yield name, full if dtype is None else full.to(dtype)


# --------------------------------------------------------------------------------------
# writing


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    """Writes one safetensors file a tensor at a time, holding no more than one tensor.

    The format puts a JSON header (names, dtypes, shapes, byte offsets) before the data, and
    the names are known only at the end; so the data goes to `path + ".data"` as tensors
    arrive, and `close()` writes the header followed by that data (copied in 16 MiB
    blocks) to `path`. Memory stays at one tensor; disk traffic is twice the file.
    """

    def __init__(self, path: str, metadata: dict[str, str] | None = None):
        self.path = path
        self.metadata = dict(metadata or {})
        self.entries: dict[str, dict[str, Any]] = {}
        self.nbytes = 0
        self._data_path = path + ".data"
        self._data = open(self._data_path, "wb")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` under `name`."""
        if name in self.entries:
            raise ValueError(f"{self.path}: tensor {name} written twice")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        t = tensor.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        if size:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.nbytes, self.nbytes + size],
        }
        self.nbytes += size

    def close(self) -> None:
        """Write the file (header, then the data) and remove the data spool."""
        self._data.close()
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        header.update(self.entries)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors does
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 1024**2)
        os.remove(self._data_path)

    def abort(self) -> None:
        """Drop what was written."""
        self._data.close()
        for p in (self._data_path, self.path):
            if os.path.exists(p):
                os.remove(p)


def save_hf_checkpoint(
    state_dict_iter: Iterable[tuple[str, torch.Tensor]],
    config: ModelConfig | dict[str, Any],
    out_dir: str | os.PathLike,
    max_shard_bytes: int = 4 * 1024**3,
    tokenizer_dir: str | os.PathLike | None = None,
) -> str:
    """Write (name, tensor) pairs as an HF checkpoint folder; return `out_dir`.

    Tensors go to safetensors shards of at most `max_shard_bytes` (`model.safetensors` when
    one shard suffices, else `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`), then `config.json` (from a dict, or derived from a
    `ModelConfig`), then tokenizer files copied from `tokenizer_dir` (default: the config's
    `hf_path`). Tensors are streamed to disk as they come (`SafetensorsStreamWriter`), so
    memory holds one tensor, not one shard. Files are written under temporary names and
    renamed when complete. Call it on one rank; on the others, exhaust the export iterator
    instead (see `export_hf_checkpoint`).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written: list[tuple[str, list[str]]] = []  # temp file, tensor names
    seen: set[str] = set()
    dtypes: set[torch.dtype] = set()
    total = 0
    shard: SafetensorsStreamWriter | None = None

    def flush() -> None:
        nonlocal shard
        if shard is not None and shard.entries:
            shard.close()
            written.append((shard.path, list(shard.entries)))
        shard = None

    try:
        for name, tensor in state_dict_iter:
            if name in seen:
                raise ValueError(f"save_hf_checkpoint: tensor {name} given twice")
            seen.add(name)
            nbytes = tensor.numel() * tensor.element_size()
            if shard is not None and shard.entries and shard.nbytes + nbytes > max_shard_bytes:
                flush()
            if shard is None:
                tmp = os.path.join(out_dir, f".tmp-shard-{len(written):05d}.safetensors")
                shard = SafetensorsStreamWriter(tmp, metadata={"format": "pt"})
            shard.add(name, tensor)
            total += nbytes
            dtypes.add(tensor.dtype)
        flush()
    except BaseException:
        if shard is not None:
            shard.abort()
        raise

    n = len(written)
    weight_map: dict[str, str] = {}
    for i, (tmp, names) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, final))
        weight_map.update(dict.fromkeys(names, final))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)

    if isinstance(config, ModelConfig):
        dtype = _DTYPE_NAMES.get(next(iter(dtypes)), "float32") if len(dtypes) == 1 else "float32"
        source = config.hf_path
        config = hf_config_dict(config, dtype=dtype)
    else:
        source = None
    _write_json(os.path.join(out_dir, "config.json"), config)
    tok_src = os.fspath(tokenizer_dir) if tokenizer_dir is not None else source
    if tok_src and os.path.abspath(tok_src) != os.path.abspath(out_dir):
        for fn in TOKENIZER_FILES:
            path = os.path.join(tok_src, fn)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out_dir, fn))
    return out_dir


def export_hf_checkpoint(
    model_chunks: list[torch.nn.Module],
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> None:
    """Collective: gather the model to rank 0 and write it there as an HF checkpoint."""
    it = export_hf_state_dict(model_chunks, model_cfg, dst=0, dtype=dtype)
    rank, _ = _world()
    if rank == 0:
        save_hf_checkpoint(it, model_cfg, out_dir, max_shard_bytes, tokenizer_dir)
    else:
        for _ in it:
            pass


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
