#!/usr/bin/env bash
# LoopRPT vs continued LM pre-training from the quickstart's stage-1 checkpoint (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/looprpt_vs_lm.py "$@"
