#!/usr/bin/env bash
# Prepare a GPU check on a machine without a GPU (run from a venv with the package):
#   tools/gpu_kit.sh            # .whl/ (wheels a bare GPU machine lacks) and .kit/
# then carry .kit and .whl with the checkout and run tools/gpu_check.sh OUT there.
# Builds every kernel the check's stages and the GPU test tier load, for sm_90a.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .kit .whl; do
  grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
[ "${SKIP_WHEELS:-0}" = "1" ] || tools/gpu_wheels.sh
listing=$(mktemp --suffix=.json)
python -m pytest tests --list-kernels="$listing" -q -p no:cacheprovider > /dev/null
python -m flashmoe_core.build --arch "${ARCH:-sm_90a}" --for-check .kit --requests "$listing"
python tools/gpu_check.py dry-run --kit .kit --requests "$listing"
rm -f "$listing"
