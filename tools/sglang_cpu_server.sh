#!/usr/bin/env bash
# Start real SGLang 0.5.23 on this CPU machine and wait until it answers.
#
#   tools/sglang_cpu_server.sh --model-path DIR --port P [extra SGLang flags ...]
#
# Serves DIR (an HF folder) on 127.0.0.1:P from the environment `make sglang` builds
# (.venv-sglang, or $SGLANG_VENV), with the flags that keep it small and exact on CPU:
#   --device cpu --attention-backend torch_native   SGLang's plain-PyTorch CPU path
#   --dtype float32                                  'auto' would run fp32 weights in fp16
#   --max-total-tokens 16384 --mem-fraction-static 0.05
#                                                    a bounded KV pool (SGLang's default
#                                                    sizes it from host memory: 15 GB here)
#   --max-running-requests 64
#   --sleep-on-idle                                  an idle scheduler waits on its sockets;
#                                                    without it each server spins a core
# Extra flags come last, so they override these (e.g. --dtype bfloat16, --api-key K,
# --enable-deterministic-inference, --host 0.0.0.0 to serve other machines).
#
# It prints "sglang: ready at http://127.0.0.1:P (pid N)" once GET /health_generate
# answers 200 (SGLang's /health runs a one-token generation too), then stays in the
# foreground until the server exits; SIGTERM or SIGINT stop the server. If the server
# exits before it is ready, or is not ready within $SGLANG_WAIT_SECONDS (default 300),
# the script says so, shows the end of the server's log and exits non-zero.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${SGLANG_VENV:-$ROOT/.venv-sglang}
WAIT=${SGLANG_WAIT_SECONDS:-300}

usage() { echo "usage: $0 --model-path DIR --port P [extra SGLang flags ...]" >&2; exit 2; }
MODEL="" PORT="" HOST=127.0.0.1 API_KEY=""
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --model-path) MODEL=${ARGS[$((i + 1))]:-} ;;
    --port) PORT=${ARGS[$((i + 1))]:-} ;;
    --host) HOST=${ARGS[$((i + 1))]:-} ;;
    --api-key) API_KEY=${ARGS[$((i + 1))]:-} ;;
    -h | --help) usage ;;
  esac
done
[ -n "$MODEL" ] && [ -n "$PORT" ] || usage
[ -f "$MODEL/config.json" ] || { echo "sglang: $MODEL has no config.json (an HF model folder?)" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ]; then
  echo "sglang: no SGLang environment at $VENV: run 'make sglang' first" >&2
  exit 2
fi

export SGLANG_USE_CPU_ENGINE=1 # SGLang's CPU engine (else it looks for vllm)
# --port is passed on with the extra flags (they include it)
"$VENV/bin/python" -m sglang.launch_server --device cpu --host 127.0.0.1 \
  --attention-backend torch_native --dtype float32 \
  --max-total-tokens 16384 --mem-fraction-static 0.05 --max-running-requests 64 \
  --sleep-on-idle --log-level warning "$@" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID; exit 143' TERM INT

[ "$HOST" = "0.0.0.0" ] && HOST=127.0.0.1
URL="http://$HOST:$PORT"
if ! "$VENV/bin/python" - "$URL" "$PID" "$WAIT" "$API_KEY" <<'PY'
import os, sys, time, urllib.request, urllib.error
url, pid, wait, key = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + wait
headers = {"Authorization": f"Bearer {key}"} if key else {}
last = "no answer"
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"sglang: the server (pid {pid}) exited before it was ready ({last})")
    try:
        req = urllib.request.Request(url + "/health_generate", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status == 200:
                print(f"sglang: ready at {url} (pid {pid})", flush=True)
                sys.exit(0)
    except urllib.error.HTTPError as e:
        last = f"HTTP {e.code}"
    except OSError as e:
        last = f"{type(e).__name__}: {e}"
    time.sleep(0.5)
sys.exit(f"sglang: {url} not ready within {wait:g} s (GET /health_generate: {last})")
PY
then
  kill -TERM $PID 2>/dev/null || true
  wait $PID 2>/dev/null || true
  exit 1
fi
wait $PID
