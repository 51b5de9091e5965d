#!/usr/bin/env bash
# Ouro-2.6B shape (48 shared layers x 4 loop steps, hidden 2048) on H100 nodes, FP8 (hybrid).
# TP=2, PP=8 (6 layers per stage), DP = world / 16. Set DATA, TOKENIZER and CKPT.
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch --model-size ouro-2.6b --bf16 --transformer-impl transformer_engine --fp8-format hybrid \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 8 --sequence-parallel \
  --use-distributed-optimizer --micro-batch-size 1 --global-batch-size 1024 --seq-length 4096 \
  --train-iters 100000 --lr 2e-4 --min-lr 2e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 \
  --data-path $DATA --split 990,9,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
  --save "$CKPT" --load "$CKPT" --save-interval 1000 --eval-interval 1000 --eval-iters 20 \
  --log-interval 10 --log-json "$CKPT/log.jsonl" --tensorboard-dir "$CKPT/tb" "$@"
