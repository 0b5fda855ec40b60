# mnist-lab recipes. `just --list` shows them.

# Train one config: `just run configs/lenet5_reg.toml --set train.epochs=5`
run CONFIG *ARGS:
    cargo run --release -- run {{CONFIG}} {{ARGS}}

# Train every config in configs/, one after another.
sweep *ARGS:
    for config in configs/*.toml; do cargo run --release -- run "$config" {{ARGS}} || echo "FAILED: $config"; done

# The test suite (set MNIST_DIR, or keep ../shared/data/mnist beside the checkout).
test:
    cargo test --release

# Throughput benchmark: training and evaluation images/s per model and batch size.
bench *ARGS:
    cargo run --release -- bench {{ARGS}}

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings
