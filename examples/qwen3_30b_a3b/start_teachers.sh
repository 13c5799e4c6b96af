#!/usr/bin/env bash
# Serve the math and the code teacher with SGLang on this GPU node, each behind its own
# sglang-router (the URLs of teachers.math.urls / teachers.code.urls in mopd.yaml).
#
#   MATH_TEACHER=/shared/models/qwen3-30b-a3b-math CODE_TEACHER=/shared/models/qwen3-30b-a3b-code \
#       examples/qwen3_30b_a3b/start_teachers.sh
#
# Per teacher: WORKERS SGLang workers of TP GPUs each (default 2 x TP2: 8 GPUs for both),
# on GPUs base_gpu_id = k * TP, then `sglang_router.launch_router --policy round_robin`
# in front of them. Runs in the foreground; Ctrl-C (or any process dying) stops them all.
# DRY_RUN=1 prints the commands without running them.
set -euo pipefail

MATH_TEACHER="${MATH_TEACHER:-/shared/models/qwen3-30b-a3b-math}"
CODE_TEACHER="${CODE_TEACHER:-/shared/models/qwen3-30b-a3b-code}"
TP="${TP:-2}"                           # GPUs per worker (tensor parallel)
WORKERS="${WORKERS:-2}"                 # workers per teacher
MATH_PORT="${MATH_PORT:-30010}"         # router ports: what mopd.yaml's teachers.*.urls name
CODE_PORT="${CODE_PORT:-30020}"
WORKER_PORT_BASE="${WORKER_PORT_BASE:-31000}"
LOG_DIR="${LOG_DIR:-./logs/teachers}"
source "$(dirname "${BASH_SOURCE[0]}")/sglang_group.sh"

# prefill-only scoring (max_new_tokens: 0): no generation settings needed
serve_group math "$MATH_TEACHER" "$MATH_PORT" 1800 --served-model-name math-teacher
serve_group code "$CODE_TEACHER" "$CODE_PORT" 1800 --served-model-name code-teacher
# a dead worker is a dead teacher: stop everything as soon as one process exits
wait_any start_teachers.sh
