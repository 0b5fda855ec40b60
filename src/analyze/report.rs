//! `mnist-lab report`: the results section of `docs/results.md` (or another
//! markdown file), regenerated from the runs on disk: the latest completed run of each config, its curves, the confusion
//! matrix of the best model, a discussion written from the measured figures,
//! the configs run with several seeds as mean and spread, and the searches.

use std::path::{Path, PathBuf};

use crate::analyze::compare::{self, Curves};
use crate::analyze::evaluate::{self, TrainedModel};
use crate::analyze::inspect::{self, RunInfo};
use crate::analyze::markers::replace_section;
use crate::analyze::{AnalyzeError, Result};
use crate::analyze::{search_report, seed_report};
use crate::config::{self, Config};
use crate::run::metrics::mean_epoch_secs;
use crate::run::rundir::{self, Status, Summary};
use crate::util::fsio::{FileError, write_atomic};
use crate::util::plots;
use crate::util::table::{Table, percent, thousands};

/// The assignment report's 20-epoch test accuracies (it validated on the test set
/// and took the last epoch), by the config that reproduces each model.
pub(super) const ASSIGNMENT: [(&str, &str); 3] = [
    ("lenet5", "98.76%"),
    ("custom_mlp", "95.32%"),
    ("lenet5_reg", "99.14% (BatchNorm + L2)"),
];

/// Rows come in this order; other configs follow by name.
const ORDER: [&str; 4] = ["lenet5", "custom_mlp", "lenet5_reg", "custom_mlp_reg"];

pub struct ReportOptions {
    pub runs_dir: PathBuf,
    pub configs_dir: PathBuf,
    /// The markdown file whose marked part is rewritten.
    pub output: PathBuf,
    /// Where the images go, relative to that file's folder.
    pub assets: PathBuf,
}

/// Regenerates the images and the output file's section between the markers;
/// returns the section's markdown.
pub fn generate(options: &ReportOptions) -> Result<String> {
    let text =
        std::fs::read_to_string(&options.output).map_err(FileError::on("read", &options.output))?;
    let chosen = choose_runs(&options.configs_dir, &options.runs_dir)?;
    let curves = compare::load(chosen.single)?;
    let root = options.output.parent().unwrap_or(Path::new("."));
    let assets_dir = root.join(&options.assets);
    std::fs::create_dir_all(&assets_dir).map_err(FileError::on("create", &assets_dir))?;
    let asset = |file: &str| (assets_dir.join(file), link(&options.assets, file));

    let mut markdown = String::new();
    if curves.is_empty() {
        markdown += &seed_report::section(&chosen.over_seeds, &chosen.all, &asset)?;
        markdown += &search_report::section(&options.runs_dir, &asset)?;
        return finish(options, &text, markdown);
    }
    markdown += &intro(&curves, &options.runs_dir);
    markdown += &results_table(&curves).to_markdown();
    markdown += "\n";

    let (path, href) = asset("validation.png");
    plots::write_png(&path, &compare::validation_charts(&curves))?;
    markdown += &format!("Validation curves of every config:\n\n![validation curves]({href})\n\n");
    markdown += "Training against validation, per config (loss left, accuracy right):\n\n";
    for c in &curves {
        let file = format!("{}.png", c.run.summary.name);
        let (path, href) = asset(&file);
        let (loss, accuracy) = crate::run::plots::run_charts(&c.run.summary.name, &c.metrics);
        plots::write_png(&path, &[loss, accuracy])?;
        markdown += &format!("![{} curves]({href})\n", c.run.summary.name);
    }
    markdown += "\n";
    markdown += &best_model_section(&curves, &asset)?;
    markdown += &discussion(&curves);
    markdown += &seed_report::section(&chosen.over_seeds, &chosen.all, &asset)?;
    markdown += &search_report::section(&options.runs_dir, &asset)?;
    finish(options, &text, markdown)
}

/// Writes `markdown` between the output file's markers; returns it.
fn finish(options: &ReportOptions, text: &str, markdown: String) -> Result<String> {
    let updated = replace_section(text, &markdown).map_err(|reason| AnalyzeError::Readme {
        path: options.output.clone(),
        reason,
    })?;
    write_atomic(&options.output, updated.as_bytes())?;
    Ok(markdown)
}

