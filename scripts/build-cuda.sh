#!/usr/bin/env bash
# Builds, on a machine with no GPU and no CUDA toolkit, the `cuda` binary and
# the CUDA test executable that scripts/gpu-check.sh runs on a GPU machine
# (toolchain and link set-up: scripts/cuda-env.sh). About 15 minutes the first
# time on 2 cores (Candle's kernels through nvcc, then the crates again with
# the feature), a minute or two after that.
#
# Output: target/cuda-dist/ (ignored by git), and packed as
# target/cuda-carry/cuda-dist.tar.xz to carry to the GPU machine:
#   mnist-lab       stripped release binary built with --features cuda
#   tests/cuda      tests/cuda.rs: the GPU against the CPU
#   mnist/          MNIST's four .gz files (from MNIST_DIR, else data/mnist)
#   configs/        the five configs gpu-check trains
#   torch_ref.py    the PyTorch reference (../shared/peers/ if there, else scripts/)
# and prints the libraries the binary needs at run time.
#
# Environment: CUDA_VENV, CUDA_COMPUTE_CAP (see cuda-env.sh), MNIST_DIR, TORCH_REF.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-env.sh
link_stub_libcuda
nvcc --version | tail -n 2

dist=target/cuda-dist
cargo build --release --locked --features cuda
test_exe="$(cargo test --release --locked --features cuda --test cuda --no-run --message-format=json \
    | "$cuda_venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == "cuda":
        print(msg["executable"])
')"

rm -rf "$dist"
mkdir -p "$dist/tests" "$dist/mnist" "$dist/configs"
cp target/release/mnist-lab "$dist/mnist-lab"
cp "$test_exe" "$dist/tests/cuda"
strip "$dist/mnist-lab" "$dist/tests/cuda"
for name in lenet5 lenet5_reg custom_mlp custom_mlp_reg lenet5_fast; do
    cp "configs/$name.toml" "$dist/configs/"
done
torch_ref="${TORCH_REF:-../shared/peers/torch_ref.py}"
[ -f "$torch_ref" ] || torch_ref=scripts/torch_ref.py
cp "$torch_ref" "$dist/torch_ref.py"

mnist="${MNIST_DIR:-data/mnist}"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ ! -f "$mnist/$f.gz" ]; then
        echo "build-cuda: $mnist/$f.gz not found: set MNIST_DIR to the folder with MNIST's four .gz files" >&2
        exit 1
    fi
    cp "$mnist/$f.gz" "$dist/mnist/"
done

# Candle's kernels are in the executables as PTX text, ~40 MB each: xz packs
# the folder to ~26 MB, under what one call to a GPU machine carries (64 MiB).
mkdir -p target/cuda-carry
tar -C target -cf - cuda-dist | xz -T0 -6 >target/cuda-carry/cuda-dist.tar.xz

echo "build-cuda: the libraries the binary needs at run time (the GPU machine must provide them):"
readelf -d "$dist/mnist-lab" | grep NEEDED
echo "build-cuda: $(du -sh "$dist" | cut -f1) in $dist, packed: $(du -h target/cuda-carry/cuda-dist.tar.xz | cut -f1) in target/cuda-carry/cuda-dist.tar.xz"
