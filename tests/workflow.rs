//! End-to-end tests of what comes after training: sweeps, listing, comparing,
//! evaluating, predicting and the report, on short real runs on MNIST subsets.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use mnist_lab::data::{MNIST_SIDE, Mnist};
use mnist_lab::run::rundir::{self, Status, Summary};
use mnist_lab::run::sweep::{self, SweepRecord};

mod common;
use common::{assert_success, mnist_dir, run_binary};

/// A quick CustomMLP config: two epochs on 3,000 images.
const QUICK_MLP: &str = "[model]\nkind = \"custom_mlp\"\n\
    [data]\ntrain_size = 3000\nvalidation_size = 1000\ntest_size = 1000\n\
    [optimizer]\nlr = 0.05\n[train]\nepochs = 2\n";

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn summary(run: &Path) -> Summary {
    rundir::read_summary(&run.join(rundir::SUMMARY_FILE)).unwrap()
}

/// The path of the one sweep record written under `runs`.
fn record_path(runs: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(sweep::RECORD_FILE).is_file())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].join(sweep::RECORD_FILE)
}

/// A folder that looks like MNIST but whose training images are corrupt.
fn broken_mnist(dir: &Path) -> PathBuf {
    let broken = dir.join("broken-mnist");
    std::fs::create_dir_all(&broken).unwrap();
    for (name, _) in mnist_lab::data::MNIST_FILES {
        std::fs::write(broken.join(name), b"not an IDX file").unwrap();
    }
    broken
}

#[test]
fn sweep_expands_a_grid_and_survives_a_failing_run() {
    let work = tempfile::tempdir().unwrap();
    let config = write(
        &work.path().join("grid.toml"),
        &format!("{QUICK_MLP}[sweep]\n\"model.batch_norm\" = [false, true]\n"),
    );
    let runs = work.path().join("runs");
    let data_dirs = format!(
        "data.dir={},{}",
        mnist_dir().display(),
        broken_mnist(work.path()).display()
    );
    let runs_arg = runs.display().to_string();
    let args = [
        "sweep",
        &config,
        "--set",
        &data_dirs,
        "--runs-dir",
        &runs_arg,
    ];

    // --list shows four runs; two shards split them exactly.
    let listed = |extra: &[&str]| {
        let mut all = args.to_vec();
        all.extend(extra);
        let output = run_binary(&all);
        assert_success(&output);
        stdout(&output)
    };
    let full = listed(&["--list"]);
    assert_eq!(full.lines().count(), 5, "{full}");
    let mut names = HashSet::new();
    for line in full.lines().skip(1) {
        assert!(names.insert(line.split_whitespace().nth(2).unwrap().to_string()));
    }
    assert!(!runs.exists(), "--list runs nothing");

    let output = run_binary(&args);
    assert!(!output.status.success(), "two runs fail, so the sweep does");
    assert!(
        stderr(&output).contains("2 of 4 runs failed"),
        "{}",
        stderr(&output)
    );
    let table = stdout(&output);
    assert_eq!(table.matches("completed").count(), 2, "{table}");
    assert_eq!(table.matches("failed").count(), 2, "{table}");

    let record = SweepRecord::read(&record_path(&runs)).unwrap();
    assert_eq!(record.total_runs, 4);
    let recorded: HashSet<String> = record.runs.iter().map(|r| r.name.clone()).collect();
    assert_eq!(recorded, names);
    // The record is a sweep of its own: the same runs, with their saved configs.
    let record_arg = record_path(&runs).display().to_string();
    let relisted = stdout(&run_binary(&["sweep", &record_arg, "--list"]));
    let relisted: HashSet<String> = relisted
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    assert_eq!(relisted, names);
    for entry in &record.runs {
        let broken = entry.config.contains("broken-mnist");
        let expected = if broken {
            Status::Failed
        } else {
            Status::Completed
        };
        assert_eq!(entry.status, expected);
        if broken {
            assert!(entry.error.as_deref().unwrap().contains("broken-mnist"));
        } else {
            let run = entry.run_dir.as_ref().unwrap();
            let s = summary(run);
            assert!(s.test_acc.is_some());
            assert_eq!(s.test_acc, entry.test_acc);
            assert!(s.test_acc.unwrap() > 0.7, "{s:?}");
            let batch_norm = entry.varied["model.batch_norm"].as_bool().unwrap();
            assert_eq!(s.batch_norm, batch_norm);
            assert!(entry.name.contains(&format!("batch_norm_{batch_norm}")));
        }
    }

    // `runs` lists the two completed runs; --json carries the summary's fields.
    let output = run_binary(&["runs", &runs_arg, "--json", "--sort", "test"]);
    assert_success(&output);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0]["test_acc"].as_f64() >= listed[1]["test_acc"].as_f64());
    assert_eq!(listed[0]["status"], "completed");
    let table = stdout(&run_binary(&["runs", &runs_arg]));
    assert!(table.starts_with("run ") && table.contains("BN"), "{table}");
    // Any config key as a column, a filter or the sort order.
    let args = [
        "runs",
        &runs_arg,
        "--columns",
        "model.batch_norm",
        "--filter",
    ];
    let table = stdout(&run_binary(
        &[&args[..], &["model.batch_norm=true"]].concat(),
    ));
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(
        table.lines().next().unwrap().contains("model.batch_norm"),
        "{table}"
    );
    assert!(table.lines().nth(1).unwrap().contains("true"), "{table}");
    let sorted = stdout(&run_binary(&[
        "runs",
        &runs_arg,
        "--sort",
        "model.batch_norm",
    ]));
    assert_eq!(sorted.lines().count(), 3, "{sorted}");
}

