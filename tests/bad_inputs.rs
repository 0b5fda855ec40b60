//! Every bad input gets a clear answer: the message names what is wrong, the
//! exit status says whose fault it is (2: the command line or config, 1: at run
//! time), and nothing is left half-made.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mnist_lab::run::rundir;

mod common;
use common::{assert_success, config_path, mnist_dir, run_binary};

const QUICK: &str = "name = \"quick\"\n[model]\nkind = \"custom_mlp\"\n\
    [data]\ntrain_size = 2000\nvalidation_size = 1000\ntest_size = 1000\n[train]\nepochs = 1\n";

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn quick_config(dir: &Path) -> String {
    let path = dir.join("quick.toml");
    std::fs::write(&path, QUICK).unwrap();
    path.display().to_string()
}

fn trained_run(work: &Path) -> PathBuf {
    common::trained_run(work, &quick_config(work))
}

#[test]
fn an_explicit_data_dir_is_the_only_one_looked_at() {
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let runs = work.path().join("runs");
    let output = Command::new(env!("CARGO_BIN_EXE_mnist-lab"))
        .args([
            "run",
            &quick_config(work.path()),
            "--runs-dir",
            runs.to_str().unwrap(),
        ])
        .args(["--set", &format!("data.dir={}", empty.display())])
        .env("MNIST_DIR", mnist_dir()) // holds MNIST, but the config names another folder
        .env("MNIST_MIRRORS", "http://127.0.0.1:9/") // and the download fails at once
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("MNIST not found in {}", empty.display())),
        "{err}"
    );
    assert!(!runs.exists(), "no run directory");
}

#[test]
fn a_run_records_its_data_folder_and_eval_reads_only_the_test_files_there() {
    let work = tempfile::tempdir().unwrap();
    let run = trained_run(work.path());
    let summary = rundir::read_summary(&run.join(rundir::SUMMARY_FILE)).unwrap();
    let used = summary.data_dir.expect("the summary names its data folder");
    assert!(
        used.is_absolute()
            && (used.join("t10k-images-idx3-ubyte.gz").is_file()
                || used.join("t10k-images-idx3-ubyte").is_file())
    );

    // A folder with only the test files is enough for eval.
    let test_only = work.path().join("test-only");
    std::fs::create_dir_all(&test_only).unwrap();
    for stem in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        for name in [format!("{stem}.gz"), stem.to_string()] {
            if mnist_dir().join(&name).is_file() {
                std::fs::copy(mnist_dir().join(&name), test_only.join(&name)).unwrap();
            }
        }
    }
    let set = format!("data.dir={}", test_only.display());
    let output = run_binary(&["eval", run.to_str().unwrap(), "--set", &set]);
    assert_success(&output);
    // Another folder's files are not the run's test set: nothing written.
    assert!(!run.join("eval.json").exists(), "{}", stderr(&output));
    assert_success(&run_binary(&["eval", run.to_str().unwrap()]));

    // Evaluating a smaller test set prints its figures but keeps the run's files.
    let before = std::fs::read(run.join("eval.json")).unwrap();
    let output = run_binary(&["eval", run.to_str().unwrap(), "--set", "data.test_size=7"]);
    assert_success(&output);
    assert!(
        stdout(&output).contains("of 7 wrong"),
        "{}",
        stdout(&output)
    );
    assert_eq!(std::fs::read(run.join("eval.json")).unwrap(), before);
}

