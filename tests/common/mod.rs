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

/// LeNet5 on 4,000 images for one epoch: a few tenths of a second.
pub const SMALL_LENET5: &str = "name = \"small\"\n[data]\ntrain_size = 4000\nvalidation_size = 1000\n\
    test_size = 1000\n[train]\nepochs = 1\n";

/// A quick CustomMLP config: two epochs on 3,000 images.
pub const QUICK_MLP: &str = "[model]\nkind = \"custom_mlp\"\n\
    [data]\ntrain_size = 3000\nvalidation_size = 1000\ntest_size = 1000\n\
    [optimizer]\nlr = 0.05\n[train]\nepochs = 2\n";

/// Writes `text` to `path` and returns the path as a string for arguments.
pub fn write_file(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// Writes `text` to `dir/name` and returns the path as a string.
pub fn write_in(dir: &Path, name: &str, text: &str) -> String {
    write_file(&dir.join(name), text)
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A run's `summary.json`.
pub fn summary(run: &Path) -> mnist_lab::run::rundir::Summary {
    use mnist_lab::run::rundir;
    rundir::read_summary(&run.join(rundir::SUMMARY_FILE)).unwrap()
}

/// The rows of a run's `metrics.csv`.
pub fn metrics_rows(run: &Path) -> usize {
    use mnist_lab::run::{metrics, rundir};
    metrics::read_metrics(&run.join(rundir::METRICS_FILE))
        .unwrap()
        .len()
}

/// The binary with MNIST from [`mnist_dir`], quiet logs and stderr kept.
pub fn spawn(args: &[&str]) -> std::process::Child {
    use std::process::Stdio;
    Command::new(env!("CARGO_BIN_EXE_mnist-lab"))
        .args(args)
        .env("MNIST_DIR", mnist_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// A copy of the shipped subset in `to`; with `relabel`, its training labels
/// moved on by one class (valid files, other contents).
pub fn subset_copy(to: &Path, relabel: bool) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(mnist_subset()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    if relabel {
        let labels = to.join("train-labels-idx1-ubyte.gz");
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(std::fs::File::open(&labels).unwrap()),
            &mut bytes,
        )
        .unwrap();
        for label in &mut bytes[8..] {
            *label = (*label + 1) % 10;
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        std::io::Write::write_all(&mut encoder, &bytes).unwrap();
        std::fs::write(&labels, encoder.finish().unwrap()).unwrap();
    }
    to.to_path_buf()
}