#[test]
fn shards_cover_a_sweep_exactly_once() {
    let work = tempfile::tempdir().unwrap();
    let config = write(
        &work.path().join("grid.toml"),
        &format!("{QUICK_MLP}[sweep]\noptimizer.lr = [0.01, 0.05, 0.1]\n"),
    );
    let mut seen = Vec::new();
    for shard in ["0/2", "1/2"] {
        let output = run_binary(&[
            "sweep",
            &config,
            "--set",
            "model.batch_norm=false,true",
            "--shard",
            shard,
            "--list",
        ]);
        assert_success(&output);
        for line in stdout(&output).lines().skip(1) {
            let cells: Vec<&str> = line.split_whitespace().collect();
            if cells[1] == shard {
                seen.push(cells[0].parse::<usize>().unwrap());
            }
        }
    }
    seen.sort();
    assert_eq!(seen, (0..6).collect::<Vec<_>>());
}

/// Test image `i` as a 28x28 greyscale image.
fn digit(test: &mnist_lab::data::Split, i: usize) -> image::GrayImage {
    let pixels = MNIST_SIDE * MNIST_SIDE;
    image::GrayImage::from_raw(28, 28, test.images[i * pixels..(i + 1) * pixels].to_vec()).unwrap()
}

/// `mnist-lab predict RUN --json IMAGES...`, parsed.
fn predict_json(run: &str, images: &[String]) -> Vec<serde_json::Value> {
    let mut args = vec!["predict", run, "--json"];
    args.extend(images.iter().map(String::as_str));
    let output = run_binary(&args);
    assert_success(&output);
    serde_json::from_str(&stdout(&output)).unwrap()
}

/// One short run shared by the eval, predict and compare checks.
fn trained_run(work: &Path) -> PathBuf {
    let config = write(
        &work.join("quick.toml"),
        &format!("name = \"quick\"\n{QUICK_MLP}"),
    );
    common::trained_run(work, &config)
}

