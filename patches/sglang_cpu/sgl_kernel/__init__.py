"""A stand-in for SGLang's CPU kernel library (`sgl_kernel`), written for sglang 0.5.23.

Why: SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`) imports a few `*_cpu` functions of
`sgl_kernel` at module level, but PyPI has no CPU build of that library (`sglang-kernel`
0.4.10 is a CUDA-only wheel; no sdist exists). `make sglang` installs this module as
`sgl_kernel` into `.venv-sglang` so that the real SGLang server starts and serves here.

What it implements (two bookkeeping ops on index tables, no model arithmetic):
- `assign_req_to_token_pool_cpu` (sglang/srt/mem_cache/allocation.py): writes the KV-cache
  slots just allocated to each request into the request -> token table;
- `copy_all_layer_kv_cache_cpu` (sglang/kernels/ops/kvcache/cache_move.py): copies KV
  slots from `src_loc` to `tgt_loc` in every layer's buffer (raw pointers and byte
  strides per buffer).

Everything else named `*_cpu` is importable (SGLang imports some names that it never
calls on this path) and raises `NotImplementedError` if called; any other name raises
`AttributeError`, as a missing attribute should. SGLang registers no
`torch.ops.sgl_kernel.*` operators from here, so `cpu_has_amx_support()` is False and SGLang
runs its own plain-PyTorch layers (RMSNorm, RoPE, SiLU-and-mul, MoE, sampling) and the
`torch_native` attention backend: none of this module is in SGLang's compute path.

`MOPD_SGL_KERNEL_LOG=FILE` appends one line per import of a stub, call of a stub, or
missing name; the tests start the server with it and check that no stub was called.
"""

from __future__ import annotations

import ctypes
import os

import torch

__version__ = "0.0.0+megatron_mopd.cpu_stand_in"


def _log(event: str) -> None:
    path = os.environ.get("MOPD_SGL_KERNEL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(event + "\n")


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """`req_to_token[r, start:end] = out_cache_loc[...]` for each request `r`, the slots of
    consecutive requests taken one after the other from `out_cache_loc`."""
    offset = 0
    for r, start, end in zip(
        req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True
    ):
        n = end - start
        if not 0 <= start <= end <= pool_len:
            raise ValueError(f"request {r}: slots {start}..{end} outside [0, {pool_len}]")
        req_to_token[r, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """In each buffer (address `data_ptrs[i]`, `strides[i]` bytes per slot) copy slot
    `src_loc[j]` onto slot `tgt_loc[j]`."""
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist(), strict=True))
    for base, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        for tgt, src in pairs:
            if tgt != src:
                ctypes.memmove(base + tgt * stride, base + src * stride, stride)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name.endswith("_cpu"):
        _log(f"imported-stub {name}")

        def stub(*args, **kwargs):
            _log(f"called-stub {name}")
            raise NotImplementedError(
                f"sgl_kernel.{name} is not implemented by megatron_mopd's CPU stand-in"
            )

        stub.__name__ = name
        return stub
    _log(f"missing {name}")
    raise AttributeError(f"megatron_mopd's sgl_kernel stand-in has no {name!r}")
