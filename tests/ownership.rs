//! One owner per run and per sweep record: two processes started together on one
//! run (or one sweep record) never both train it, and a run left `running` by a
//! process that is gone, on any host, is stale and taken over.

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use mnist_lab::run::rundir::{self, Status};
use mnist_lab::run::sweep::SweepRecord;

mod common;
use common::{
    SMALL_LENET5, assert_success, metrics_rows, only_run, run_binary, spawn, stderr, summary,
    write_in,
};

/// Two processes on the same command line, started together: the one that
/// succeeded, and the other's output.
fn race(args: &[&str]) -> ((u32, Output), (u32, Output)) {
    let (a, b) = (spawn(args), spawn(args));
    let (a_id, b_id) = (a.id(), b.id());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    match (a.status.success(), b.status.success()) {
        (true, false) => ((a_id, a), (b_id, b)),
        (false, true) => ((b_id, b), (a_id, a)),
        _ => panic!(
            "exactly one should win: {:?} {}\n{:?} {}",
            a.status,
            stderr(&a),
            b.status,
            stderr(&b)
        ),
    }
}

#[test]
fn two_resumes_of_one_run_started_together_train_it_once() {
    let work = tempfile::tempdir().unwrap();
    let runs = work.path().join("runs");
    let run = common::trained_run(
        work.path(),
        &write_in(work.path(), "small.toml", SMALL_LENET5),
    );
    let ((winner, _), (_, loser)) =
        race(&["resume", run.to_str().unwrap(), "--set", "train.epochs=4"]);
    assert_eq!(loser.status.code(), Some(1), "{}", stderr(&loser));
    let err = stderr(&loser);
    // Under load the second may start only once the first has finished: then
    // the run is complete at 4 epochs, and it says so.
    assert!(
        (err.contains("is in use by") && err.contains(&format!("process {winner} on ")))
            || err.contains("completed all 4 epochs"),
        "the loser names the owner: {err}"
    );
    let after = summary(&run);
    assert_eq!(
        (after.status, after.epochs_completed),
        (Status::Completed, 4)
    );
    assert_eq!(after.resumed_at.len(), 1, "resumed once");
    assert_eq!(metrics_rows(&run), 4);
    assert_eq!(only_run(&runs), run);
}

#[test]
fn two_sweeps_continuing_one_record_train_each_run_once() {
    let work = tempfile::tempdir().unwrap();
    let (runs, record) = (work.path().join("runs"), work.path().join("record"));
    let args = grid_sweep(work.path(), 3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Under load the second may start only once the first has finished; then
    // it finds the record complete and exits 0. Either way: each run once.
    let (a, b) = (spawn(&args), spawn(&args));
    let ids = [a.id(), b.id()];
    let outputs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    for (i, output) in outputs.iter().enumerate() {
        if !output.status.success() {
            assert_eq!(output.status.code(), Some(1), "{}", stderr(output));
            let other = ids[1 - i];
            assert!(
                stderr(output).contains(&format!("process {other} on ")),
                "the loser names the owner: {}",
                stderr(output)
            );
            assert!(
                outputs[1 - i].status.success(),
                "{}",
                stderr(&outputs[1 - i])
            );
        }
    }
    let names: Vec<PathBuf> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "one directory per run, none twice: {names:?}"
    );
    let record = SweepRecord::read(&record.join("sweep.json")).unwrap();
    assert!(record.runs.iter().all(|r| r.status == Status::Completed));
    for entry in &record.runs {
        let run = summary(entry.run_dir.as_ref().unwrap());
        assert!(run.resumed_at.is_empty(), "trained once, never taken over");
        assert_eq!(run.epochs_completed, 3);
    }
}

