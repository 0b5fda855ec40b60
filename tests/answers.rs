//! Commands that read runs answer plainly: weights that are not finite are
//! refused, an evaluation of another folder's files leaves the run's alone,
//! every number and name a user types is bounded, and `runs` names the keys it
//! knows.

use std::path::Path;

use mnist_lab::run::rundir;

mod common;
use common::{
    SMALL_LENET5, assert_success, run_binary, stderr, subset_copy, trained_run, write_in,
};

/// Replaces every value of one tensor of a safetensors file with NaN.
fn poison(checkpoint: &Path) {
    let mut tensors =
        candle_core::safetensors::load(checkpoint, &candle_core::Device::Cpu).unwrap();
    let name = tensors.keys().min().unwrap().clone();
    let nan = (tensors[&name].ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(name, nan);
    candle_core::safetensors::save(&tensors, checkpoint).unwrap();
}

#[test]
fn eval_and_predict_refuse_weights_that_are_not_finite() {
    let work = tempfile::tempdir().unwrap();
    let run = trained_run(
        work.path(),
        &write_in(work.path(), "small.toml", SMALL_LENET5),
    );
    poison(&run.join(rundir::BEST_CHECKPOINT));
    let eval = run_binary(&["eval", run.to_str().unwrap()]);
    assert_eq!(eval.status.code(), Some(1), "{}", stderr(&eval));
    assert!(stderr(&eval).contains("not finite"), "{}", stderr(&eval));
    assert!(!run.join("eval.json").exists());
    let image = work.path().join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (10..18).contains(&x) && y > 4 {
            255
        } else {
            0
        }])
    })
    .save(&image)
    .unwrap();
    let predict = run_binary(&["predict", run.to_str().unwrap(), image.to_str().unwrap()]);
    assert_eq!(predict.status.code(), Some(1), "{}", stderr(&predict));
    assert!(
        stderr(&predict).contains("not finite"),
        "{}",
        stderr(&predict)
    );
    // The last epoch's weights are sound, and still serve.
    let last = run_binary(&["eval", run.to_str().unwrap(), "--checkpoint", "last"]);
    assert_success(&last);
}

#[test]
fn eval_of_another_folders_test_files_leaves_the_runs_files_alone() {
    let work = tempfile::tempdir().unwrap();
    let run = trained_run(
        work.path(),
        &write_in(work.path(), "small.toml", SMALL_LENET5),
    );
    assert_success(&run_binary(&["eval", run.to_str().unwrap()]));
    let own = std::fs::read(run.join("eval.json")).unwrap();
    let other = subset_copy(&work.path().join("other"), false);
    let output = run_binary(&[
        "eval",
        run.to_str().unwrap(),
        "--set",
        &format!("data.dir={}", other.display()),
    ]);
    assert_success(&output);
    assert!(
        stderr(&output).contains("not writing eval files"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        std::fs::read(run.join("eval.json")).unwrap(),
        own,
        "eval.json kept"
    );
}

#[test]
fn numbers_and_names_a_user_types_are_bounded() {
    let work = tempfile::tempdir().unwrap();
    let output = run_binary(&["bench", "--batch-size", "100000"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("8192"), "{}", stderr(&output));

    let runs = work.path().join("inner").join("runs");
    let config = write_in(work.path(), "small.toml", SMALL_LENET5);
    let output = run_binary(&[
        "sweep",
        &config,
        "--runs-dir",
        runs.to_str().unwrap(),
        "--name",
        "x/../../../esc",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--name"), "{}", stderr(&output));
    let left: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("small.toml")],
        "nothing written"
    );

    // A huge image is refused from its header, before it is decoded.
    let run = trained_run(work.path(), &config);
    let huge = work.path().join("huge.png");
    image::GrayImage::new(5000, 300).save(&huge).unwrap();
    let output = run_binary(&["predict", run.to_str().unwrap(), huge.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("5000 x 300 pixels") && stderr(&output).contains("4096"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn runs_refuses_unknown_keys_and_says_when_a_filter_matches_nothing() {
    let work = tempfile::tempdir().unwrap();
    trained_run(
        work.path(),
        &write_in(work.path(), "small.toml", SMALL_LENET5),
    );
    let runs = work.path().join("runs");
    let runs = runs.to_str().unwrap();
    for args in [
        vec!["runs", runs, "--sort", "optimizer.lrr"],
        vec!["runs", runs, "--columns", "optimizer.lr,train.epoch"],
        vec!["runs", runs, "--filter", "model.knd=lenet5"],
    ] {
        let output = run_binary(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("expected one of"),
            "{}",
            stderr(&output)
        );
    }
    let output = run_binary(&["runs", runs, "--filter", "model.kind=custom_mlp"]);
    assert_success(&output);
    assert!(
        stderr(&output).contains("none of the 1 runs") && stderr(&output).contains("model.kind"),
        "{}",
        stderr(&output)
    );
}
