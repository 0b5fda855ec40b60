//! `runs`, `compare`, `eval`, `predict`, `report`: using finished runs.

use std::path::PathBuf;

use clap::Args;

use crate::analyze::evaluate::{self, TrainedModel};
use crate::analyze::inspect::{self, Filter, Sort};
use crate::analyze::report::{self, ReportOptions};
use crate::analyze::{compare, predict, seeds};
use crate::cli::UsageError;
use crate::config::Override;
use crate::run::{rundir, search};
use crate::util::table::{Table, percent};

#[derive(Args)]
pub(super) struct RunsArgs {
    /// Folder of run directories.
    #[arg(default_value = "runs")]
    dir: PathBuf,
    /// Sort by a column (started, name, model, params, epochs, val, test, wall,
    /// status: accuracies best first, the rest ascending) or a config key
    /// (`optimizer.lr`).
    #[arg(long, default_value = "started")]
    sort: Sort,
    /// Show these config keys as columns: `--columns optimizer.lr,train.batch_size`.
    #[arg(long, value_delimiter = ',', value_name = "KEY,...")]
    columns: Vec<String>,
    /// Keep only the runs with this config value: `--filter model.kind=lenet5`
    /// (repeatable; `status` and `model` too).
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    filters: Vec<Filter>,
    /// One row per group of completed runs that differ only by seed: mean ±
    /// standard deviation of the accuracies, and n.
    #[arg(long)]
    group: bool,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

impl RunsArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        self.check_keys()?;
        let (mut runs, warnings) = inspect::scan(&self.dir)?;
        for warning in warnings {
            eprintln!("warning: {warning}");
        }
        let found = runs.len();
        inspect::filter(&mut runs, &self.filters);
        inspect::sort(&mut runs, &self.sort);
        if self.json {
            println!("{}", inspect::runs_json(&runs));
        } else if runs.is_empty() && found > 0 {
            let filters: Vec<String> = (self.filters.iter())
                .map(|f| format!("--filter {}={}", f.key, f.value))
                .collect();
            eprintln!(
                "none of the {found} runs in {} matches {}",
                self.dir.display(),
                filters.join(" ")
            );
        } else if runs.is_empty() {
            eprintln!("no runs in {}", self.dir.display());
        } else if let Some(record) = self.search_view()? {
            print!("{}{}", record.overview(), record.table().to_text());
        } else if self.group {
            print!(
                "{}",
                seeds::groups_table(&seeds::seed_groups(&runs)).to_text()
            );
        } else {
            print!("{}", inspect::runs_table(&runs, &self.columns).to_text());
        }
        let searches = search::find_records(&self.dir, 1);
        let inside: Vec<String> = (searches.iter())
            .filter(|dir| **dir != self.dir)
            .map(|dir| dir.display().to_string())
            .collect();
        if !inside.is_empty() && !self.json {
            eprintln!(
                "searches (their trials: `mnist-lab runs DIR`): {}",
                inside.join(", ")
            );
        }
        Ok(())
    }

    /// The record of the search whose folder is listed, where no flag asks
    /// for the runs' own table: its trials' values, rungs and metrics.
    fn search_view(&self) -> anyhow::Result<Option<search::SearchRecord>> {
        let plain = self.columns.is_empty()
            && self.filters.is_empty()
            && self.sort == Sort::Column(inspect::SortKey::Started);
        let path = self.dir.join(search::RECORD_FILE);
        Ok(match plain && path.is_file() {
            true => Some(search::SearchRecord::read(&path)?),
            false => None,
        })
    }
}

impl RunsArgs {
    /// Every key named by --sort, --columns and --filter must be one a run has.
    fn check_keys(&self) -> Result<(), UsageError> {
        let sort = match &self.sort {
            Sort::Config(key) => Some(("--sort", key)),
            Sort::Column(_) => None,
        };
        let named = (sort.into_iter())
            .chain(self.columns.iter().map(|key| ("--columns", key)))
            .chain(self.filters.iter().map(|f| ("--filter", &f.key)));
        for (flag, key) in named {
            inspect::check_run_key(key).map_err(|e| UsageError(format!("{flag}: {e}")))?;
        }
        Ok(())
    }
}

/// The trials of a search that `compare` draws: one colour each.
const COMPARED_TRIALS: usize = 8;

#[derive(Args)]
pub(super) struct CompareArgs {
    /// Run directories to compare; a search's folder stands for its trials
    /// that went furthest, best first (at most eight).
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Where compare.png and compare.md go (default: runs/compare-<time>/).
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Runs that differ only by seed as one line each: the mean curve in a band
    /// of one standard deviation, and a row of mean ± std.
    #[arg(long)]
    group: bool,
}

impl CompareArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        let (dirs, searches) = expand_searches(&self.runs)?;
        let runs = (dirs.iter())
            .map(|dir| inspect::RunInfo::read(dir))
            .collect::<Result<Vec<_>, _>>()?;
        let output = match self.output {
            Some(dir) => dir,
            None => crate::util::fsio::create_unique_dir(&PathBuf::from("runs"), "compare")?,
        };
        let mut preamble = String::new();
        for (dir, record) in &searches {
            let file = format!("search-{}.png", record.name);
            std::fs::create_dir_all(&output)
                .map_err(crate::util::fsio::FileError::on("create", &output))?;
            search::figure::write(record, dir, &output.join(&file))?;
            print!("{}", record.overview());
            preamble += &format!(
                "{}![{} search]({file})\n\n",
                record.overview_markdown(),
                record.name
            );
        }
        let (figure, markdown) = if self.group {
            compare::write_groups(&seeds::seed_groups(&runs), &output)?
        } else {
            compare::write(&compare::load(runs)?, &output, &preamble)?
        };
        print!("{markdown}");
        eprintln!(
            "wrote {} and {}",
            figure.display(),
            output.join(compare::TABLE_FILE).display()
        );
        Ok(())
    }
}

