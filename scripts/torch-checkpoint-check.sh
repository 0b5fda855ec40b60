#!/usr/bin/env bash
# Loads a fresh LeNet5 checkpoint (BatchNorm, shift augmentation, so its
# running statistics and num_batches_tracked matter) into the PyTorch reference
# and checks that PyTorch gets the run's own test accuracy. Optional: needs a
# Python with torch, numpy and safetensors (TORCH_PYTHON, default
# /tmp/torchenv/bin/python; see scripts/torch_ref.py) and MNIST_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${TORCH_PYTHON:-/tmp/torchenv/bin/python}"
cargo build --release --quiet
work=$(mktemp -d)
./target/release/mnist-lab run configs/lenet5_reg.toml --runs-dir "$work" \
    --set train.epochs=2 --set data.train_size=5000 >/dev/null 2>&1
run=$(ls -d "$work"/*)
ours=$(python3 -c "import json,sys; print(f\"{100 * json.load(open(sys.argv[1]))['test_acc']:.2f}%\")" "$run/summary.json")
theirs=$("$python" scripts/torch_ref.py --model lenet5_reg --threads 2 \
    --load-safetensors "$run/model.safetensors" | sed -n 's/^test accuracy \([0-9.]*%\).*/\1/p')
rm -rf "$work"
echo "torch-checkpoint-check: mnist-lab $ours, PyTorch $theirs"
[ "$ours" = "$theirs" ]