/// `assets/file` with forward slashes, as a markdown link wants.
fn link(assets: &Path, file: &str) -> String {
    let base = assets.to_string_lossy().replace('\\', "/");
    format!("{}/{file}", base.trim_end_matches('/'))
}

/// The runs a report shows: the latest of each config trained once, in report
/// order, and for each config trained with two seeds or more, the latest run of
/// each seed.
struct Chosen {
    single: Vec<RunInfo>,
    over_seeds: Vec<(String, Vec<RunInfo>)>,
    /// Every completed run found, for the ablation rows.
    all: Vec<RunInfo>,
}

fn choose_runs(configs_dir: &Path, runs_dir: &Path) -> Result<Chosen> {
    let files = config::config_files(configs_dir)?;
    let runs: Vec<RunInfo> = inspect::scan_nested(runs_dir)?
        .into_iter()
        .filter(|r| r.summary.status == Status::Completed)
        .collect();
    let (mut single, mut over_seeds, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for file in &files {
        let config = Config::load(file, &[])?;
        if !config.sweep.is_empty() {
            continue;
        }
        // A run reports a config only if it trained exactly that config, but for
        // the seed (a quick `--set train.epochs=1` run of the same name does not count).
        let mut matching: Vec<&RunInfo> = runs
            .iter()
            .filter(|r| {
                r.config
                    .as_ref()
                    .is_some_and(|c| same_experiment_but_seed(c, &config))
            })
            .collect();
        matching.sort_by(|a, b| b.summary.started_at.cmp(&a.summary.started_at));
        let mut latest_per_seed: Vec<&RunInfo> = Vec::new();
        for run in matching {
            if !latest_per_seed
                .iter()
                .any(|r| r.summary.seed == run.summary.seed)
            {
                latest_per_seed.push(run);
            }
        }
        latest_per_seed.sort_by_key(|r| r.summary.seed);
        if latest_per_seed.len() >= 2 {
            let runs = latest_per_seed.into_iter().cloned().collect();
            over_seeds.push((config.name.clone(), runs));
        } else if let Some(run) = latest_per_seed
            .first()
            .filter(|r| r.summary.seed == config.seed)
        {
            single.push((*run).clone());
        } else {
            missing.push(file.display().to_string());
        }
    }
    if !missing.is_empty() {
        return Err(AnalyzeError::NotRun {
            configs: missing.join(", "),
            runs_dir: runs_dir.to_path_buf(),
        });
    }
    if single.is_empty() && over_seeds.is_empty() {
        return Err(AnalyzeError::NothingToReport(configs_dir.to_path_buf()));
    }
    // `lenet5_best` ranks as `lenet5`.
    let rank = |name: &str| {
        let model = name.trim_end_matches("_best");
        (ORDER.iter().position(|&o| o == model)).unwrap_or(ORDER.len())
    };
    single.sort_by(|a, b| {
        (rank(&a.summary.name), &a.summary.name).cmp(&(rank(&b.summary.name), &b.summary.name))
    });
    over_seeds.sort_by(|a, b| (rank(&a.0), &a.0).cmp(&(rank(&b.0), &b.0)));
    Ok(Chosen {
        single,
        over_seeds,
        all: runs,
    })
}

/// [`same_experiment`] but for the seed (and the name a seed sweep gives its runs).
fn same_experiment_but_seed(a: &Config, b: &Config) -> bool {
    let without_seed = |c: &Config| {
        let mut c = c.clone();
        c.seed = 0;
        c.name.clear();
        c
    };
    same_experiment(&without_seed(a), &without_seed(b))
}

/// Whether two configs describe the same experiment: equal in everything but
/// where the data was read from, the device and threads it ran on, and the
/// batch size it evaluated in.
fn same_experiment(a: &Config, b: &Config) -> bool {
    let normalise = |c: &Config| {
        let mut c = c.clone();
        c.data.dir = None;
        c.device = Default::default();
        c.train.eval_batch_size = 0;
        c.optimizer.lr = Some(c.optimizer.lr());
        c
    };
    normalise(a) == normalise(b)
}

fn intro(curves: &[Curves], runs_dir: &Path) -> String {
    let first = &curves[0].run.summary;
    let host = first
        .host
        .clone()
        .unwrap_or_else(|| "an unrecorded machine".into());
    let threads = first
        .threads
        .map_or(String::new(), |t| format!(", {t} threads"));
    format!(
        "The latest completed run of each config in `configs/`, read from `{}` by \
         `just report`, trained on {host} ({}{threads}). Test accuracy is that of the \
         checkpoint of the best validation epoch, measured once at the end; the \
         assignment report validated on the test set and took the last epoch. \
         Seconds per epoch cover training and validation; wall time runs from data \
         loading to the test evaluation.\n\n",
        runs_dir.display(),
        first.device,
    )
}

fn results_table(curves: &[Curves]) -> Table {
    let mut table = Table::new(&[
        "config",
        "regularisation",
        "parameters",
        "epochs",
        "test accuracy",
        "best epoch",
        "seconds per epoch",
        "wall (s)",
        "peak memory (MB)",
        "assignment report",
    ]);
    for c in curves {
        let s = &c.run.summary;
        let assignment = ASSIGNMENT
            .iter()
            .find(|(name, _)| *name == s.name)
            .map_or("-", |(_, acc)| acc);
        table.push(vec![
            format!("`{}`", s.name),
            c.run.regularisation(),
            thousands(s.params),
            s.epochs_completed.to_string(),
            format!("**{}**", percent(s.test_acc)),
            s.best_epoch.map_or("-".into(), |e| e.to_string()),
            mean_epoch_secs(&c.metrics).map_or("-".into(), |t| format!("{t:.2}")),
            format!("{:.0}", s.wall_secs),
            s.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}")),
            assignment.to_string(),
        ]);
    }
    table
}

