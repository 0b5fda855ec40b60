//! Nothing lost: a run stopped by SIGTERM or killed outright continues with
//! `mnist-lab resume` and ends exactly as a run never stopped; a diverging run
//! stops as `diverged`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mnist_lab::run::metrics::read_metrics;
use mnist_lab::run::rundir::{self, Status, Summary};

mod common;
use common::{assert_success, only_run, run_binary, spawn};

/// LeNet5 with every source of randomness on (shuffle, shift augmentation,
/// dropout) and every kind of state (Adam moments, BatchNorm statistics, a
/// moving average of the weights), on
/// 4,000 images: a few tenths of a second per epoch.
const EVERY_STATE: &str = "[model]\nbatch_norm = true\ndropout = 0.2\n\
    [data]\ntrain_size = 4000\nvalidation_size = 1000\ntest_size = 1000\naugment_shift = 2\n\
    [optimizer]\nkind = \"adam\"\n[schedule]\nkind = \"cosine\"\n[train]\nepochs = 5\nema_decay = 0.99\n";

fn write_config(dir: &Path) -> String {
    let path = dir.join("every_state.toml");
    std::fs::write(&path, EVERY_STATE).unwrap();
    path.display().to_string()
}

fn summary(run: &Path) -> Summary {
    rundir::read_summary(&run.join(rundir::SUMMARY_FILE)).unwrap()
}

/// Waits until the run under `runs` has completed `epochs` epochs.
fn wait_for_epochs(runs: &Path, epochs: usize) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let run = std::fs::read_dir(runs)
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path());
        if let Some(run) = run
            && rundir::read_summary(&run.join(rundir::SUMMARY_FILE))
                .is_ok_and(|s| s.epochs_completed >= epochs)
        {
            return run;
        }
        assert!(Instant::now() < deadline, "no epoch {epochs} in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// metrics.csv without the timing columns, which differ between any two runs.
fn learned_metrics(run: &Path) -> Vec<[f64; 6]> {
    read_metrics(&run.join(rundir::METRICS_FILE))
        .unwrap()
        .iter()
        .map(|m| {
            [
                m.epoch as f64,
                m.train_loss,
                m.train_acc,
                m.val_loss.expect("a validation split"),
                m.val_acc.expect("a validation split"),
                m.lr,
            ]
        })
        .collect()
}

fn bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn sigterm_then_resume_ends_exactly_as_a_run_never_stopped() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path());
    let straight_runs = work.path().join("straight");
    let stopped_runs = work.path().join("stopped");
    let straight = run_binary(&[
        "run",
        &config,
        "--runs-dir",
        straight_runs.to_str().unwrap(),
    ]);
    assert_success(&straight);
    let straight = only_run(&straight_runs);

    let child = spawn(&["run", &config, "--runs-dir", stopped_runs.to_str().unwrap()]);
    let stopped = wait_for_epochs(&stopped_runs, 2);
    signal(&child, "-TERM");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(143), "SIGTERM exits 143");
    let interrupted = summary(&stopped);
    assert_eq!(interrupted.status, Status::Interrupted);
    assert!((2..5).contains(&interrupted.epochs_completed));
    assert_eq!(
        learned_metrics(&stopped).len(),
        interrupted.epochs_completed,
        "metrics.csv holds every completed epoch"
    );

    let resumed = run_binary(&["resume", stopped.to_str().unwrap()]);
    assert_success(&resumed);
    let after = summary(&stopped);
    assert_eq!(after.status, Status::Completed);
    assert_eq!(after.epochs_completed, 5);
    assert_eq!(after.resumed_at.len(), 1);
    assert_eq!(learned_metrics(&stopped), learned_metrics(&straight));
    for file in [rundir::LAST_CHECKPOINT, rundir::BEST_CHECKPOINT] {
        assert!(
            bytes(stopped.join(file)) == bytes(straight.join(file)),
            "{file} differs from the uninterrupted run's"
        );
    }
    assert_eq!(after.test_acc, summary(&straight).test_acc);
    // The checkpoint of a LeNet5 with BatchNorm, trained with shifts and a
    // partial last batch (4,000 = 62.5 x 64), reloads to its own test accuracy.
    let eval = run_binary(&["eval", stopped.to_str().unwrap(), "--json"]);
    assert_success(&eval);
    let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let reloaded = eval["accuracy"].as_f64().unwrap();
    assert!(
        (reloaded - after.test_acc.unwrap()).abs() < 1e-6,
        "{reloaded}"
    );

    // A finished run is extended with more epochs, and refuses other changes.
    let again = run_binary(&["resume", stopped.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("train.epochs="));
    let changed = run_binary(&[
        "resume",
        stopped.to_str().unwrap(),
        "--set",
        "optimizer.lr=1",
    ]);
    assert_eq!(changed.status.code(), Some(2));
    let longer = run_binary(&[
        "resume",
        stopped.to_str().unwrap(),
        "--set",
        "train.epochs=6",
    ]);
    assert_success(&longer);
    assert_eq!(learned_metrics(&stopped).len(), 6);
}

#[test]
fn a_killed_run_shows_as_stale_and_resume_finishes_it() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path());
    let runs = work.path().join("runs");
    let mut child = spawn(&["run", &config, "--runs-dir", runs.to_str().unwrap()]);
    let run = wait_for_epochs(&runs, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(summary(&run).epochs_completed < 5, "killed before the end");

    let listing = run_binary(&["runs", runs.to_str().unwrap()]);
    assert_success(&listing);
    assert!(String::from_utf8_lossy(&listing.stdout).contains("stale"));

    let resumed = run_binary(&["resume", run.to_str().unwrap()]);
    assert_success(&resumed);
    let after = summary(&run);
    assert_eq!(
        (after.status, after.epochs_completed),
        (Status::Completed, 5)
    );
    assert_eq!(learned_metrics(&run).len(), 5);
}

