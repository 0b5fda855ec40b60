#!/usr/bin/env bash
# ASHA against the hand-written grids that chose a config: a search over a
# space around it (configs/search/<model>_space.toml) for each search seed,
# then the best trial's settings trained as the config's final model is
# (20 epochs on all 60,000 images, seed 0) and tested once.
#
#   scripts/search-vs-grid.sh [CONFIG] [SPACE] [SEEDS...]
#   (default: configs/custom_mlp_best.toml configs/search/custom_mlp_space.toml 0 1 2)
# Writes runs/search-vs-grid/<seed>/ and prints one line per seed:
#   seed, epochs spent, best trial's validation accuracy, its settings, final test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/custom_mlp_best.toml}
SPACE=${2:-configs/search/custom_mlp_space.toml}
shift 2 2>/dev/null || true
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(0 1 2); fi
OUT=${OUT:-runs/search-vs-grid}
# MNIST_LAB_BIN: a binary built beforehand (e.g. a copy, so rebuilding the
# tree while the searches run does not change the program under them).
if [ -n "${MNIST_LAB_BIN:-}" ]; then
    BIN=$MNIST_LAB_BIN
else
    cargo build --release --quiet
    BIN=${CARGO_TARGET_DIR:-target}/release/mnist-lab
fi

for seed in "${SEEDS[@]}"; do
    dir=$OUT/$(basename "$CONFIG" .toml)-seed$seed
    mkdir -p "$dir"
    "$BIN" search "$CONFIG" --space "$SPACE" --set data.validation_size=5000 --set search.seed="$seed" \
        --resume "$dir/search" --runs-dir "$dir" >"$dir.log" 2>&1 || { tail -5 "$dir.log"; exit 1; }
    python3 - "$dir/search/search.json" "$CONFIG" "$dir" "$BIN" "$seed" <<'PY'
import json, subprocess, sys
record_path, config, out, binary, seed = sys.argv[1:]
record = json.load(open(record_path))
best = next(t for t in record["trials"] if t["index"] == record["best"])
sets = []
for key, value in best["values"].items():
    sets += ["--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
final = subprocess.run([binary, "run", config, *sets, "--runs-dir", f"{out}/final"],
                       capture_output=True, text=True, check=True)
test = [l for l in final.stdout.splitlines() if l.startswith("test accuracy")][0]
print(f"search seed {seed}: {record['epochs_spent']} epochs, best {best['name']} "
      f"val {100 * best['metric']:.2f}% ({best['values']}); final: {test}")
PY
done
