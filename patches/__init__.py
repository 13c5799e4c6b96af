"""Patches to upstream packages, installed as `megatron_mopd.patches`.

One module per upstream package, each naming the upstream version it was written for:
- `megatron_core.py`: CPU-only fixes for megatron-core 0.16.1 (applied only without CUDA):
  the table of patches, the recorded upstream signatures, `apply` / `revert`;
  `megatron_core_cpu.py` holds each patch's installer and the CPU stand-ins.
"""
