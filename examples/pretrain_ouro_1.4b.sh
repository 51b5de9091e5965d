#!/usr/bin/env bash
# Ouro-1.4B shape (24 shared layers x 4 loop steps, hidden 2048) on H100 nodes.
# Per node: TP=2 inside NVLink, PP=4 over the 24 layers (6 per stage, each visited 4 times),
# DP = world / 8. Set DATA (a Megatron blend list), TOKENIZER (tokenizer.json) and CKPT.
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch --model-size ouro-1.4b --bf16 --transformer-impl transformer_engine \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 4 --sequence-parallel \
  --use-distributed-optimizer --micro-batch-size 2 --global-batch-size 1024 --seq-length 4096 \
  --train-iters 100000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
  --weight-decay 0.1 --clip-grad 1.0 \
  --data-path $DATA --split 990,9,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
  --save "$CKPT" --load "$CKPT" --save-interval 1000 --eval-interval 1000 --eval-iters 20 \
  --log-interval 10 --log-json "$CKPT/log.jsonl" --tensorboard-dir "$CKPT/tb" "$@"
