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
BIND_HOST="${BIND_HOST:-0.0.0.0}"       # the trainer's driver must reach the routers
# how the router reaches its workers (and how `mopd check` sees them in GET /workers)
ADVERTISE_HOST="${ADVERTISE_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
ADVERTISE_HOST="${ADVERTISE_HOST:-127.0.0.1}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
CONTEXT_LENGTH="${CONTEXT_LENGTH:-16384}" # prompt + response, with margin
LOG_DIR="${LOG_DIR:-./logs/teachers}"
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

gpu=0
port="$WORKER_PORT_BASE"
for teacher in math code; do
    if [[ "$teacher" == math ]]; then model="$MATH_TEACHER"; router_port="$MATH_PORT"
    else model="$CODE_TEACHER"; router_port="$CODE_PORT"; fi
    urls=()
    for ((k = 0; k < WORKERS; k++)); do
        # prefill-only scoring (max_new_tokens: 0): no generation settings needed
        launch "$teacher-worker$k.log" "$PYTHON" -m sglang.launch_server \
            --model-path "$model" \
            --tp-size "$TP" \
            --base-gpu-id "$gpu" \
            --host "$BIND_HOST" \
            --port "$port" \
            --dtype bfloat16 \
            --mem-fraction-static "$MEM_FRACTION" \
            --context-length "$CONTEXT_LENGTH" \
            --served-model-name "$teacher-teacher" \
            --log-level warning
        urls+=("http://$ADVERTISE_HOST:$port")
        gpu=$((gpu + TP))
        port=$((port + 1))
    done
    # the router waits (up to --worker-startup-timeout-secs) for its workers to be healthy
    launch "$teacher-router.log" "$PYTHON" -m sglang_router.launch_router \
        --worker-urls "${urls[@]}" \
        --policy round_robin \
        --host "$BIND_HOST" \
        --port "$router_port" \
        --worker-startup-timeout-secs 1800 \
        --request-timeout-secs 1800 \
        --prometheus-port "$((router_port + 100))" \
        --log-level warn
    echo "teacher $teacher: http://$ADVERTISE_HOST:$router_port (workers: ${urls[*]})"
done

if [[ -n "$DRY_RUN" ]]; then
    exit 0
fi
# stop everything as soon as one process exits (a dead worker is a dead teacher)
wait -n
echo "start_teachers.sh: a teacher process exited; stopping the others (logs in $LOG_DIR)" >&2
exit 1