#[test]
fn eval_predict_and_compare_use_a_trained_run() {
    let work = tempfile::tempdir().unwrap();
    let run = trained_run(work.path());
    let run_arg = run.display().to_string();
    let expected = summary(&run).test_acc.unwrap();

    // eval reproduces the summary's test accuracy and writes its files.
    let output = run_binary(&["eval", &run_arg]);
    assert_success(&output);
    assert!(stdout(&output).contains(&format!("{:.2}%", 100.0 * expected)));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert!((eval["accuracy"].as_f64().unwrap() - expected).abs() < 1e-9);
    assert_eq!(eval["images"], 1000);
    let confusion = std::fs::read_to_string(run.join("confusion.csv")).unwrap();
    assert_eq!(confusion.lines().count(), 11);
    let total: usize = confusion
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|c| c.parse::<usize>().unwrap()))
        .sum();
    assert_eq!(total, 1000);
    for plot in ["confusion.png", "errors.png"] {
        image::open(run.join(rundir::PLOTS_DIR).join(plot)).unwrap();
    }

    // predict on PNGs of test images agrees with eval image by image.
    let mistakes: HashSet<u64> = eval["mistakes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .collect();
    let test = Mnist::read(&mnist_dir()).unwrap().test;
    let count = 100;
    let mut images = Vec::new();
    for i in 0..count {
        let path = work.path().join(format!("test-{i}.png"));
        digit(&test, i).save(&path).unwrap();
        images.push(path.display().to_string());
    }
    let predictions = predict_json(&run_arg, &images);
    assert_eq!(predictions.len(), count);
    for (i, p) in predictions.iter().enumerate() {
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let right = top[0]["class"].as_u64() == Some(test.labels[i] as u64);
        assert_eq!(right, !mistakes.contains(&(i as u64)), "image {i}");
    }
    // The same digits drawn dark on a light page, three times larger, in colour:
    // brought back to MNIST's format, most are still read right.
    let mut paper_images = Vec::new();
    for i in 0..count {
        let mut large = image::imageops::resize(
            &digit(&test, i),
            84,
            84,
            image::imageops::FilterType::Triangle,
        );
        image::imageops::invert(&mut large);
        let path = work.path().join(format!("paper-{i}.png"));
        image::DynamicImage::ImageLuma8(large)
            .to_rgb8()
            .save(&path)
            .unwrap();
        paper_images.push(path.display().to_string());
    }
    let right = predict_json(&run_arg, &paper_images)
        .iter()
        .enumerate()
        .filter(|(i, p)| p["top"][0]["class"].as_u64() == Some(test.labels[*i] as u64))
        .count();
    let right_as_mnist = count - mistakes.iter().filter(|&&i| i < count as u64).count();
    assert!(
        right * 10 >= right_as_mnist * 8,
        "{right} vs {right_as_mnist} of {count}"
    );

    let output = run_binary(&["predict", &run_arg, &images[0]]);
    assert_success(&output);
    assert!(
        stdout(&output).contains("test-0.png: "),
        "{}",
        stdout(&output)
    );

    // compare: a figure and a markdown table with a row per run.
    let out_dir = work.path().join("cmp");
    let output = run_binary(&[
        "compare",
        &run_arg,
        &run_arg,
        "--output",
        &out_dir.display().to_string(),
    ]);
    assert_success(&output);
    let markdown = std::fs::read_to_string(out_dir.join("compare.md")).unwrap();
    assert_eq!(markdown.matches("| custom_mlp |").count(), 2, "{markdown}");
    let figure = image::open(out_dir.join("compare.png")).unwrap();
    assert!(figure.width() >= 1600);
    // --group: runs equal but for the seed are one row, mean ± std over n.
    let grouped_dir = work.path().join("grouped");
    let grouped_arg = grouped_dir.display().to_string();
    let output = run_binary(&[
        "compare",
        &run_arg,
        &run_arg,
        "--group",
        "--output",
        &grouped_arg,
    ]);
    assert_success(&output);
    let markdown = std::fs::read_to_string(grouped_dir.join("compare.md")).unwrap();
    assert!(
        markdown.contains("| quick | custom_mlp |") && markdown.contains("| 2 |"),
        "{markdown}"
    );
    image::open(grouped_dir.join("compare.png")).unwrap();

    // Bad arguments: clear errors.
    let output = run_binary(&["eval", "no/such/run"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("no such run directory: no/such/run"), "{err}");
    let bare = work.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for file in [rundir::SUMMARY_FILE, rundir::CONFIG_FILE] {
        std::fs::copy(run.join(file), bare.join(file)).unwrap();
    }
    let output = run_binary(&["eval", &bare.display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("has no checkpoint model.safetensors"), "{err}");
    let junk = write(&work.path().join("junk.png"), "not an image");
    let output = run_binary(&["predict", &run_arg, &junk]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("cannot read image") && stderr(&output).contains("junk.png"));
}