/// Evaluates the run with the best test accuracy again and shows its confusion
/// matrix and most confident mistakes.
fn best_model_section(
    curves: &[Curves],
    asset: &dyn Fn(&str) -> (PathBuf, String),
) -> Result<String> {
    let best = curves
        .iter()
        .max_by(|a, b| {
            let acc = |c: &Curves| c.run.summary.test_acc.unwrap_or(0.0);
            acc(a).total_cmp(&acc(b))
        })
        .expect("at least one run");
    let name = &best.run.summary.name;
    let model = TrainedModel::load(&best.run.dir, rundir::BEST_CHECKPOINT, &[])?;
    let (evaluation, test) = evaluate::evaluate(&model)?;
    let (confusion_path, confusion_href) = asset("confusion.png");
    evaluate::write_confusion_plot(&evaluation, name, &confusion_path)?;
    let (errors_path, errors_href) = asset("errors.png");
    evaluate::write_errors_plot(&evaluation, &test, name, &errors_path)?;
    let weakest = evaluation
        .per_class_accuracy
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(class, acc)| format!("{class} ({:.2}%)", 100.0 * acc))
        .unwrap_or_default();
    let top_confusion = (0..10)
        .flat_map(|t| (0..10).map(move |p| (t, p)))
        .filter(|(t, p)| t != p)
        .max_by_key(|&(t, p)| evaluation.confusion[t][p])
        .map(|(t, p)| format!("{t} read as {p} ({} times)", evaluation.confusion[t][p]))
        .unwrap_or_default();
    Ok(format!(
        "The best model, `{name}`, on the {} test images (`mnist-lab eval` on its run): \
         {} mistakes, {:.2}% accurate; its weakest class is {weakest}, and its most \
         frequent confusion is {top_confusion}.\n\n\
         ![confusion matrix]({confusion_href})\n\n\
         ![most confident mistakes]({errors_href})\n\n",
        thousands(evaluation.images),
        evaluation.mistakes.len(),
        100.0 * evaluation.accuracy,
    ))
}

