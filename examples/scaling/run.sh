#!/usr/bin/env bash
# Scaling sweep: stage-1 LM pre-training, then continued LM vs LoopRPT from the same checkpoint,
# at 4 model sizes; evaluation reports collected into one table and plots (runs/scaling/).
# CPU (default): bash examples/scaling/run.sh
# GPU node:      bash examples/scaling/run.sh --sweep ouro --data-path ... --tokenizer-model tokenizer.json
# Interrupted? Run the same command again: finished stages are skipped, training resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
python examples/scaling/sweep.py "$@"
