#!/usr/bin/env bash
# Type-checks and lints the `cuda` feature on a machine without a GPU or a CUDA
# toolkit (nvcc and the CUDA headers from NVIDIA's PyPI wheels: see
# cuda-env.sh), after compiling our own kernels (src/kernels/gpu/*.cu) for
# sm_90 with every warning an error. Candle's kernels are compiled to PTX by nvcc along the way
# (several minutes on 2 cores, cached in target/ afterwards). To link a binary
# and the CUDA tests for a GPU machine: scripts/build-cuda.sh.
#
# Environment: CUDA_VENV, CUDA_COMPUTE_CAP (see cuda-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/cuda-env.sh
nvcc --version | tail -n 2

# Our kernels to machine code for sm_90 (H100, H200): nvcc's and ptxas's
# warnings (spills and local memory included) are errors.
for source in src/kernels/gpu/*.cu; do
    nvcc -cubin -arch=sm_90 -O3 -Werror all-warnings -Xptxas -warn-spills,-warn-lmem-usage,-Werror \
        -o /dev/null "$source"
    echo "check-cuda: $source compiles for sm_90 with no warning"
done

cargo clippy --release --all-targets --features cuda -- -D warnings
echo "check-cuda: the cuda feature type-checks and lints cleanly (not linked: no libcuda here)"
