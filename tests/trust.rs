//! A run's files are trusted only where they agree with one another: resume
//! trains on the data the run recorded, from the run's own state under its own
//! config; commands give the same answer for the same mistake; nothing of the
//! user's is overwritten; every number a user types is bounded.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mnist_lab::run::resume::STATE_FILE;
use mnist_lab::run::rundir::{self, Status};

mod common;
use common::{
    SMALL_LENET5, assert_success, metrics_rows, mnist_subset, run_binary, spawn, stderr,
    subset_copy, summary, trained_run, write_in,
};

/// The binary with `MNIST_DIR` as given (unset for `None`), run in `cwd`, with
/// every download failing at once.
fn binary_with_mnist(cwd: &Path, mnist: Option<&Path>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mnist-lab"));
    command
        .args(args)
        .current_dir(cwd)
        .env("MNIST_MIRRORS", "http://127.0.0.1:9/")
        .env("RUST_LOG", "warn");
    match mnist {
        Some(dir) => command.env("MNIST_DIR", dir),
        None => command.env_remove("MNIST_DIR"),
    };
    command
}

#[test]
fn resume_trains_on_the_data_the_run_recorded_and_warns_about_other_files() {
    let work = tempfile::tempdir().unwrap();
    let recorded = subset_copy(&work.path().join("mnist-a"), false);
    let config = write_in(work.path(), "small.toml", SMALL_LENET5);
    let runs = work.path().join("runs");
    let output = binary_with_mnist(
        work.path(),
        Some(&recorded),
        &["run", &config, "--runs-dir", runs.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_success(&output);
    let run = common::only_run(&runs);
    assert_eq!(summary(&run).data_dir.as_deref(), Some(recorded.as_path()));
    assert_eq!(summary(&run).data_sha256.len(), 4, "the four files' hashes");

    // MNIST_DIR now points nowhere: the run still reads its own folder.
    let resume = |sets: &[&str]| {
        let mut args = vec!["resume", run.to_str().unwrap()];
        for set in sets {
            args.extend(["--set", set]);
        }
        let nowhere = work.path().join("nowhere");
        binary_with_mnist(work.path(), Some(&nowhere), &args)
            .output()
            .unwrap()
    };
    let output = resume(&["train.epochs=2"]);
    assert_success(&output);
    let warned = stderr(&output).contains("differ from those the run trained on");
    assert!(!warned, "{}", stderr(&output));
    assert_eq!(summary(&run).epochs_completed, 2);

    // Another folder only when named, and a warning when its files differ.
    let other = subset_copy(&work.path().join("mnist-b"), true);
    let output = resume(&["train.epochs=3", &format!("data.dir={}", other.display())]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(
        err.contains("differ from those the run trained on") && err.contains("train-labels"),
        "{err}"
    );

    // The folder read last is the run's folder now; once gone, it is named,
    // with the way out.
    assert_eq!(summary(&run).data_dir.as_deref(), Some(other.as_path()));
    std::fs::remove_dir_all(&other).unwrap();
    let output = resume(&["train.epochs=4"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&other.display().to_string()) && err.contains("--set data.dir="),
        "{err}"
    );
}

#[test]
fn a_state_from_another_run_or_under_an_edited_config_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let config = write_in(work.path(), "small.toml", SMALL_LENET5);
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    let first = trained_run(&first, &config);
    let second = trained_run(&second, &config);
    let own_state = std::fs::read(second.join(STATE_FILE)).unwrap();
    let metrics_before = std::fs::read(second.join(rundir::METRICS_FILE)).unwrap();

    let resume_to_two = || {
        run_binary(&[
            "resume",
            second.to_str().unwrap(),
            "--set",
            "train.epochs=2",
        ])
    };

    // The same config and seed, another run: its state is not this run's.
    std::fs::copy(first.join(STATE_FILE), second.join(STATE_FILE)).unwrap();
    let output = resume_to_two();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("belongs to another run"), "{err}");
    let ids = (
        summary(&first).run_id.unwrap(),
        summary(&second).run_id.unwrap(),
    );
    assert!(
        err.contains(&ids.0) && err.contains(&ids.1),
        "names both: {err}"
    );
    assert_eq!(
        std::fs::read(second.join(rundir::METRICS_FILE)).unwrap(),
        metrics_before,
        "metrics.csv untouched"
    );

    // Its own state, under a config.toml edited since.
    std::fs::write(second.join(STATE_FILE), &own_state).unwrap();
    let config_path = second.join(rundir::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).unwrap();
    let edited = text.replace("\nlr = 0.01\n", "\nlr = 0.5\n");
    assert_ne!(edited, text, "{text}");
    std::fs::write(&config_path, edited).unwrap();
    let output = resume_to_two();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("optimizer.lr = 0.5 in config.toml") && err.contains("when trained"),
        "{err}"
    );

    // Restored, it resumes; keys a resume may change are no edit.
    std::fs::write(&config_path, text).unwrap();
    assert_success(&run_binary(&[
        "resume",
        second.to_str().unwrap(),
        "--set",
        "train.epochs=2",
        "--set",
        "train.eval_batch_size=500",
    ]));
    assert_eq!(metrics_rows(&second), 2);
}

