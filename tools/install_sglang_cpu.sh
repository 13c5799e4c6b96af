#!/usr/bin/env bash
# Build real SGLang 0.5.23 for CPU in its own virtual environment (default .venv-sglang).
#
#   tools/install_sglang_cpu.sh [VENV]
#
# SGLang pins a CUDA torch and CUDA-only kernels, which conflict with this project's
# environment, so it lives in a venv of its own, as it runs as a separate server on
# clusters. What it needs on CPU comes from patches/sglang_cpu/ (see its README.md):
# torch 2.13.0+cpu pinned, sglang --no-deps, its pure-Python requirements at the versions
# of patches/sglang_cpu/constraints.txt, torchvision made importable beside CPU torch, and
# a stand-in for the CPU kernel library `sgl_kernel` that PyPI does not ship.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
VENV=${1:-.venv-sglang}
PYTHON=${PYTHON:-python3}
HERE=patches/sglang_cpu
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)

# the packages' identity (bump STEPS when the pip steps below change): a venv built from
# the same pins only gets the patches again
STEPS=1
PINS=$( (echo "$STEPS"; cat "$HERE/constraints.txt" "$HERE/requirements.in") | sha256sum | cut -c1-16)
if [ -f "$VENV/.pins" ] && [ "$(cat "$VENV/.pins")" = "$PINS" ]; then
  echo "[sglang] $VENV has these pins already: only the patches are applied again"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  PIP=(pip_quiet "$VENV/bin/pip" install -q "${FIND_LINKS[@]}" -c "$HERE/constraints.txt")
  # pip's notes about this machine's unreachable extra indexes are noise: keep the rest
  pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
  echo "[sglang] torch 2.13.0 (CPU)"
  "${PIP[@]}" torch==2.13.0
  echo "[sglang] sglang 0.5.23 (no dependencies: its pins are CUDA builds)"
  "${PIP[@]}" --no-deps sglang==0.5.23 sglang-router==0.3.2
  echo "[sglang] SGLang's pure-Python requirements"
  "${PIP[@]}" -r "$HERE/requirements.in"
  echo "[sglang] torchvision, made importable beside CPU torch"
  "${PIP[@]}" --no-deps torchvision==0.28.0
  echo "$PINS" > "$VENV/.pins"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" "$HERE/fix_torchvision.py" "$SITE/torchvision/_meta_registrations.py"
echo "[sglang] the sgl_kernel stand-in"
rm -rf "$SITE/sgl_kernel"
cp -r "$HERE/sgl_kernel" "$SITE/sgl_kernel"
"$VENV/bin/python" - <<'PY'
import torch
assert "+cpu" in torch.__version__, f"a CUDA torch slipped in: {torch.__version__}"
import os
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
import sglang, sglang.srt.entrypoints.http_server  # noqa: F401  (imports what the server needs)
print(f"[sglang] ok: sglang {sglang.__version__}, torch {torch.__version__}")
PY
touch "$VENV/.installed"