/// Overfitting and what each regularisation changed, per model, from the curves:
/// the last epoch's train-validation gap, where the validation loss bottomed out,
/// and the test accuracy against the same model without regularisation.
fn discussion(curves: &[Curves]) -> String {
    let mut text = String::from("What the figures say:\n\n");
    let mut models: Vec<&str> = Vec::new();
    for c in curves {
        if !models.contains(&c.run.summary.model.as_str()) {
            models.push(&c.run.summary.model);
        }
    }
    for model in models {
        let of_model: Vec<&Curves> = curves
            .iter()
            .filter(|c| c.run.summary.model == model)
            .collect();
        let Some(plain) = of_model.iter().find(|c| c.run.regularisation() == "none") else {
            continue;
        };
        text += &format!("- {}\n", describe_fit(plain, None));
        for c in of_model.iter().filter(|c| c.run.regularisation() != "none") {
            if c.metrics.len() == plain.metrics.len() {
                text += &format!("- {}\n", describe_fit(c, Some(plain)));
            }
        }
    }
    let beaten: Vec<String> = curves
        .iter()
        .filter_map(|c| {
            let (_, theirs) = ASSIGNMENT.iter().find(|(n, _)| *n == c.run.summary.name)?;
            let theirs: f64 = theirs.split('%').next()?.parse().ok()?;
            let ours = 100.0 * c.run.summary.test_acc?;
            Some(format!(
                "`{}` {:.2}% against {theirs:.2}% ({:+.2} points)",
                c.run.summary.name,
                ours,
                ours - theirs
            ))
        })
        .collect();
    if !beaten.is_empty() {
        text += &format!(
            "- Against the assignment report, with the same parameter counts: {}.\n",
            beaten.join("; ")
        );
    }
    text + "\n"
}

fn describe_fit(c: &Curves, baseline: Option<&Curves>) -> String {
    let s = &c.run.summary;
    let regularisation = match c.run.regularisation().as_str() {
        "none" => "no regularisation".to_string(),
        other => other.to_string(),
    };
    let last = c.metrics.last().expect("a completed run has epochs");
    let Some((last_val_loss, last_val_acc)) = last.val_loss.zip(last.val_acc) else {
        return format!(
            "`{}` ({regularisation}): trained on every training image, with none held \
             out to measure its fit.",
            s.name
        ) + &against_baseline(s, baseline);
    };
    let gap = 100.0 * (last.train_acc - last_val_acc);
    let (min_epoch, min_loss) = (c.metrics.iter())
        .filter_map(|m| Some((m.epoch, m.val_loss?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("epochs");
    let loss_trend = if min_epoch + 1 >= last.epoch {
        "its validation loss is still at its lowest at the end".to_string()
    } else {
        format!(
            "its validation loss is lowest at epoch {min_epoch} of {} and {:.0}% higher at the end",
            last.epoch,
            100.0 * (last_val_loss / min_loss - 1.0)
        )
    };
    let verdict = if gap > 0.5 || (min_epoch + 3 <= last.epoch && last_val_loss > 1.1 * min_loss) {
        "it overfits"
    } else {
        "no sign of overfitting"
    };
    let fit = if gap >= 0.0 {
        format!(
            "the last epoch fits the training set at {:.2}% against {:.2}% on validation, \
             a gap of {gap:.2} points",
            100.0 * last.train_acc,
            100.0 * last_val_acc
        )
    } else {
        format!(
            "the last epoch scores {:.2}% on the training set, below the {:.2}% on \
             validation (training sees its images augmented or regularised)",
            100.0 * last.train_acc,
            100.0 * last_val_acc
        )
    };
    let sentence = format!(
        "`{}` ({regularisation}): {fit}; {loss_trend}: {verdict}.",
        s.name
    );
    sentence + &against_baseline(s, baseline)
}

/// ` Test accuracy 99.10% against 98.90% without regularisation (+0.20 points).`,
/// or nothing without a baseline.
fn against_baseline(s: &Summary, baseline: Option<&Curves>) -> String {
    let (Some(base), Some(acc)) = (baseline, s.test_acc) else {
        return String::new();
    };
    let base_acc = base.run.summary.test_acc.unwrap_or(0.0);
    format!(
        " Test accuracy {:.2}% against {:.2}% without regularisation ({:+.2} points).",
        100.0 * acc,
        100.0 * base_acc,
        100.0 * (acc - base_acc)
    )
}
