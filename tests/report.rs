//! End-to-end tests of `mnist-lab report`: the marked section of a markdown
//! file rewritten from short real runs on MNIST subsets, single runs and
//! configs over seeds, and a config without a validation split.

use std::path::Path;

mod common;
use common::{QUICK_MLP, assert_success, run_binary, stderr, stdout, write_file};

#[test]
fn report_rewrites_the_marked_section_from_runs() {
    let work = tempfile::tempdir().unwrap();
    let configs = work.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    write_file(&configs.join("custom_mlp.toml"), QUICK_MLP);
    write_file(
        &configs.join("custom_mlp_bn.toml"),
        &format!("{QUICK_MLP}\n").replace("[model]\n", "[model]\nbatch_norm = true\n"),
    );
    let runs = work.path().join("runs");
    let output = run_binary(&[
        "sweep",
        &configs.display().to_string(),
        "--runs-dir",
        &runs.display().to_string(),
    ]);
    assert_success(&output);
    std::fs::create_dir_all(work.path().join("docs")).unwrap();
    let readme = work.path().join("docs/results.md");
    write_file(
        &readme,
        "# Title\n\n<!-- report:begin -->\n<!-- report:end -->\n\n## After\n",
    );
    let (runs_arg, configs_arg) = (runs.display().to_string(), configs.display().to_string());
    let readme_arg = readme.display().to_string();
    let report = || {
        run_binary(&[
            "report",
            "--runs-dir",
            &runs_arg,
            "--configs",
            &configs_arg,
            "--output",
            &readme_arg,
        ])
    };
    let output = report();
    assert_success(&output);
    let text = std::fs::read_to_string(&readme).unwrap();
    assert!(text.starts_with("# Title\n") && text.ends_with("<!-- report:end -->\n\n## After\n"));
    assert!(text.contains("| `custom_mlp` | none | 61,450 |"), "{text}");
    assert!(text.contains("| `custom_mlp_bn` | BN | 62,026 |"), "{text}");
    assert!(
        text.contains("95.32%"),
        "the assignment's figure sits beside ours"
    );
    for image in [
        "validation.png",
        "custom_mlp.png",
        "custom_mlp_bn.png",
        "confusion.png",
        "errors.png",
    ] {
        assert!(text.contains(&format!("](results/{image})")), "{image}");
        image::open(work.path().join("docs/results").join(image)).unwrap();
    }

    // A later run of the same name with other settings is not the config's run.
    let output = run_binary(&[
        "run",
        &configs.join("custom_mlp.toml").display().to_string(),
        "--set",
        "train.epochs=1",
        "--runs-dir",
        &runs.display().to_string(),
    ]);
    assert_success(&output);
    let output = report();
    assert_success(&output);
    let again = std::fs::read_to_string(&readme).unwrap();
    assert!(
        again.contains("| `custom_mlp` | none | 61,450 | 2 |"),
        "{again}"
    );

    // Without runs for a config, the report says which and changes nothing.
    write_file(&configs.join("lenet5.toml"), "[train]\nepochs = 1\n");
    let before = std::fs::read_to_string(&readme).unwrap();
    let output = report();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("lenet5.toml"),
        "{}",
        stderr(&output)
    );
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), before);
}

/// Runs `report` for `configs` over `runs` into `work/docs/results.md` (its
/// images into `work/docs/results`) and returns that file's text.
fn report_into_docs(work: &Path, configs: &Path, runs: &Path) -> String {
    std::fs::create_dir_all(work.join("docs")).unwrap();
    let readme = work.join("docs/results.md");
    std::fs::write(&readme, "# r\n<!-- report:begin -->\n<!-- report:end -->\n").unwrap();
    assert_success(&run_binary(&[
        "report",
        "--configs",
        configs.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--output",
        readme.to_str().unwrap(),
    ]));
    std::fs::read_to_string(&readme).unwrap()
}

