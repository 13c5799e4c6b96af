#!/usr/bin/env bash
# Serve the student for rollouts with SGLang on this GPU node, behind one sglang-router
# (the URL of rollout.urls in mopd.yaml).
#
#   STUDENT=/shared/models/Qwen3-30B-A3B examples/qwen3_30b_a3b/start_rollout.sh
#
# WORKERS SGLang workers of TP GPUs each (default 4 x TP2: 8 GPUs) start from the same
# checkpoint as the trainer (model.hf_path). After every optimizer step the trainer writes
# RUN_DIR/weights/step_N (shared filesystem) and posts /update_weights_from_disk to each
# worker it finds in the router's GET /workers: so the workers are registered under an
# address the trainer's driver can reach (ADVERTISE_HOST), not 127.0.0.1.
# Runs in the foreground; Ctrl-C (or any process dying) stops them all.
# DRY_RUN=1 prints the commands without running them.
set -euo pipefail

STUDENT="${STUDENT:-/shared/models/Qwen3-30B-A3B}"
TP="${TP:-2}"
WORKERS="${WORKERS:-4}"
ROUTER_PORT="${ROUTER_PORT:-30000}"
WORKER_PORT_BASE="${WORKER_PORT_BASE:-31100}"
LOG_DIR="${LOG_DIR:-./logs/rollout}"
source "$(dirname "${BASH_SOURCE[0]}")/sglang_group.sh"

# the trainer names weight versions step_N; the checkpoint it starts from is step_0
serve_group student "$STUDENT" "$ROUTER_PORT" 3600 \
    --weight-version step_0 --served-model-name student
wait_any start_rollout.sh
