#!/usr/bin/env bash
# Prepare a GPU check on a machine without a GPU (run from a venv with the package):
#   tools/gpu_kit.sh            # .whl/ (wheels a bare GPU machine lacks) and .kit/
# then carry .kit and .whl with the checkout and run tools/gpu_check.sh OUT there.
# Builds every kernel the check's stages and the GPU test tier load, for sm_90a.
# The EP and NVSHMEM kernels link libnvshmem_device.a, which must be the release of the
# GPU machine's libnvshmem_host (a mismatch fails NVSHMEM's module init there): build the
# kit where nvidia-nvshmem-cu13 is that release (NVSHMEM_TARGET, the image's 3.4.5).
set -euo pipefail
cd "$(dirname "$0")/.."
want="${NVSHMEM_TARGET:-3.4.5}"
have=$(python -c "import importlib.metadata as m; print(m.version('nvidia-nvshmem-cu13'))")
if [ "$have" != "$want" ]; then
  echo "gpu_kit: nvidia-nvshmem-cu13 $have is installed, the GPU machine has $want;" \
       "pip install nvidia-nvshmem-cu13==$want in this venv (or set NVSHMEM_TARGET)" >&2
  exit 2
fi
for d in .kit .whl; do
  grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
[ "${SKIP_WHEELS:-0}" = "1" ] || tools/gpu_wheels.sh
listing=$(mktemp --suffix=.json)
python -m pytest tests --list-kernels="$listing" -q -p no:cacheprovider > /dev/null
python -m flashmoe_core.build --arch "${ARCH:-sm_90a}" --for-check .kit --requests "$listing"
python tools/gpu_check.py dry-run --kit .kit --requests "$listing"
rm -f "$listing"