/// `report` over a config trained once and a config trained with two seeds (in
/// a nested folder, as `just seeds` leaves them), and that config again with one
/// setting changed: one row in the results table, one row over seeds with both
/// accuracies and their mean, an ablation row for the change, and the images.
#[test]
fn report_shows_single_runs_and_seed_groups() {
    let work = tempfile::tempdir().unwrap();
    let configs = work.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    let quick = "[model]\nkind = \"custom_mlp\"\n[data]\ntrain_size = 1000\nvalidation_size = 500\n[train]\nepochs = 1\n";
    std::fs::write(configs.join("mlp.toml"), format!("name = \"mlp\"\n{quick}")).unwrap();
    std::fs::write(
        configs.join("mlp_best.toml"),
        format!("name = \"mlp_best\"\n{quick}[optimizer]\nlr = 0.05\n"),
    )
    .unwrap();
    let runs = work.path().join("runs");
    let config = |name: &str| configs.join(name).to_str().unwrap().to_string();
    assert_success(&run_binary(&[
        "run",
        &config("mlp.toml"),
        "--runs-dir",
        runs.to_str().unwrap(),
    ]));
    let seeds = runs.join("seeds");
    assert_success(&run_binary(&[
        "sweep",
        &config("mlp_best.toml"),
        "--set",
        "seed=0,1",
        "--runs-dir",
        seeds.to_str().unwrap(),
    ]));
    // The same over the same seeds with one setting changed: an ablation row.
    assert_success(&run_binary(&[
        "sweep",
        &config("mlp_best.toml"),
        "--set",
        "seed=0,1",
        "--set",
        "optimizer.momentum=0.5",
        "--runs-dir",
        seeds.to_str().unwrap(),
    ]));
    let text = report_into_docs(work.path(), &configs, &runs);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("| `{name}`")))
            .unwrap_or_else(|| panic!("no row for {name} in\n{text}"))
            .to_string()
    };
    assert!(row("mlp").contains("| 1 |"), "{}", row("mlp"));
    let group = row("mlp_best");
    assert!(
        group.contains("| 0, 1 |") && group.contains(" ± "),
        "{group}"
    );
    assert!(text.contains("### Over seeds"), "{text}");
    let ablation = text
        .lines()
        .find(|l| l.contains("optimizer.momentum = 0.5"))
        .unwrap_or_else(|| panic!("no ablation row in\n{text}"));
    assert!(
        ablation.contains("| 2 |") && ablation.contains(" points"),
        "{ablation}"
    );
    // `runs --group` tells the two experiments of the same name apart.
    let output = run_binary(&["runs", seeds.to_str().unwrap(), "--group"]);
    assert_success(&output);
    let table = stdout(&output);
    assert!(
        table.contains("mlp_best (optimizer.momentum = 0.5)"),
        "{table}"
    );
    for image in [
        "validation.png",
        "mlp.png",
        "over-seeds.png",
        "confusion.png",
    ] {
        assert!(
            work.path().join("docs/results").join(image).is_file(),
            "{image}"
        );
    }
}

/// `report` over a config trained on every image (`data.validation_size = 0`):
/// its ablation shows no gap of its own, then its held-out twin, then a change
/// measured against that twin; the curves over seeds are the twin's.
#[test]
fn report_measures_a_config_without_validation_against_its_held_out_twin() {
    let work = tempfile::tempdir().unwrap();
    let configs = work.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("mlp_full.toml"),
        "name = \"mlp_full\"\n[model]\nkind = \"custom_mlp\"\n\
         [data]\ntrain_size = 1000\nvalidation_size = 0\n[train]\nepochs = 1\n",
    )
    .unwrap();
    let runs = work.path().join("runs");
    let config = configs.join("mlp_full.toml");
    let sweep = |extra: &[&str]| {
        let mut args = vec![
            "sweep",
            config.to_str().unwrap(),
            "--set",
            "seed=0,1",
            "--runs-dir",
            runs.to_str().unwrap(),
        ];
        args.extend(extra);
        assert_success(&run_binary(&args));
    };
    sweep(&[]);
    sweep(&["--set", "data.validation_size=500"]);
    sweep(&[
        "--set",
        "data.validation_size=500",
        "--set",
        "optimizer.momentum=0.5",
    ]);
    let text = report_into_docs(work.path(), &configs, &runs);
    let ablation: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("| config | change |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let group = text
        .lines()
        .find(|l| l.starts_with("| `mlp_full`"))
        .unwrap_or_else(|| panic!("no row over seeds in\n{text}"));
    assert!(group.contains("| none | 0, 1 |"), "{group}");
    assert_eq!(ablation.len(), 3, "{text}");
    assert!(
        ablation[0].contains("as it is") && ablation[0].ends_with("| - |"),
        "{}",
        ablation[0]
    );
    assert!(
        ablation[1].contains("data.validation_size = 500") && ablation[1].ends_with(" points |"),
        "{}",
        ablation[1]
    );
    assert!(
        ablation[2].contains("optimizer.momentum = 0.5"),
        "{}",
        ablation[2]
    );
    assert!(work.path().join("docs/results/over-seeds.png").is_file());
}
