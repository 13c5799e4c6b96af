#!/usr/bin/env bash
# Launch `python -m megatron_mopd train RECIPE [key=value ...]` on this node of a
# (multi-node) torchrun job. Run the same command on every node; see usage() below.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/launch.sh RECIPE.yaml [key=value ...]

Runs, on this node:

    python -m torch.distributed.run --nnodes $NNODES --node-rank $NODE_RANK \
        --nproc-per-node $NPROC_PER_NODE --rdzv-backend c10d \
        --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $RDZV_ID \
        --rdzv-conf is_host=<1 on node 0>,join_timeout=$RDZV_JOIN_TIMEOUT --max-restarts 0 \
        -m megatron_mopd train RECIPE.yaml [key=value ...]

Start it on every node with the same RECIPE, overrides, NNODES, MASTER_ADDR, MASTER_PORT
and RDZV_ID, and NODE_RANK = 0 .. NNODES-1. Node 0 hosts the rendezvous store at
MASTER_ADDR:MASTER_PORT; the others wait for it (up to RDZV_JOIN_TIMEOUT seconds).
torchrun's c10d rendezvous numbers the nodes in the order they join, so global rank 0
(the MOPD driver, which talks to the teachers and the rollout servers) may live on any
node: every node must reach the teacher and rollout URLs, and run_dir must be on a
filesystem all nodes share (checkpoints are written by every rank).

Environment (defaults in brackets):
  MASTER_ADDR        address of node 0, reachable from every node  [127.0.0.1]
  MASTER_PORT        a free TCP port on node 0                     [29500]
  NNODES             number of nodes                               [1]
  NODE_RANK          this node's index, 0 .. NNODES-1              [0]
  NPROC_PER_NODE     processes on this node (one per GPU)          [number of GPUs, else 1]
  RDZV_ID            job id, the same on every node                [mopd]
  RDZV_JOIN_TIMEOUT  seconds to wait for all nodes to join         [900]
  PYTHON             the Python of the environment                 [python]

Example, 2 nodes x 8 GPUs (run on node 0, then on node 1 with NODE_RANK=1):
  MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 \
      tools/launch.sh examples/qwen3_30b_a3b/mopd.yaml train.max_steps=500

A run killed for any reason resumes from its last checkpoint when the same command is
started again on every node.
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -lt 1 ]] && exit 2 || exit 0
fi
if [[ ! -f "$1" ]]; then
    echo "tools/launch.sh: error: recipe $1: no such file" >&2
    exit 2
fi

PYTHON="${PYTHON:-python}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ID="${RDZV_ID:-mopd}"
RDZV_JOIN_TIMEOUT="${RDZV_JOIN_TIMEOUT:-900}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        NPROC_PER_NODE=1
    fi
fi

for var in NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT RDZV_JOIN_TIMEOUT; do
    if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
        echo "tools/launch.sh: error: $var=${!var} must be a non-negative integer" >&2
        exit 2
    fi
done
if (( NNODES < 1 || NPROC_PER_NODE < 1 || NODE_RANK >= NNODES )); then
    echo "tools/launch.sh: error: need NNODES >= 1, NPROC_PER_NODE >= 1 and" \
        "0 <= NODE_RANK < NNODES (got NNODES=$NNODES NODE_RANK=$NODE_RANK" \
        "NPROC_PER_NODE=$NPROC_PER_NODE)" >&2
    exit 2
fi
if (( NNODES > 1 )) && [[ "$MASTER_ADDR" == "127.0.0.1" || "$MASTER_ADDR" == "localhost" ]]; then
    echo "tools/launch.sh: error: NNODES=$NNODES needs MASTER_ADDR set to node 0's address" >&2
    exit 2
fi

IS_HOST=0
(( NODE_RANK == 0 )) && IS_HOST=1

set -x
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$RDZV_ID" \
    --rdzv-conf "is_host=$IS_HOST,join_timeout=$RDZV_JOIN_TIMEOUT" \
    --max-restarts 0 \
    -m megatron_mopd train "$@"
