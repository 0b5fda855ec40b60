//! Helpers shared by the end-to-end tests.

// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn holds_mnist(dir: &Path) -> bool {
    use mnist_lab::data::download::{all_files, holds};
    holds(dir, &all_files())
}

/// Full MNIST, found as the binary finds it: `MNIST_DIR`, then `data/mnist`.
pub fn full_mnist() -> Option<PathBuf> {
    let from_env = std::env::var_os("MNIST_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let in_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    from_env
        .into_iter()
        .chain([in_checkout])
        .find(|dir| holds_mnist(dir))
}

/// The subset of MNIST shipped with the tests (6,000 training, 2,000 test images).
pub fn mnist_subset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mnist-subset")
}

/// MNIST for the tests: the full set where there is one, else the shipped subset.
pub fn mnist_dir() -> PathBuf {
    full_mnist().unwrap_or_else(mnist_subset)
}

/// Full MNIST for a test that needs it, or `None` after saying it skips.
pub fn full_mnist_or_skip(test: &str) -> Option<PathBuf> {
    let found = full_mnist();
    if found.is_none() {
        // Straight to stderr, past the test harness's capture, so the skip shows.
        let note = format!(
            "skipped {test}: it needs full MNIST (set MNIST_DIR, or put it in data/mnist)\n"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
    }
    found
}

pub fn config_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .display()
        .to_string()
}

pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The one run directory under `runs`.
pub fn only_run(runs: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Trains the config file `config` into `<work>/runs` and returns its run directory.
pub fn trained_run(work: &Path, config: &str) -> PathBuf {
    let runs = work.join("runs");
    assert_success(&run_binary(&[
        "run",
        config,
        "--runs-dir",
        runs.to_str().unwrap(),
    ]));
    only_run(&runs)
}

/// Runs the binary with quiet logs and MNIST from [`mnist_dir`].
pub fn run_binary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mnist-lab"))
        .args(args)
        .env("MNIST_DIR", mnist_dir())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}
