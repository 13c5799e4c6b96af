#!/usr/bin/env bash
# The single-GPU check (issue 17): megatron-core with its local layer spec on CUDA, NCCL
# at world size 1, bf16 -- log-probs against transformers, one MOPD step, tokens/s and
# model FLOPs utilisation of a ~1.2B-parameter MoE (tools/gpu_check.py says what each
# step checks). Prints PASS / FAIL lines; exits non-zero when one fails.
#
#   tools/gpu_wheels.sh                      # here, once: megatron-core's wheel
#   tools/gpu_check.sh [OUT_DIR] [-- ARGS]   # on the GPU machine (carry .gpu_wheels)
#
# Expects: Python 3.12 with torch (CUDA), transformers, no Transformer Engine needed. When
# `import megatron.core` fails, megatron-core is installed from .gpu_wheels (no network)
# into a private folder on PYTHONPATH (the image's packages are left alone).
# Environment: PYTHON (default python3), WHEELS (default .gpu_wheels), TIMEOUT (s, 540).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.gpu_wheels}"
OUT="${1:-${OUT:-$ROOT/runs/gpu_check}}"
[ "$#" -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "INFO nvidia-smi: not available"
"$PY" -c 'import sys, torch; print("INFO python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

if ! "$PY" -c 'import megatron.core' >/dev/null 2>&1; then
    wheel="$(ls "$WHEELS"/megatron_core-*.whl 2>/dev/null | head -1 || true)"
    if [ -z "$wheel" ]; then
        echo "FAIL megatron-core: not importable and no wheel in $WHEELS (run tools/gpu_wheels.sh and carry it)"
        exit 1
    fi
    site="$(mktemp -d)/site"
    "$PY" -m pip install --quiet --no-index --no-deps --target "$site" "$wheel"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "INFO megatron-core: installed from $(basename "$wheel") into $site"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

echo "== tools/gpu_check.py"
set +e
timeout "${TIMEOUT:-540}" "$PY" tools/gpu_check.py --device cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc="${PIPESTATUS[0]}"
set -e
[ "$rc" = 124 ] && echo "FAIL gpu_check: timed out after ${TIMEOUT:-540} s"
echo "gpu_check.sh: exit $rc (figures in $OUT/gpu_check.json)"
exit "$rc"
