# Shared torchrun launcher for the example recipes (sourced, not run).
# Multi-node: set MASTER_ADDR, NNODES, NODE_RANK (and optionally GPUS_PER_NODE, MASTER_PORT) on
# every node; single node: nothing to set.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core's TP/SP communication overlap relies on it
launch() {
  torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    "$REPO/pretrain_looprpt.py" "$@"
}
