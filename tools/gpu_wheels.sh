#!/usr/bin/env bash
# Gather the wheels tools/gpu_check.sh needs on a GPU machine without network access.
#
#   tools/gpu_wheels.sh [DIR]        # default DIR: .gpu_wheels (git-ignored)
#
# The device machine (see /work/.library/device/) has Python 3.12 with torch (CUDA),
# transformers, tokenizers, safetensors, numpy, pyyaml, einops and packaging, but not
# megatron-core: this downloads megatron-core's wheel for CPython 3.12 / manylinux x86_64,
# without its dependencies (those are there), at the version this project pins. Carry the
# folder with the run (`carry: [".gpu_wheels"]`, 64 MiB at most; the wheel is ~2.6 MB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.gpu_wheels}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"
VERSION="${MEGATRON_CORE_VERSION:-$(grep -ihoE '^megatron[-_]core==[0-9.]+' "$ROOT/constraints.txt" | head -1 | cut -d= -f3)}"
VERSION="${VERSION:-0.16.1}"
mkdir -p "$DIR"
$PIP download "megatron-core==$VERSION" --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR"
ls -la "$DIR"
du -sh "$DIR"
