# mnist-lab recipes. `just --list` shows them.

# Train one config: `just run configs/lenet5_reg.toml --set train.epochs=5`
run CONFIG *ARGS:
    cargo run --release -- run {{CONFIG}} {{ARGS}}

# Run every config in configs/ (or the configs, folders and grids given), one after another.
sweep *ARGS:
    cargo run --release -- sweep {{ARGS}}

# List the runs under runs/: `just runs --sort test`
runs *ARGS:
    cargo run --release -- runs {{ARGS}}

# Regenerate docs/results.md (and its images in docs/results/) from the runs under runs/.
report *ARGS:
    cargo run --release -- report {{ARGS}}

# The test suite: full MNIST from MNIST_DIR or data/mnist, else the subset in tests/data.
test:
    cargo test --release

# Throughput benchmark: training and evaluation images/s per model and batch size.
bench *ARGS:
    cargo run --release -- bench {{ARGS}}

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings

# Type-check and lint the cuda feature without a GPU or toolkit (nvcc from PyPI wheels).
check-cuda:
    bash scripts/check-cuda.sh

# Link the cuda binary and its tests without a GPU, into target/cuda-dist, to carry to a GPU machine.
build-cuda:
    bash scripts/build-cuda.sh

# On a GPU machine, over target/cuda-dist: CUDA tests, throughput beside PyTorch, the five configs.
gpu-check:
    bash scripts/gpu-check.sh


# Property tests ("fuzzing") of the IDX reader, config and --set parsing and image decoding, at length.
fuzz CASES="20000":
    PROPTEST_CASES={{CASES}} cargo test --release --test fuzz

# The ablation: each best config over seeds 0-2, then held out, then with one technique off at a time (~45 min).
ablation *CONFIGS:
    bash scripts/ablation.sh {{CONFIGS}}

# Run configs over seeds 0, 1, 2 and show each as mean ± std: `just seeds configs/lenet5_best.toml`.
seeds +CONFIGS="configs/lenet5_best.toml configs/custom_mlp_best.toml configs/lenet5_reg_best.toml configs/custom_mlp_reg_best.toml":
    cargo run --release -- sweep {{CONFIGS}} --set seed=0,1,2 --runs-dir runs/seeds
    cargo run --release -- runs runs/seeds --group