#[test]
fn config_errors_on_resume_are_usage_errors_as_on_run() {
    let work = tempfile::tempdir().unwrap();
    let run = trained_run(
        work.path(),
        &write_in(work.path(), "small.toml", SMALL_LENET5),
    );
    for set in [
        "train.epochs=0",
        "train.eval_batch_size=0",
        "device.threads=100000",
    ] {
        let output = run_binary(&["resume", run.to_str().unwrap(), "--set", set]);
        assert_eq!(output.status.code(), Some(2), "{set}: {}", stderr(&output));
    }
    let output = run_binary(&["resume", run.to_str().unwrap(), "--set", "train.epochs=2"]);
    assert_success(&output);
    let output = run_binary(&["resume", run.to_str().unwrap(), "--set", "train.epochs=1"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("fewer than the 2 epochs"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_early_stopped_run_is_not_resumed_into_one_more_epoch() {
    let work = tempfile::tempdir().unwrap();
    // A rate too small to change a prediction: validation accuracy never
    // improves after epoch 1, so patience 1 stops the run after epoch 2.
    let config = SMALL_LENET5.replace("epochs = 1", "epochs = 6\nearly_stopping = 1")
        + "[optimizer]\nlr = 1e-9\n";
    let run = trained_run(work.path(), &write_in(work.path(), "still.toml", &config));
    assert_eq!(summary(&run).epochs_completed, 2, "{:?}", summary(&run));
    for _ in 0..2 {
        let output = run_binary(&["resume", run.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("stopped early")
                && stderr(&output).contains("train.early_stopping=0"),
            "{}",
            stderr(&output)
        );
    }
    assert_eq!(metrics_rows(&run), 2, "no epoch trained");
    let output = run_binary(&[
        "resume",
        run.to_str().unwrap(),
        "--set",
        "train.early_stopping=0",
    ]);
    assert_success(&output);
    assert_eq!((summary(&run).epochs_completed, metrics_rows(&run)), (6, 6));
}

#[test]
fn extending_a_cosine_run_says_what_becomes_of_the_schedule() {
    let work = tempfile::tempdir().unwrap();
    let config =
        SMALL_LENET5.replace("epochs = 1", "epochs = 2") + "[schedule]\nkind = \"cosine\"\n";
    let run = trained_run(work.path(), &write_in(work.path(), "cosine.toml", &config));
    let output = run_binary(&["resume", run.to_str().unwrap(), "--set", "train.epochs=3"]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(
        err.contains("schedule.kind = \"cosine\" spans train.epochs")
            && err.contains("from 2 to 3 epochs")
            && err.contains("epoch 3 trains from lr"),
        "{err}"
    );
}

#[test]
fn a_run_at_chance_accuracy_stops_as_diverged() {
    let work = tempfile::tempdir().unwrap();
    // Adam at 0.2 saturates LeNet5's tanh units: the loss stays finite, the
    // accuracy at chance.
    let config = "[data]\nvalidation_size = 1000\ntest_size = 500\n[optimizer]\nkind = \"adam\"\n\
                  lr = 0.2\n[train]\nepochs = 8\nbatch_size = 16\n";
    let runs = work.path().join("runs");
    let output = run_binary(&[
        "run",
        &write_in(work.path(), "hot.toml", config),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--set",
        &format!("data.dir={}", mnist_subset().display()),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("not learning"),
        "{}",
        stderr(&output)
    );
    let s = summary(&common::only_run(&runs));
    assert_eq!((s.status, s.epochs_completed), (Status::Diverged, 2));
}

#[test]
fn a_failed_write_leaves_the_summary_agreeing_with_metrics_csv_and_resume_cleans_up() {
    let work = tempfile::tempdir().unwrap();
    let config = write_in(
        work.path(),
        "small.toml",
        &SMALL_LENET5.replace("epochs = 1", "epochs = 4"),
    );
    let runs = work.path().join("runs");
    let child = spawn(&["run", &config, "--runs-dir", runs.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        let run = std::fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path());
        if let Some(run) = run
            && rundir::read_summary(&run.join(rundir::SUMMARY_FILE))
                .is_ok_and(|s| s.epochs_completed >= 1)
        {
            break run;
        }
        assert!(Instant::now() < deadline, "no epoch in time");
        std::thread::sleep(Duration::from_millis(5));
    };
    // The next epoch's first write (its checkpoint) fails, as on a full disk.
    let last = run.join(rundir::LAST_CHECKPOINT);
    std::fs::remove_file(&last).unwrap();
    std::fs::create_dir(&last).unwrap();
    std::fs::write(last.join("blocker"), "x").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let s = summary(&run);
    assert_eq!(s.status, Status::Failed);
    assert_eq!(
        s.epochs_completed,
        metrics_rows(&run),
        "summary and metrics.csv agree"
    );

    // Temporary files of writes a kill cut short go with the next resume.
    std::fs::remove_dir_all(&last).unwrap();
    let strays = [
        run.join(".summary.json.99999-0.tmp"),
        run.join(rundir::PLOTS_DIR).join(".loss.png.99999-1.tmp"),
    ];
    for stray in &strays {
        std::fs::write(stray, "half").unwrap();
    }
    assert_success(&run_binary(&["resume", run.to_str().unwrap()]));
    assert!(
        strays.iter().all(|p| !p.exists()),
        "stray temporaries removed"
    );
    assert_eq!((summary(&run).epochs_completed, metrics_rows(&run)), (4, 4));
}
