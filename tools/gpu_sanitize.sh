#!/usr/bin/env bash
# Run on a GPU machine after tools/gpu_tier.sh installed everything: a small fused-kernel
# run and the tile GEMM under compute-sanitizer (memcheck, racecheck, synccheck), logs to
# OUT (default ./gpu-sanitize). Source lines come from FLASHMOE_LINEINFO=1.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-sanitize}"
mkdir -p "$out"
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export FLASHMOE_LINEINFO=1 FLASHMOE_CACHE_DIR="${FLASHMOE_CACHE_DIR:-/tmp/flashmoe-cache}"
small="--tokens 200 --hidden 128 --ffn 256 --experts 8 --top-k 2 --warmup 1 --iters 1 --check"
rc=0
for tool in memcheck racecheck synccheck; do
  timeout 280 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python3 -m flashmoe_core.run --backend gpu $small > "$out/$tool.log" 2>&1
  r=$?
  echo "$tool exit $r" | tee -a "$out/summary.txt"
  [ $r -ne 0 ] && rc=$r
done
exit $rc
