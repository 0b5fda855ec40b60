//! End-to-end tests: drive the `mnist-lab` binary on small subsets of real MNIST
//! and check what a user would: accuracy well above chance, every file present
//! and loadable, clear errors that leave nothing behind.
//!
//! MNIST comes from `MNIST_DIR` or `data/mnist`, else the subset in `tests/data`.

use std::path::Path;
use std::process::{Command, Output};

use mnist_lab::run::rundir::{self, Status};

mod common;
use common::{assert_success, config_path, mnist_dir, only_run, run_binary};

fn mnist_lab(args: &[&str], runs_dir: &Path) -> Output {
    let runs_dir = runs_dir.display().to_string();
    let mut args = args.to_vec();
    args.extend(["--runs-dir", &runs_dir]);
    run_binary(&args)
}

#[test]
fn lenet5_trains_on_a_subset_and_writes_a_complete_run() {
    let runs = tempfile::tempdir().unwrap();
    let output = mnist_lab(
        &[
            "run",
            &config_path("lenet5.toml"),
            "--set",
            "name=e2e",
            "--set",
            "train.epochs=3",
            "--set",
            "data.train_size=3000",
            "--set",
            "data.validation_size=1000",
            "--set",
            "data.test_size=2000",
            "--set",
            "optimizer.lr=0.05",
        ],
        runs.path(),
    );
    assert_success(&output);
    let run = only_run(runs.path());
    assert!(
        run.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("e2e-")
    );

    let summary = rundir::read_summary(&run.join(rundir::SUMMARY_FILE)).unwrap();
    assert_eq!(summary.status, Status::Completed);
    assert_eq!(summary.params, 61_706);
    assert_eq!(summary.epochs_completed, 3);
    let test_acc = summary.test_acc.unwrap();
    assert!(
        test_acc > 0.8,
        "test accuracy {test_acc} is not well above chance"
    );

    let metrics = mnist_lab::run::metrics::read_metrics(&run.join(rundir::METRICS_FILE)).unwrap();
    assert_eq!(
        metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(metrics[2].train_loss < metrics[0].train_loss, "{metrics:?}");
    let best = metrics.iter().filter_map(|m| m.val_acc).fold(0.0, f64::max);
    // summary.json rounds its figures to six decimals.
    assert!((summary.best_val_acc.unwrap() - best).abs() < 1e-6);
    assert!(summary.hparams["optimizer.lr"] == 0.05 && summary.hparams["model.kind"] == "lenet5");
    let tensorboard = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .expect("an event file for TensorBoard");
    assert!(std::fs::metadata(tensorboard).unwrap().len() > 1000);

    let events = std::fs::read_to_string(run.join(rundir::EVENTS_FILE)).unwrap();
    let epochs: Vec<serde_json::Value> = events
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|event| event["message"] == "epoch")
        .collect();
    assert_eq!(epochs.len(), 3);
    for field in [
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "epoch_secs",
        "images_per_sec",
    ] {
        assert!(
            epochs[0][field].is_number(),
            "{field} missing from {}",
            epochs[0]
        );
    }

    let config = std::fs::read_to_string(run.join(rundir::CONFIG_FILE)).unwrap();
    assert!(
        config.contains("epochs = 3") && config.contains("lr = 0.05"),
        "{config}"
    );
    for plot in ["loss.png", "accuracy.png", "curves.png"] {
        let image = image::open(run.join(rundir::PLOTS_DIR).join(plot)).unwrap();
        assert!(image.width() >= 800, "{plot}");
    }
    let last = candle_core::safetensors::load(
        run.join(rundir::LAST_CHECKPOINT),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(last["conv1.weight"].dims(), &[6, 1, 5, 5]);

    // The best checkpoint, reloaded, reproduces the summary's test accuracy.
    let data_dir = format!("data.dir={}", mnist_dir().display())
        .parse()
        .unwrap();
    let model = mnist_lab::analyze::evaluate::TrainedModel::load(
        &run,
        rundir::BEST_CHECKPOINT,
        &[data_dir],
    )
    .unwrap();
    let (score, _) = mnist_lab::analyze::evaluate::evaluate(&model).unwrap();
    assert!(
        (score.accuracy - test_acc).abs() < 1e-9,
        "{} vs {test_acc}",
        score.accuracy
    );

    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A regularised MLP (BatchNorm, dropout, AdamW, cosine) trains, twice identically.
#[test]
fn regularised_mlp_trains_and_repeats_exactly_with_a_seed() {
    let runs = tempfile::tempdir().unwrap();
    let args = [
        "run",
        &config_path("custom_mlp.toml"),
        "--set",
        "train.epochs=2",
        "--set",
        "data.train_size=4000",
        "--set",
        "data.validation_size=1000",
        "--set",
        "data.test_size=2000",
        "--set",
        "model.batch_norm=true",
        "--set",
        "model.dropout=0.1",
        "--set",
        "optimizer.kind=adamw",
        "--set",
        "optimizer.weight_decay=0.01",
        "--set",
        "schedule.kind=cosine",
        "--set",
        "seed=3",
    ];
    let first = tempfile::tempdir().unwrap();
    assert_success(&mnist_lab(&args, first.path()));
    assert_success(&mnist_lab(&args, runs.path()));
    let a = only_run(first.path());
    let b = only_run(runs.path());
    let summary = rundir::read_summary(&a.join(rundir::SUMMARY_FILE)).unwrap();
    assert_eq!(summary.params, 61_450 + 2 * 6 * 48);
    assert!(summary.test_acc.unwrap() > 0.8, "{summary:?}");
    let losses = |run: &Path| -> Vec<f64> {
        mnist_lab::run::metrics::read_metrics(&run.join(rundir::METRICS_FILE))
            .unwrap()
            .iter()
            .map(|m| m.train_loss)
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
}

/// `data.validation_size = 0` trains on every training image: no validation
/// figures, and the last epoch is the model that is tested and kept.
#[test]
fn training_on_every_image_keeps_the_last_epoch() {
    let runs = tempfile::tempdir().unwrap();
    let config = config_path("custom_mlp.toml");
    let mut args = vec![
        "run",
        &config,
        "--set",
        "train.epochs=3",
        "--set",
        "data.train_size=4000",
        "--set",
        "data.test_size=2000",
        "--set",
        "data.validation_size=0",
        "--set",
        "optimizer.kind=adamw",
        "--set",
        "optimizer.lr=0.003",
        "--set",
        "model.batch_norm=true",
    ];
    assert_success(&mnist_lab(&args, runs.path()));
    let run = only_run(runs.path());
    let summary = rundir::read_summary(&run.join(rundir::SUMMARY_FILE)).unwrap();
    assert_eq!(summary.status, Status::Completed);
    assert_eq!((summary.best_epoch, summary.best_val_acc), (Some(3), None));
    assert!(summary.test_acc.unwrap() > 0.8, "{summary:?}");
    let metrics = mnist_lab::run::metrics::read_metrics(&run.join(rundir::METRICS_FILE)).unwrap();
    assert_eq!(metrics.len(), 3);
    assert!(
        metrics
            .iter()
            .all(|m| m.val_acc.is_none() && m.val_loss.is_none())
    );
    let bytes = |file: &str| std::fs::read(run.join(file)).unwrap();
    assert_eq!(
        bytes(rundir::BEST_CHECKPOINT),
        bytes(rundir::LAST_CHECKPOINT)
    );
    assert!(run.join(rundir::PLOTS_DIR).join("curves.png").exists());

    // Early stopping has nothing to watch without a validation split.
    args.extend(["--set", "train.early_stopping=2"]);
    let refused = tempfile::tempdir().unwrap();
    let output = mnist_lab(&args, refused.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("train.early_stopping"), "{stderr}");
    assert_eq!(std::fs::read_dir(refused.path()).unwrap().count(), 0);
}

#[test]
fn invalid_config_fails_clearly_and_creates_no_run() {
    let runs = tempfile::tempdir().unwrap();
    let config = runs.path().join("bad.toml");
    std::fs::write(&config, "[optimizer]\nkind = \"sgd\"\nmomentun = 0.9\n").unwrap();
    let output = mnist_lab(
        &["run", config.to_str().unwrap()],
        &runs.path().join("runs"),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("momentun") && stderr.contains("line 3"),
        "{stderr}"
    );
    assert!(!runs.path().join("runs").exists());

    let output = mnist_lab(
        &[
            "run",
            &config_path("lenet5.toml"),
            "--set",
            "train.batch_size=0",
        ],
        runs.path(),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--set train.batch_size=0") && stderr.contains("at least 1"),
        "{stderr}"
    );

    let output = mnist_lab(&["run", "no/such/config.toml"], runs.path());
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no/such/config.toml"));
    assert_eq!(
        std::fs::read_dir(runs.path()).unwrap().count(),
        1,
        "only bad.toml is there"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_cpu_build_names_the_fix() {
    let runs = tempfile::tempdir().unwrap();
    let output = mnist_lab(
        &[
            "run",
            &config_path("lenet5.toml"),
            "--set",
            "device.kind=cuda:1",
        ],
        runs.path(),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--features cuda"), "{stderr}");
    assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0);
}

#[test]
fn config_command_prints_the_resolved_config() {
    let output = Command::new(env!("CARGO_BIN_EXE_mnist-lab"))
        .args([
            "config",
            &config_path("lenet5_reg.toml"),
            "--set",
            "optimizer.lr=0.2",
        ])
        .output()
        .unwrap();
    assert_success(&output);
    let text = String::from_utf8_lossy(&output.stdout);
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(parsed["optimizer"]["lr"].as_float(), Some(0.2));
    assert_eq!(parsed["model"]["batch_norm"].as_bool(), Some(true));
}
