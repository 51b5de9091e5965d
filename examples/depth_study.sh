#!/usr/bin/env bash
# Depth study: T=1 / looped T=4 / unshared 4x deeper, 3 seeds, on the composition task and on the
# quickstart's text (examples/depth_study.py; docs/depth.md has the results and the wall time).
# Resumable: a rerun skips what is finished. Extra arguments go to depth_study.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/depth_study.py "$@"