#[test]
fn predict_answers_for_every_image_and_calls_blank_ones_blank() {
    let work = tempfile::tempdir().unwrap();
    let run = trained_run(work.path());
    let blank_small = work.path().join("blank28.png");
    let blank_large = work.path().join("blank100.png");
    image::GrayImage::new(28, 28).save(&blank_small).unwrap();
    image::GrayImage::from_pixel(100, 100, image::Luma([255]))
        .save(&blank_large)
        .unwrap();
    let junk = work.path().join("junk.png");
    std::fs::write(&junk, "not an image").unwrap();
    let digit = work.path().join("digit.png");
    let test = mnist_lab::data::idx::read_test(&mnist_dir()).unwrap();
    image::GrayImage::from_raw(28, 28, test.images[..784].to_vec())
        .unwrap()
        .save(&digit)
        .unwrap();

    let paths = [&blank_small, &junk, &digit, &blank_large].map(|p| p.display().to_string());
    let mut args = vec!["predict", run.to_str().unwrap()];
    args.extend(paths.iter().map(String::as_str));
    let output = run_binary(&args);
    assert_eq!(output.status.code(), Some(1), "three of four failed");
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(
        out.contains("digit.png: "),
        "the good image is still classified: {out}"
    );
    for blank in ["blank28.png", "blank100.png"] {
        assert!(
            err.contains(&format!(
                "no digit found in {}",
                work.path().join(blank).display()
            )),
            "{err}"
        );
    }
    assert!(
        err.contains("cannot read image") && err.contains("junk.png"),
        "{err}"
    );
    assert!(
        err.contains("3 of 4 images could not be classified"),
        "{err}"
    );
}

#[test]
fn report_with_nothing_to_report_says_so() {
    let work = tempfile::tempdir().unwrap();
    let configs = work.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("grid.toml"),
        "[sweep]\n\"optimizer.lr\" = [0.1, 0.2]\n",
    )
    .unwrap();
    let readme = work.path().join("README.md");
    std::fs::write(&readme, "<!-- report:begin -->\n<!-- report:end -->\n").unwrap();
    let output = run_binary(&[
        "report",
        "--configs",
        configs.to_str().unwrap(),
        "--runs-dir",
        work.path().to_str().unwrap(),
        "--readme",
        readme.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("nothing to report"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn numbers_out_of_range_are_usage_errors() {
    let lenet = config_path("lenet5.toml");
    for args in [
        vec!["run", &lenet, "--threads", "100000"],
        vec!["run", &lenet, "--set", "device.threads=100000"],
        vec!["bench", "--steps", "0"],
        vec!["bench", "--model", "resnet"],
    ] {
        let output = run_binary(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let err = stderr(&run_binary(&["run", &lenet, "--threads", "100000"]));
    assert!(
        err.contains("100000 threads") && err.contains("up to"),
        "{err}"
    );
}

#[test]
fn file_errors_name_the_path_once_and_plainly() {
    let work = tempfile::tempdir().unwrap();
    let err = stderr(&run_binary(&["run", "no/such.toml"]));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let plain_file = work.path().join("runs");
    std::fs::write(&plain_file, "").unwrap();
    let output = run_binary(&[
        "run",
        &quick_config(work.path()),
        "--runs-dir",
        plain_file.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("it is a file, not a directory"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_train_size_beyond_the_data_is_a_warning() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("big.toml");
    std::fs::write(
        &config,
        "[model]\nkind = \"custom_mlp\"\n[data]\nvalidation_size = 1000\ntrain_size = 100000\ntest_size = 100\n[train]\nepochs = 1\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mnist-lab"))
        .args([
            "run",
            config.to_str().unwrap(),
            "--runs-dir",
            work.path().join("runs").to_str().unwrap(),
        ])
        .env("MNIST_DIR", mnist_dir())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_success(&output);
    assert!(
        stderr(&output).contains("data.train_size is more than"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let work = tempfile::tempdir().unwrap();
    trained_run(work.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mnist-lab"))
        .args(["runs", work.path().join("runs").to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // as `| head -0` does
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs `mount` (root only); false when this machine will not.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_full_disk_fails_clearly_and_leaves_no_run() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("small-disk");
    std::fs::create_dir_all(&disk).unwrap();
    if !mount_tmpfs(&disk, "160k") {
        let note =
            "skipped a_full_disk_fails_clearly_and_leaves_no_run: it mounts a tmpfs (root)\n";
        let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
        return;
    }
    let runs = disk.join("runs");
    // The first checkpoint (245 KB of weights) cannot fit in 160 KB.
    let output = run_binary(&[
        "run",
        &quick_config(work.path()),
        "--runs-dir",
        runs.to_str().unwrap(),
    ]);
    let left = std::fs::read_dir(&runs).map_or(0, |d| d.count());
    let _ = Command::new("umount").arg(&disk).status();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("No space left on device") && err.contains("cannot write"),
        "{err}"
    );
    assert_eq!(left, 0, "a run that completed no epoch leaves nothing");
}
