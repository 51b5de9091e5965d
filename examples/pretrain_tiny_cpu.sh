#!/usr/bin/env bash
# The tiny looped model on a CPU machine: 2 processes (DP=2), mock data unless DATA/TOKENIZER are given.
# Usage: bash examples/pretrain_tiny_cpu.sh [extra pretrain_looprpt.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/tiny_cpu}"
if [ -n "${DATA:-}" ]; then
  DATA_FLAGS=(--data-path $DATA --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER")
else
  DATA_FLAGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 4096)
fi
OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 pretrain_looprpt.py \
  --model-size tiny --micro-batch-size 4 --global-batch-size 16 \
  --train-iters 200 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
  --eval-interval 100 --eval-iters 4 --log-interval 10 \
  --save "$OUT" --load "$OUT" --save-interval 100 --log-json "$OUT/log.jsonl" \
  "${DATA_FLAGS[@]}" "$@"