/// A grid of two runs of `epochs` epochs in `work/grid.toml`, and the `sweep`
/// command line that puts its runs in `work/runs` and its record in `work/record`.
fn grid_sweep(work: &Path, epochs: usize) -> Vec<String> {
    let config = SMALL_LENET5.replace("epochs = 1", &format!("epochs = {epochs}"));
    let grid = write_in(
        work,
        "grid.toml",
        &format!("{config}[sweep]\n\"optimizer.lr\" = [0.01, 0.02]\n"),
    );
    let (runs, record) = (work.join("runs"), work.join("record"));
    [
        "sweep",
        &grid,
        "--runs-dir",
        runs.to_str().unwrap(),
        "--resume",
        record.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Rewrites a run's summary as a process on another machine, now lost, left it.
fn as_left_by_a_lost_node(run: &Path) {
    let mut s = summary(run);
    s.status = Status::Running;
    s.hostname = Some("node-lost-17".into());
    s.pid = Some(4242);
    let json = serde_json::to_vec_pretty(&s).unwrap();
    std::fs::write(run.join(rundir::SUMMARY_FILE), json).unwrap();
}

/// Waits until `path`'s run (found by `find`) has completed an epoch, then kills it.
fn kill_after_first_epoch(mut child: Child, find: impl Fn() -> Option<PathBuf>) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        if let Some(run) = find()
            && rundir::read_summary(&run.join(rundir::SUMMARY_FILE))
                .is_ok_and(|s| s.epochs_completed >= 1)
        {
            break run;
        }
        assert!(Instant::now() < deadline, "no epoch in time");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    run
}

#[test]
fn a_run_left_running_by_a_lost_node_is_stale_and_resume_takes_it_over() {
    let work = tempfile::tempdir().unwrap();
    let config = write_in(
        work.path(),
        "small.toml",
        &SMALL_LENET5.replace("epochs = 1", "epochs = 3"),
    );
    let runs = work.path().join("runs");
    let child = spawn(&["run", &config, "--runs-dir", runs.to_str().unwrap()]);
    let run = kill_after_first_epoch(child, || {
        std::fs::read_dir(&runs)
            .ok()?
            .next()
            .map(|e| e.unwrap().path())
    });
    as_left_by_a_lost_node(&run);

    let listing = run_binary(&["runs", runs.to_str().unwrap()]);
    assert_success(&listing);
    let table = String::from_utf8_lossy(&listing.stdout);
    assert!(
        table.contains("stale") && !table.contains("running"),
        "{table}"
    );

    let resumed = run_binary(&["resume", run.to_str().unwrap()]);
    assert_success(&resumed);
    assert!(
        stderr(&resumed).contains("taking it over"),
        "{}",
        stderr(&resumed)
    );
    let after = summary(&run);
    assert_eq!(
        (after.status, after.epochs_completed),
        (Status::Completed, 3)
    );
    assert_eq!(metrics_rows(&run), 3);
}

#[test]
fn a_sweep_resumes_a_run_a_lost_node_left_running() {
    let work = tempfile::tempdir().unwrap();
    let (runs, record_dir) = (work.path().join("runs"), work.path().join("record"));
    let args = grid_sweep(work.path(), 3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let record_path = record_dir.join("sweep.json");
    let run = kill_after_first_epoch(spawn(&args), || {
        SweepRecord::read(&record_path).ok()?.runs[0]
            .run_dir
            .clone()
    });
    as_left_by_a_lost_node(&run);

    let output = run_binary(&args);
    assert_success(&output);
    let record = SweepRecord::read(&record_path).unwrap();
    assert!(
        record.runs.iter().all(|r| r.status == Status::Completed),
        "{:?}",
        record.runs.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(record.runs[0].run_dir.as_deref(), Some(run.as_path()));
    assert_eq!(summary(&run).epochs_completed, 3);
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 2);
}

#[test]
fn a_sweep_record_pointing_at_another_entrys_run_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (runs, record_dir) = (work.path().join("runs"), work.path().join("record"));
    let args = grid_sweep(work.path(), 1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_success(&run_binary(&args));
    let record_path = record_dir.join("sweep.json");
    let original = std::fs::read_to_string(&record_path).unwrap();

    // The entries' directories swapped, their runs marked as stopped: without
    // the check the sweep would settle each entry from the other's run.
    let mut record: serde_json::Value = serde_json::from_str(&original).unwrap();
    let dirs = [
        record["runs"][0]["run_dir"].clone(),
        record["runs"][1]["run_dir"].clone(),
    ];
    for (i, dir) in [(0, &dirs[1]), (1, &dirs[0])] {
        record["runs"][i]["run_dir"] = dir.clone();
        record["runs"][i]["status"] = "interrupted".into();
    }
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    let output = run_binary(&args);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("run 0 (")
            && err.contains("another run's config")
            && err.contains("optimizer.lr"),
        "{err}"
    );

    // Two entries sharing one directory.
    record["runs"][0]["run_dir"] = dirs[0].clone();
    record["runs"][1]["run_dir"] = dirs[0].clone();
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    let err = stderr(&run_binary(&args));
    assert!(err.contains("records the same directory"), "{err}");
    assert_eq!(
        std::fs::read_dir(&runs).unwrap().count(),
        2,
        "nothing trained"
    );
}