#[test]
fn an_exploding_learning_rate_stops_the_run_as_diverged() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("plain.toml");
    let plain = "[data]\ntrain_size = 4000\nvalidation_size = 1000\ntest_size = 1000\n\
                 [train]\nepochs = 8\n";
    std::fs::write(&config, plain).unwrap();
    let runs = work.path().join("runs");
    let run = |sets: &[&str]| {
        let (config, runs) = (config.to_str().unwrap(), runs.to_str().unwrap());
        let mut args = vec!["run", config, "--runs-dir", runs];
        for set in sets {
            args.extend(["--set", set]);
        }
        run_binary(&args)
    };
    // A rate warming up to 2 over the whole run: harmless for an epoch or more,
    // fatal well before the end (which epoch depends on the kernels' numerics).
    let output = run(&["optimizer.lr=2", "schedule.warmup_epochs=8"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("diverged") && stderr.contains("optimizer.lr (now 2)"),
        "{stderr}"
    );
    let diverged = only_run(&runs);
    let s = summary(&diverged);
    assert_eq!(s.status, Status::Diverged);
    assert!((1..8).contains(&s.epochs_completed), "{s:?}");
    let failing_epoch = format!("at epoch {}", s.epochs_completed + 1);
    assert!(stderr.contains(&failing_epoch), "{stderr}");
    assert!(
        diverged.join(rundir::LAST_CHECKPOINT).is_file(),
        "the last good epoch is kept"
    );
    // Diverging in the first epoch leaves nothing behind.
    std::fs::remove_dir_all(&diverged).unwrap();
    let output = run(&["optimizer.lr=1e9"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0);
}

#[test]
fn an_interrupted_sweep_continues_without_redoing_a_run() {
    let work = tempfile::tempdir().unwrap();
    let grid = work.path().join("grid.toml");
    std::fs::write(
        &grid,
        "[data]\ntrain_size = 4000\nvalidation_size = 1000\ntest_size = 1000\n\
         [train]\nepochs = 3\n[sweep]\n\"optimizer.lr\" = [0.01, 0.02, 0.03]\n",
    )
    .unwrap();
    let runs = work.path().join("runs");
    let record_dir = work.path().join("record");
    let record_path = record_dir.join("sweep.json");
    let args = [
        "sweep",
        grid.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--resume",
        record_dir.to_str().unwrap(),
    ];
    let child = spawn(&args);
    // Stop the sweep once its second run has completed an epoch.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let second_run_dir = mnist_lab::run::sweep::SweepRecord::read(&record_path)
            .ok()
            .and_then(|r| r.runs[1].run_dir.clone());
        if second_run_dir.is_some_and(|dir| {
            rundir::read_summary(&dir.join(rundir::SUMMARY_FILE))
                .is_ok_and(|s| s.epochs_completed >= 1)
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "the second run never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, "-TERM");
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(143));
    let stopped = mnist_lab::run::sweep::SweepRecord::read(&record_path).unwrap();
    let statuses: Vec<Status> = stopped.runs.iter().map(|r| r.status).collect();
    assert_eq!(statuses[0], Status::Completed);
    assert!(
        matches!(statuses[1], Status::Interrupted | Status::Completed),
        "{statuses:?}"
    );
    let first_run = stopped.runs[0].run_dir.clone().unwrap();
    let first_before = summary(&first_run);

    // The same command line continues it: nothing is redone.
    let output = run_binary(&args);
    assert_success(&output);
    let record = mnist_lab::run::sweep::SweepRecord::read(&record_path).unwrap();
    assert!(record.runs.iter().all(|r| r.status == Status::Completed));
    assert_eq!(
        std::fs::read_dir(&runs).unwrap().count(),
        3,
        "one directory per run"
    );
    assert_eq!(
        summary(&first_run),
        first_before,
        "the completed run was left alone"
    );
    for entry in &record.runs {
        let run = summary(entry.run_dir.as_ref().unwrap());
        assert_eq!(run.epochs_completed, 3);
        assert_eq!(learned_metrics(entry.run_dir.as_ref().unwrap()).len(), 3);
    }
}

#[test]
fn a_run_stopped_before_its_first_epoch_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path());
    let runs = work.path().join("runs");
    let child = spawn(&["run", &config, "--runs-dir", runs.to_str().unwrap()]);
    // Data loading and the first epoch take most of a second.
    std::thread::sleep(Duration::from_millis(150));
    signal(&child, "-TERM");
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let left = std::fs::read_dir(&runs).map_or(0, |d| d.count());
    assert_eq!(left, 0, "no run directory without a completed epoch");
}

#[test]
fn a_second_signal_quits_at_once_and_still_marks_the_run_interrupted() {
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path());
    let runs = work.path().join("runs");
    let child = spawn(&["run", &config, "--runs-dir", runs.to_str().unwrap()]);
    let run = wait_for_epochs(&runs, 1);
    signal(&child, "-INT");
    signal(&child, "-INT");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "SIGINT exits 130");
    let s = summary(&run);
    assert_eq!(s.status, Status::Interrupted);
    assert!(s.epochs_completed >= 1);
    let resumed = run_binary(&["resume", run.to_str().unwrap()]);
    assert_success(&resumed);
    assert_eq!(summary(&run).status, Status::Completed);
}