/// A search's folder and its record.
type SearchFolder = (PathBuf, search::SearchRecord);

/// The run directories `compare` draws: each given one, or for a search's
/// folder its trials that went furthest (best first); and the searches.
fn expand_searches(given: &[PathBuf]) -> anyhow::Result<(Vec<PathBuf>, Vec<SearchFolder>)> {
    let (mut dirs, mut searches) = (Vec::new(), Vec::new());
    for dir in given {
        let path = dir.join(search::RECORD_FILE);
        if !path.is_file() {
            dirs.push(dir.clone());
            continue;
        }
        let record = search::SearchRecord::read(&path)?;
        let leading = record.leading_runs(dir);
        if leading.is_empty() {
            let message = format!(
                "{}: no trial of this search has a metric yet",
                dir.display()
            );
            return Err(UsageError(message).into());
        }
        dirs.extend(leading.into_iter().take(COMPARED_TRIALS));
        searches.push((dir.clone(), record));
    }
    Ok((dirs, searches))
}

#[derive(Args)]
pub(super) struct CheckpointArgs {
    /// The run directory.
    run_dir: PathBuf,
    /// Which checkpoint: the best validation epoch's or the last epoch's.
    #[arg(long, value_enum, default_value = "best")]
    checkpoint: Checkpoint,
    /// Override a field of the run's saved config, e.g. `--set data.dir=...`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Checkpoint {
    Best,
    Last,
}

impl CheckpointArgs {
    fn load(&self) -> anyhow::Result<TrainedModel> {
        let file = match self.checkpoint {
            Checkpoint::Best => rundir::BEST_CHECKPOINT,
            Checkpoint::Last => rundir::LAST_CHECKPOINT,
        };
        Ok(TrainedModel::load(&self.run_dir, file, &self.set)?)
    }
}

#[derive(Args)]
pub(super) struct EvalArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        let model = self.checkpoint.load()?;
        let (evaluation, test) = evaluate::evaluate(&model)?;
        // Files in the run directory describe the run's own test set: an
        // evaluation of another (`--set data.test_size=...`, or the files of
        // another folder) is printed only.
        let written = match evaluate::other_test_set(&model, &evaluation) {
            None => evaluate::write_files(&evaluation, &test, &model.run.summary.name)?,
            Some(why) => {
                eprintln!("not writing eval files into the run directory: {why}");
                Vec::new()
            }
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&evaluation)?);
        } else {
            println!(
                "{}: test accuracy {:.2}% ({} of {} wrong), loss {:.4}",
                model.checkpoint.display(),
                100.0 * evaluation.accuracy,
                evaluation.mistakes.len(),
                evaluation.images,
                evaluation.loss
            );
            let mut table = Table::new(&["class", "images", "accuracy", "most often read as"]);
            for (class, row) in evaluation.confusion.iter().enumerate() {
                let (other, count) = row
                    .iter()
                    .enumerate()
                    .filter(|(p, _)| *p != class)
                    .max_by_key(|(_, c)| **c)
                    .expect("ten classes");
                table.push(vec![
                    class.to_string(),
                    row.iter().sum::<usize>().to_string(),
                    percent(Some(evaluation.per_class_accuracy[class])),
                    if *count > 0 {
                        format!("{other} ({count})")
                    } else {
                        "-".into()
                    },
                ]);
            }
            print!("{}", table.to_text());
        }
        for path in written {
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}

#[derive(Args)]
pub(super) struct PredictArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// PNG files to classify.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

impl PredictArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        let model = self.checkpoint.load()?;
        let results = predict::predict(&model, &self.images)?;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if self.json {
            // One object per image: its prediction, or its error.
            let rows: Vec<serde_json::Value> = (self.images.iter().zip(&results))
                .map(|(image, result)| match result {
                    Ok(p) => serde_json::to_value(p).expect("a prediction serialises"),
                    Err(e) => serde_json::json!({ "image": image, "error": e.to_string() }),
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            for result in &results {
                match result {
                    Ok(p) => println!("{}: {}", p.image.display(), describe(p)),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
        }
        if failed > 0 {
            anyhow::bail!(
                "{failed} of {} images could not be classified",
                results.len()
            );
        }
        Ok(())
    }
}

/// `7 (98.1%), 1 (1.2%), 2 (0.3%)`.
fn describe(prediction: &predict::Prediction) -> String {
    let top: Vec<String> = prediction
        .top
        .iter()
        .map(|c| format!("{} ({:.1}%)", c.class, 100.0 * c.probability))
        .collect();
    top.join(", ")
}

#[derive(Args)]
pub(super) struct ReportArgs {
    /// Folder of run directories to report from.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// The configs to report, one row each.
    #[arg(long, value_name = "DIR", default_value = "configs")]
    configs: PathBuf,
    /// The markdown file whose marked part is rewritten.
    #[arg(
        long,
        visible_alias = "readme",
        value_name = "FILE",
        default_value = "docs/results.md"
    )]
    output: PathBuf,
    /// Where the images go, relative to that file's folder.
    #[arg(long, value_name = "DIR", default_value = "results")]
    assets: PathBuf,
}

impl ReportArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        report::generate(&ReportOptions {
            runs_dir: self.runs_dir,
            configs_dir: self.configs,
            output: self.output.clone(),
            assets: self.assets,
        })?;
        eprintln!("rewrote the results section of {}", self.output.display());
        Ok(())
    }
}
