#!/usr/bin/env bash
# Type-checks and lints the `cuda` feature on a machine without a GPU or a CUDA
# toolkit: nvcc and the CUDA headers come from NVIDIA's PyPI wheels, installed
# into a throw-away virtual environment. Candle's kernels are compiled to PTX by
# nvcc along the way (several minutes on 2 cores, cached in target/ afterwards).
#
# It stops short of linking: a binary needs the driver's libcuda, which is not on
# PyPI. On a machine with the CUDA toolkit and a driver, build and test for real:
#     cargo test --release --features cuda
#
# Environment: CUDA_VENV (default target/cuda-venv), CUDA_COMPUTE_CAP (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CUDA_VENV:-target/cuda-venv}"
# The cudarc that Candle 0.11 uses accepts CUDA up to 13.4.
version="13.4.*"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$version" "nvidia-cuda-runtime==$version" \
    "nvidia-cuda-crt==$version" "nvidia-nvvm==$version" "nvidia-cuda-cccl"

cuda_root="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
if [ ! -x "$cuda_root/bin/nvcc" ]; then
    echo "check-cuda: no nvcc under $cuda_root after installing the wheels" >&2
    exit 1
fi
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -n 2

cargo clippy --release --all-targets --features cuda -- -D warnings
echo "check-cuda: the cuda feature type-checks and lints cleanly (not linked: no libcuda here)"
