#!/usr/bin/env bash
# The GPU check in one command, on a GPU machine, from the repository root:
#   tools/gpu_check.sh OUT
# Kernels come from the kit in .kit and missing wheels from .whl (both made by
# tools/gpu_kit.sh on any machine); without .kit the check compiles them first.
# OUT gets results.json (rewritten around every stage) and a few logs; see
# tools/gpu_check.py. BUDGET=0 lifts the overall seven-minute bound.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
out="${1:?usage: tools/gpu_check.sh OUT}"
exec python3 tools/gpu_check.py run --out "$out" --budget "${BUDGET:-420}"
