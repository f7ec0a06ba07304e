#!/usr/bin/env bash
# Run on a GPU machine: install the carried wheels, run the GPU test tier and the
# benchmark, and write the evidence to OUT (default ./gpu-results):
#   results.json  GPU, driver, CUDA, commit, device/ tree hash, test counts, bench rows
#   pytest.log, junit.xml, bench.json, bench.log, env.log
#
#   COMMIT=$(git rev-parse HEAD) DEVICE_TREE=$(git rev-parse HEAD:device) \
#     tools/gpu_tier.sh "$OUT"
# (The copy on the GPU machine may have no .git; pass the two hashes in.)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3

if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
# Editable if the image's setuptools can (PEP 660), a plain install otherwise.
$py -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || $py -m pip install -q --no-deps --no-build-isolation . >> "$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 3; }

{
  nvidia-smi || true
  $py -m pip list 2>/dev/null | grep -i -E "cuda|nvidia|nvshmem|cutlass|mpi|numpy|ml.dtypes|cupy|torch|jax" || true
  $py -c "import flashmoe_core.env as e, json; print(json.dumps(e.describe()))"
} > "$out/env.log" 2>&1

export FLASHMOE_CACHE_DIR="${FLASHMOE_CACHE_DIR:-/tmp/flashmoe-cache}"
workers=""
$py -c "import xdist" 2>/dev/null && workers="-n 8"
timeout 1500 $py -m pytest tests -m "gpu" -q -rs $workers --junitxml="$out/junit.xml" \
  > "$out/pytest.log" 2>&1
test_rc=$?

bench_rc=0
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout 1200 $py tools/bench.py --out "$out" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
  bench_rc=$?
  # Expert parallelism with two PEs sharing the GPU(s): protocol, overlap, timeline.
  mpi="mpirun --oversubscribe -np 2"
  [ "$(id -u)" = "0" ] && mpi="$mpi --allow-run-as-root"
  timeout 900 $mpi $py tools/bench_ep.py --quick --out "$out/ep" > "$out/bench_ep.log" 2>&1 \
    || bench_rc=$((bench_rc ? bench_rc : 1))
fi

$py tools/gpu_results.py --out "$out" --test-rc "$test_rc" --bench-rc "$bench_rc" \
  --commit "${COMMIT:-}" --device-tree "${DEVICE_TREE:-}"
tail -5 "$out/pytest.log"
exit $test_rc
