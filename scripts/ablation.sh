#!/usr/bin/env bash
# The ablation of the four best configs: each config over seeds 0, 1, 2 as it
# is (trained on all 60,000 images), then with 5,000 images held out for
# validation (its held-out twin, which shows the train/validation gap), then
# the twin with one technique taken out at a time, each over the same seeds,
# into runs/ablation/ (RUNS_DIR). `just report` then shows each removal's effect
# on test accuracy and on the train/validation gap, mean ± std over the seeds.
# About 45 minutes on 2 cores (LeNet5 runs ~55-70 s, MLP runs ~15-25 s).
#
#   scripts/ablation.sh [CONFIG...]      (default: the four configs/*_best.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS_DIR:-runs/ablation}"
exe="${MNIST_LAB:-target/release/mnist-lab}"
cargo build --release --quiet

# What each config can lose: `key=value` that turns one technique off.
removals() {
    case "$(basename "$1" .toml)" in
        lenet5_best) echo "data.augment_shift=0 optimizer.weight_decay=0 schedule.kind=constant" ;;
        custom_mlp_best) echo "data.augment_shift=0 optimizer.weight_decay=0 train.label_smoothing=0 schedule.kind=constant optimizer.nesterov=false" ;;
        lenet5_reg_best | custom_mlp_reg_best) echo "model.batch_norm=false data.augment_shift=0 optimizer.weight_decay=0 train.label_smoothing=0" ;;
        *) echo "" ;;
    esac
}

configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/lenet5_best.toml configs/custom_mlp_best.toml configs/lenet5_reg_best.toml configs/custom_mlp_reg_best.toml)
held_out=data.validation_size=5000
for config in "${configs[@]}"; do
    "$exe" sweep "$config" --set seed=0,1,2 --runs-dir "$runs"
    "$exe" sweep "$config" --set seed=0,1,2 --set "$held_out" --runs-dir "$runs"
    for removal in $(removals "$config"); do
        "$exe" sweep "$config" --set seed=0,1,2 --set "$held_out" --set "$removal" --runs-dir "$runs"
    done
done
"$exe" runs "$runs" --group
