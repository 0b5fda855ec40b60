//! `mnist-lab search` end to end on a tiny space: successive halving's rungs,
//! promotion and pruning, the same decisions after a SIGTERM and `--resume`,
//! the random scheduler, and config errors.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mnist_lab::run::search::{SearchRecord, TrialStatus};

mod common;
use common::{assert_success, run_binary, spawn, stderr, summary, write_in};

/// Six LeNet5 trials on 4,000 images, rungs at 1, 2 and 4 epochs, halved.
const SEARCH: &str = "name = \"tiny\"\n[data]\ntrain_size = 4000\nvalidation_size = 1000\n\
    test_size = 500\n[train]\nepochs = 4\n[search]\ntrials = 6\nmin_epochs = 1\nreduction = 2\n\
    seed = 7\n[search.space]\n\"optimizer.lr\" = { log_uniform = [0.003, 0.3] }\n\
    \"optimizer.momentum\" = { choice = [0.0, 0.9] }\n";

fn search_folder(work: &Path, name: &str) -> PathBuf {
    work.join(name)
}

fn record(folder: &Path) -> SearchRecord {
    SearchRecord::read(&folder.join("search.json")).unwrap()
}

fn run_search(config: &str, folder: &Path) -> std::process::Output {
    run_binary(&["search", config, "--resume", folder.to_str().unwrap()])
}

#[test]
fn successive_halving_promotes_the_best_and_prunes_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let config = write_in(work.path(), "tiny.toml", SEARCH);
    let folder = search_folder(work.path(), "search");
    let output = run_search(&config, &folder);
    assert_success(&output);
    let record = record(&folder);
    assert_eq!(record.rungs, [1, 2, 4]);
    let decided: Vec<(usize, usize)> = (record.decisions.iter())
        .map(|d| (d.trials.len(), d.promoted.len()))
        .collect();
    assert_eq!(decided, [(6, 3), (3, 1)], "half of each rung goes on");
    // Each promoted trial scored at least as well at its rung as each pruned one.
    for decision in &record.decisions {
        let metric_at_rung = |index: usize| {
            let trial = &record.trials[index];
            let run = trial.run_dir.as_deref().unwrap();
            mnist_lab::run::search::metric_at(run, decision.epochs, record.search.metric).unwrap()
        };
        let worst_promoted = (decision.promoted.iter())
            .map(|&i| metric_at_rung(i))
            .fold(f64::INFINITY, f64::min);
        for &i in decision
            .trials
            .iter()
            .filter(|i| !decision.promoted.contains(i))
        {
            assert!(
                metric_at_rung(i) <= worst_promoted,
                "rung {}: trial {i}",
                decision.rung
            );
        }
    }
    let count = |status| record.trials.iter().filter(|t| t.status == status).count();
    assert_eq!(
        (count(TrialStatus::Pruned), count(TrialStatus::Completed)),
        (5, 1)
    );
    assert_eq!(record.epochs_spent, 3 + 2 * 2 + 4);
    let best = record.best.expect("a best trial");
    assert_eq!(record.trials[best].epochs, 4);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("(best)") && table.contains("pruned"),
        "{table}"
    );
    reads_back(work.path(), &folder, &record);

    // A pruned trial is a normal run: it can be resumed by hand.
    let pruned = (record.trials.iter())
        .find(|t| t.status == TrialStatus::Pruned)
        .unwrap();
    let run = pruned.run_dir.clone().unwrap();
    assert_success(&run_binary(&[
        "resume",
        run.to_str().unwrap(),
        "--set",
        "train.epochs=3",
    ]));
    assert_eq!(summary(&run).epochs_completed, 3);
}

/// `runs`, `compare` and `report` on a finished search: its overview and
/// every trial's row, the leading trials' curves, and its figure.
fn reads_back(work: &Path, folder: &Path, record: &SearchRecord) {
    let best = &record.trials[record.best.unwrap()];
    let markdown = std::fs::read_to_string(folder.join("search.md")).unwrap();
    assert!(
        markdown.contains("![tiny search](search.png)"),
        "{markdown}"
    );
    assert!(markdown.contains(&format!("best trial: {}", best.name)));
    assert_png(&folder.join("search.png"));

    let listed = run_binary(&["runs", folder.to_str().unwrap()]);
    assert_success(&listed);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains(", 11 epochs spent, metric val_acc"), "{text}");
    assert!(
        text.contains("optimizer.momentum") && text.contains("rung"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("tiny-t00")).count(),
        6,
        "a row per trial: {text}"
    );

    let output = work.join("compared");
    let compared = run_binary(&[
        "compare",
        folder.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_success(&compared);
    let table = std::fs::read_to_string(output.join("compare.md")).unwrap();
    assert!(table.contains("![tiny search](search-tiny.png)"), "{table}");
    // Only the trial that reached the last rung is drawn.
    assert_eq!(table.matches("| tiny-t00").count(), 1, "{table}");
    assert!(table.contains(&format!("| {} |", best.name)), "{table}");
    assert_png(&output.join("search-tiny.png"));

    let assets = work.join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    let asset = |file: &str| (assets.join(file), format!("assets/{file}"));
    let section = mnist_lab::analyze::search_report::section(work, &asset).unwrap();
    assert!(section.starts_with("## Searches"), "{section}");
    assert!(section.contains("(assets/search-search.png)"), "{section}");
    assert_png(&assets.join("search-search.png"));
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        path.display()
    );
}

