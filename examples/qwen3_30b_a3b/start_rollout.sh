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
BIND_HOST="${BIND_HOST:-0.0.0.0}"
ADVERTISE_HOST="${ADVERTISE_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
ADVERTISE_HOST="${ADVERTISE_HOST:-127.0.0.1}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
CONTEXT_LENGTH="${CONTEXT_LENGTH:-16384}"
LOG_DIR="${LOG_DIR:-./logs/rollout}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-}"

mkdir -p "$LOG_DIR"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

launch() {  # launch LOG_NAME CMD...: run CMD in the background, output to LOG_DIR/LOG_NAME
    local log="$LOG_DIR/$1"
    shift
    echo "+ $* > $log"
    if [[ -z "$DRY_RUN" ]]; then
        "$@" >"$log" 2>&1 &
        pids+=("$!")
    fi
}

# MOPD's importance ratio needs log mu at temperature 1; the trainer samples at 1, and
# this makes SGLang return unscaled log-probs whatever the request says
export SGLANG_RETURN_ORIGINAL_LOGPROB=1

urls=()
for ((k = 0; k < WORKERS; k++)); do
    port=$((WORKER_PORT_BASE + k))
    launch "student-worker$k.log" "$PYTHON" -m sglang.launch_server \
        --model-path "$STUDENT" \
        --tp-size "$TP" \
        --base-gpu-id "$((k * TP))" \
        --host "$BIND_HOST" \
        --port "$port" \
        --dtype bfloat16 \
        --mem-fraction-static "$MEM_FRACTION" \
        --context-length "$CONTEXT_LENGTH" \
        --weight-version step_0 \
        --served-model-name student \
        --log-level warning
    urls+=("http://$ADVERTISE_HOST:$port")
done
launch "student-router.log" "$PYTHON" -m sglang_router.launch_router \
    --worker-urls "${urls[@]}" \
    --policy round_robin \
    --host "$BIND_HOST" \
    --port "$ROUTER_PORT" \
    --worker-startup-timeout-secs 1800 \
    --request-timeout-secs 3600 \
    --prometheus-port "$((ROUTER_PORT + 100))" \
    --log-level warn
echo "rollout: http://$ADVERTISE_HOST:$ROUTER_PORT (workers: ${urls[*]})"

if [[ -n "$DRY_RUN" ]]; then
    exit 0
fi
wait -n
echo "start_rollout.sh: a rollout process exited; stopping the others (logs in $LOG_DIR)" >&2
exit 1
