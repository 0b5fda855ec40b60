#!/usr/bin/env bash
# Side-by-side throughput of mnist-lab and the PyTorch reference on this machine:
# for each model and batch size, one right after the other, same threads.
#
#   TORCH_PYTHON=/tmp/torchenv/bin/python scripts/compare-torch.sh [THREADS] [STEPS]
#
# Needs a Python with torch and numpy (TORCH_PYTHON; see scripts/torch_ref.py) and MNIST_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
steps="${2:-200}"
python="${TORCH_PYTHON:-/tmp/torchenv/bin/python}"
reference="${TORCH_REF:-scripts/torch_ref.py}"
cargo build --release --quiet
# Each side's log goes to a file, shown when it fails (a missing MNIST, say).
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
run() { "$@" 2>"$log" || { echo "failed: $*" >&2; cat "$log" >&2; exit 1; }; }
figure() { grep "^$1=" | cut -d= -f2; }
echo "| model | batch | mnist-lab train/s | PyTorch train/s | ratio | mnist-lab eval/s | PyTorch eval/s | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for model in lenet5 lenet5_reg custom_mlp; do
  for batch in 64 256; do
    ours=$(run ./target/release/mnist-lab bench --model "$model" --batch-size "$batch" --threads "$threads" --steps "$steps")
    theirs=$(run "$python" "$reference" --model "$model" --batch-size "$batch" --threads "$threads" --bench-steps "$steps")
    ot=$(figure train_images_per_s <<<"$ours"); oe=$(figure eval_images_per_s <<<"$ours")
    tt=$(figure train_images_per_s <<<"$theirs"); te=$(figure eval_images_per_s <<<"$theirs")
    awk -v m="$model" -v b="$batch" -v ot="$ot" -v tt="$tt" -v oe="$oe" -v te="$te" \
      'BEGIN { printf "| %s | %d | %d | %d | %.2fx | %d | %d | %.2fx |\n", m, b, ot, tt, ot / tt, oe, te, oe / te }'
  done
done
