# Shared torchrun launcher for the example recipes (sourced, not run).
# Single node: nothing to set. Multi-node: on every node set NNODES, NODE_RANK (0 .. NNODES-1)
# and MASTER_ADDR (node 0's address, reachable from every node), optionally GPUS_PER_NODE and
# MASTER_PORT; under SLURM, examples/slurm/pretrain.sbatch sets them from the allocation.
# NCCL / InfiniBand settings are the cluster's: see docs/gpu.md.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$NNODES" -gt 1 ]; then
  # Defaults would make every node rendezvous with itself (127.0.0.1) or claim rank 0, and the
  # job would hang instead of failing.
  if [ -z "${MASTER_ADDR:-}" ] || [ "$MASTER_ADDR" = "127.0.0.1" ] || [ "$MASTER_ADDR" = "localhost" ]; then
    echo "_launch.sh: NNODES=$NNODES needs MASTER_ADDR set to node 0's address on every node (got '${MASTER_ADDR:-}')" >&2
    exit 2
  fi
  case "${NODE_RANK:-}" in ''|*[!0-9]*) NODE_RANK_OK=0 ;; *) NODE_RANK_OK=$((NODE_RANK < NNODES)) ;; esac
  if [ "$NODE_RANK_OK" != 1 ]; then
    echo "_launch.sh: NNODES=$NNODES needs NODE_RANK set to this node's index in 0..$((NNODES - 1)) (got '${NODE_RANK:-}')" >&2
    exit 2
  fi
else
  MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  NODE_RANK="${NODE_RANK:-0}"
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core's TP/SP communication overlap relies on it
launch() {
  # exec: a signal to this shell (a scheduler's time-limit warning) reaches torchrun, which
  # passes it on to the training processes
  exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    "$REPO/pretrain_looprpt.py" "$@"
}
