#!/usr/bin/env bash
# The one command for a GPU machine, over what scripts/build-cuda.sh made in
# target/cuda-dist (carried there packed, as target/cuda-carry/cuda-dist.tar.xz;
# the machine needs no Rust toolchain and no network, only a driver and a Python
# whose PyTorch wheels bring the CUDA runtime, cuBLAS and cuRAND):
#   1. the CUDA tests (GPU against CPU: ops, evaluations, optimiser steps,
#      checkpoints, byte images),
#   2. training and evaluation throughput, mnist-lab and the PyTorch reference
#      one right after the other on the same GPU, per model and batch size,
#   3. the five configs (the assignment's four, 20 epochs each, and lenet5_fast)
#      through `mnist-lab sweep --set device.kind=cuda`, timed, and one of the
#      runs evaluated again on the CPU.
# Writes gpu-check.log, bench.md, runs.txt and runs.tar.gz to $OUT (default
# target/gpu-check). Environment: CUDA_DIST, STEPS (timed steps, default 300),
# SWEEP_SET (extra `--set` for the sweep, e.g. train.epochs=2 for a quick look),
# SWEEP_SECONDS (stop the sweep with SIGTERM after this long: its runs stay
# resumable and the summaries say how far each got).
set -uo pipefail
cd "$(dirname "$0")/.."
dist="${CUDA_DIST:-target/cuda-dist}"
out="${OUT:-target/gpu-check}"
steps="${STEPS:-300}"
mkdir -p "$out"
if [ ! -x "$dist/mnist-lab" ] && [ -f target/cuda-carry/cuda-dist.tar.xz ]; then
    xz -dc target/cuda-carry/cuda-dist.tar.xz | tar -C "$(dirname "$dist")" -xf -
fi
exec > >(tee "$out/gpu-check.log") 2>&1
failed=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
fail() { echo "gpu-check: FAILED: $*"; failed=1; }

step "GPU and libraries"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi"
# cuBLAS, cuRAND and NVRTC from the NVIDIA wheels beside PyTorch.
wheels_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${wheels_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$dist/mnist-lab" | grep -E "cuda|cublas|curand|nvrtc|not found"
if ldd "$dist/mnist-lab" | grep -q "not found"; then
    fail "the binary needs libraries this machine lacks (above)"
    exit 1
fi
export MNIST_DIR="$dist/mnist" MNIST_LAB_REQUIRE_CUDA=1

step "CUDA tests"
for test in "$dist"/tests/*; do
    "$test" --test-threads=1 --nocapture || fail "$(basename "$test")"
done

step "throughput: mnist-lab and PyTorch, one right after the other ($steps steps)"
figure() { grep "^$1=" | cut -d= -f2; }
{
    echo "| model | batch | mnist-lab train/s | PyTorch train/s | ratio | mnist-lab eval/s | PyTorch eval/s | ratio |"
    echo "|---|---|---|---|---|---|---|---|"
} >"$out/bench.md"
for model in lenet5 lenet5_reg custom_mlp; do
    for batch in 64 256; do
        ours=$("$dist/mnist-lab" bench --device cuda --model "$model" --batch-size "$batch" --steps "$steps" --output "$out/bench-$model-$batch.json") || fail "bench $model $batch"
        theirs=$(python3 "$dist/torch_ref.py" --device cuda --model "$model" --batch-size "$batch" --bench-steps "$steps") || fail "torch_ref $model $batch"
        ot=$(figure train_images_per_s <<<"$ours"); oe=$(figure eval_images_per_s <<<"$ours")
        tt=$(figure train_images_per_s <<<"$theirs"); te=$(figure eval_images_per_s <<<"$theirs")
        awk -v m="$model" -v b="$batch" -v ot="${ot:-0}" -v tt="${tt:-1}" -v oe="${oe:-0}" -v te="${te:-1}" \
            'BEGIN { printf "| %s | %d | %d | %d | %.2fx | %d | %d | %.2fx |\n", m, b, ot, tt, ot / tt, oe, te, oe / te }' >>"$out/bench.md"
    done
done
rm -f "$out"/bench-*.json
cat "$out/bench.md"

step "the five configs through sweep on CUDA"
runs="$(mktemp -d)"
configs=()
for name in lenet5 lenet5_fast custom_mlp lenet5_reg custom_mlp_reg; do configs+=("$dist/configs/$name.toml"); done
start=$(date +%s.%N)
# shellcheck disable=SC2086
${SWEEP_SECONDS:+timeout --signal=TERM "$SWEEP_SECONDS"} "$dist/mnist-lab" sweep "${configs[@]}" --set device.kind=cuda ${SWEEP_SET:+--set $SWEEP_SET} --runs-dir "$runs"
sweep_status=$?
# timeout answers 124 when it stopped the sweep: asked for, not a failure.
if [ "$sweep_status" -eq 124 ] && [ -n "${SWEEP_SECONDS:-}" ]; then
    echo "sweep stopped after SWEEP_SECONDS=$SWEEP_SECONDS, as asked"
elif [ "$sweep_status" -ne 0 ]; then
    fail "sweep"
fi
echo "sweep wall time: $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f s", e - s }')"
"$dist/mnist-lab" runs "$runs" | tee "$out/runs.txt"

step "a CUDA-trained checkpoint evaluated on the CPU"
first_run="$(find "$runs" -name summary.json -printf '%h\n' | sort | head -n 1)"
if [ -n "$first_run" ]; then
    "$dist/mnist-lab" eval "$first_run" --set device.kind=cpu || fail "eval on the CPU"
    grep -E '"test_accuracy"' "$first_run/summary.json"
fi
tar -czf "$out/runs.tar.gz" -C "$runs" --exclude='*.safetensors' . 2>/dev/null

echo
if [ "$failed" = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: something failed (above)"; fi
exit "$failed"
