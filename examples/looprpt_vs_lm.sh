#!/usr/bin/env bash
# LoopRPT vs continued LM pre-training from the depth study's looped stage-1 models, 3 seeds
# (examples/looprpt_vs_lm.py; docs/studies.md has the results and the wall time). Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/looprpt_vs_lm.py "$@"