#[test]
fn a_search_stopped_by_sigterm_continues_to_the_same_decisions() {
    let work = tempfile::tempdir().unwrap();
    let config = write_in(work.path(), "tiny.toml", SEARCH);
    let straight = search_folder(work.path(), "straight");
    assert_success(&run_search(&config, &straight));

    let stopped = search_folder(work.path(), "stopped");
    let args = [
        "search",
        config.as_str(),
        "--resume",
        stopped.to_str().unwrap(),
    ];
    let child = spawn(&args);
    // Stop it once the first rung is decided and the second has begun.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let record = SearchRecord::read(&stopped.join("search.json")).ok();
        if record.is_some_and(|r| !r.decisions.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first rung was never decided"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(143), "{}", stderr(&output));

    assert_success(&run_binary(&args));
    let (a, b) = (record(&straight), record(&stopped));
    assert_eq!(a.decisions.len(), 2);
    let decisions = |r: &SearchRecord| -> Vec<(usize, Vec<usize>, Vec<usize>)> {
        (r.decisions.iter())
            .map(|d| (d.epochs, d.trials.clone(), d.promoted.clone()))
            .collect()
    };
    assert_eq!(decisions(&a), decisions(&b), "the same decisions");
    let outcome = |r: &SearchRecord| -> Vec<(TrialStatus, usize, Option<f64>)> {
        r.trials
            .iter()
            .map(|t| (t.status, t.epochs, t.metric))
            .collect()
    };
    assert_eq!(
        outcome(&a),
        outcome(&b),
        "the same trials, epochs and metrics"
    );
    assert_eq!(a.epochs_spent, b.epochs_spent, "no epoch trained twice");
    let dirs = std::fs::read_dir(&stopped)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("summary.json").is_file())
        .count();
    assert_eq!(dirs, 6, "one run directory per trial");
}

#[test]
fn the_random_scheduler_trains_every_trial_to_the_full_epochs() {
    let work = tempfile::tempdir().unwrap();
    let text = SEARCH
        .replace("epochs = 4", "epochs = 2")
        .replace("trials = 6", "trials = 3\nscheduler = \"random\"");
    let config = write_in(work.path(), "random.toml", &text);
    let folder = search_folder(work.path(), "random");
    assert_success(&run_search(&config, &folder));
    let record = record(&folder);
    assert_eq!(record.rungs, [2]);
    assert!(record.decisions.is_empty());
    assert!(
        record
            .trials
            .iter()
            .all(|t| t.status == TrialStatus::Completed && t.epochs == 2)
    );
    assert_eq!(record.epochs_spent, 6);
}

#[test]
fn a_search_config_is_checked_before_anything_trains() {
    let work = tempfile::tempdir().unwrap();
    let config = write_in(work.path(), "tiny.toml", SEARCH);
    let runs = work.path().join("runs");
    let output = run_binary(&["run", &config, "--runs-dir", runs.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("mnist-lab search"),
        "{}",
        stderr(&output)
    );
    let bad = write_in(
        work.path(),
        "bad.toml",
        &SEARCH.replace("[0.003, 0.3]", "[0.0, 0.3]"),
    );
    let output = run_binary(&["search", &bad, "--runs-dir", runs.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("search.space.optimizer.lr"),
        "{}",
        stderr(&output)
    );
    let unknown = write_in(
        work.path(),
        "unknown.toml",
        &SEARCH.replace("\"optimizer.momentum\"", "\"optimizer.momentom\""),
    );
    let output = run_binary(&["search", &unknown, "--runs-dir", runs.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("momentom"), "{}", stderr(&output));
    assert!(!runs.exists(), "nothing trained, nothing written");
}
