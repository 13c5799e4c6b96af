# Sourced by start_teachers.sh and start_rollout.sh: shared settings, and `serve_group`,
# which starts SGLang workers and one sglang-router in front of them. The caller sets
# LOG_DIR, TP, WORKERS and WORKER_PORT_BASE first.

BIND_HOST="${BIND_HOST:-0.0.0.0}"       # the trainer's driver must reach the routers
# how the router reaches its workers (and how the trainer and `mopd check` see them in
# GET /workers): an address of this node others can reach, not 127.0.0.1
ADVERTISE_HOST="${ADVERTISE_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
ADVERTISE_HOST="${ADVERTISE_HOST:-127.0.0.1}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
CONTEXT_LENGTH="${CONTEXT_LENGTH:-16384}" # prompt + response, with margin
# SGLang's own environment (it pins torch and transformers versions of its own, so it is
# not installed beside the trainer): python -m venv /opt/sglang &&
#   /opt/sglang/bin/pip install sglang==0.5.23 sglang-router==0.3.2
SGLANG_PYTHON="${SGLANG_PYTHON:-${PYTHON:-python}}"
API_KEY="${API_KEY:-}"                 # optional: workers require it (SGLang's --api-key)
DRY_RUN="${DRY_RUN:-}"

# MOPD's importance ratio needs log-probs at temperature 1; this makes SGLang return
# unscaled log-probs whatever the request says
export SGLANG_RETURN_ORIGINAL_LOGPROB=1

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

# the next worker's first GPU and port, advanced by serve_group
next_gpu=0
next_port="$WORKER_PORT_BASE"

# serve_group NAME MODEL ROUTER_PORT REQUEST_TIMEOUT [WORKER_ARG ...]: WORKERS workers of
# TP GPUs each serving MODEL (logs NAME-worker<k>.log), then a round-robin router on
# ROUTER_PORT (NAME-router.log) that waits for them to be healthy.
serve_group() {
    local name="$1" model="$2" router_port="$3" request_timeout="$4"
    shift 4
    local urls=() k
    for ((k = 0; k < WORKERS; k++)); do
        launch "$name-worker$k.log" "$SGLANG_PYTHON" -m sglang.launch_server \
            --model-path "$model" \
            --tp-size "$TP" \
            --base-gpu-id "$next_gpu" \
            --host "$BIND_HOST" \
            --port "$next_port" \
            --dtype bfloat16 \
            --mem-fraction-static "$MEM_FRACTION" \
            --context-length "$CONTEXT_LENGTH" \
            --log-level warning \
            ${API_KEY:+--api-key "$API_KEY"} \
            "$@"
        urls+=("http://$ADVERTISE_HOST:$next_port")
        next_gpu=$((next_gpu + TP))
        next_port=$((next_port + 1))
    done
    launch "$name-router.log" "$SGLANG_PYTHON" -m sglang_router.launch_router \
        --worker-urls "${urls[@]}" \
        --policy round_robin \
        --host "$BIND_HOST" \
        --port "$router_port" \
        --worker-startup-timeout-secs 1800 \
        --request-timeout-secs "$request_timeout" \
        --prometheus-port "$((router_port + 100))" \
        --log-level warn
    echo "$name: http://$ADVERTISE_HOST:$router_port (workers: ${urls[*]})"
}

# wait_any SCRIPT: in the foreground until one process exits, then stop the others
wait_any() {
    if [[ -n "$DRY_RUN" ]]; then
        exit 0
    fi
    wait -n
    echo "$1: a process exited; stopping the others (logs in $LOG_DIR)" >&2
    exit 1
}
