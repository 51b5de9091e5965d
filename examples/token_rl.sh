#!/usr/bin/env bash
# Token-level RL from the quickstart's stage-1 checkpoint (CPU, tiny):
#   bash examples/token_rl.sh grpo [extra pretrain_looprpt.py flags]
#   bash examples/token_rl.sh rltt --rltt-weights progressive
#   bash examples/token_rl.sh rpt
# Runs the quickstart first when its stage-1 checkpoint is missing. GRPO/RLTT prompts: the
# generated arithmetic / word-problem set (--prompt-data FILE.jsonl for your own problem/answer
# pairs); RPT reads the quickstart corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
ALGO="${1:?usage: bash examples/token_rl.sh grpo|rltt|rpt [flags]}"
shift
ROOT="${LOOPRPT_QUICKSTART_DIR:-runs/quickstart}"
if [ ! -f "$ROOT/stage1/latest_checkpointed_iteration.txt" ]; then
  python pretrain_looprpt.py
fi
OUT="runs/token_rl/$ALGO"
DATA=()
if [ "$ALGO" = rpt ]; then
  DATA=(--data-path 0.7 "$ROOT/data/text_text_document" 0.3 "$ROOT/data/reasoning_text_document" --split 90,10,0)
fi
python pretrain_looprpt.py --model-size tiny \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$ROOT/data/tokenizer.model" \
  --load "$ROOT/stage1" --finetune --rl-algo "$ALGO" \
  --grpo-num-samples 4 --micro-batch-size 8 --global-batch-size 16 --max-new-tokens 48 \
  --train-iters 30 --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 3 --log-interval 5 \
  --save "$OUT" --log-json "$OUT/log.jsonl" "${DATA[@]}" "$@"
