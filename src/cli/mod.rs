//! The command line: argument parsing and one short `execute` per subcommand,
//! each a call into the library module that does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::analyze::evaluate::{self, TrainedModel};
use crate::analyze::inspect::{self, SortKey};
use crate::analyze::report::{self, ReportOptions};
use crate::analyze::{bench, compare, predict};
use crate::config::{Config, ConfigError, Override};
use crate::run::sweep::{self, Shard, SweepRecord, SweepSet};
use crate::run::{experiment, rundir};
use crate::util::device;
use crate::util::device::DeviceSpec;
use crate::util::interrupt;
use crate::util::table::{Table, percent};

#[derive(Parser)]
#[command(
    name = "mnist-lab",
    version,
    about = "Train MNIST classifiers with Candle from TOML configs"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one config and write a run directory.
    Run(RunArgs),
    /// Run many configs: files, directories, `[sweep]` grids, comma lists in --set.
    Sweep(SweepArgs),
    /// List the runs in a directory.
    Runs(RunsArgs),
    /// Overlay several runs' validation curves and tabulate them.
    Compare(CompareArgs),
    /// Evaluate a run's checkpoint on the test set: per-class accuracy, confusion, mistakes.
    Eval(EvalArgs),
    /// Classify image files with a trained run.
    Predict(PredictArgs),
    /// Regenerate the README's results section from the runs on disk.
    Report(ReportArgs),
    /// Print a config with every default and override resolved, without running it.
    Config(ConfigArgs),
    /// Measure training and evaluation throughput (images/s).
    Bench(BenchArgs),
}

/// A command line that asks for something it cannot have (exit status 2, as
/// clap's own usage errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit status for an error: 130 or 143 after SIGINT or SIGTERM, 2 for
/// usage and config errors, 1 for failures at run time.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(signal) = interrupt::stop_requested() {
        return signal.exit_code();
    }
    let usage = error
        .chain()
        .any(|cause| cause.is::<ConfigError>() || cause.is::<UsageError>());
    if usage { 2 } else { 1 }
}

impl Cli {
    pub fn execute(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(args) => args.execute(),
            Command::Sweep(args) => args.execute(),
            Command::Runs(args) => args.execute(),
            Command::Compare(args) => args.execute(),
            Command::Eval(args) => args.execute(),
            Command::Predict(args) => args.execute(),
            Command::Report(args) => args.execute(),
            Command::Config(args) => {
                print!("{}", args.load()?.to_toml());
                Ok(())
            }
            Command::Bench(args) => args.execute(),
        }
    }
}

#[derive(Args)]
struct ConfigArgs {
    /// The TOML config file.
    config: PathBuf,
    /// Override a field: `--set optimizer.lr=0.05` (repeatable; VALUE is TOML, or a bare string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.config, &self.set)?)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where run directories are created.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// CPU threads (default: the config's device.threads; 0 = one per core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

impl RunArgs {
    fn execute(self) -> anyhow::Result<()> {
        let mut config = self.config.load()?;
        if !config.sweep.is_empty() {
            let runs = sweep::plan(
                &sweep::read_sources(std::slice::from_ref(&self.config.config))?,
                &[],
            )?;
            return Err(UsageError(format!(
                "{} has a [sweep] grid of {} runs: run it with `mnist-lab sweep {}`",
                self.config.config.display(),
                runs.len(),
                self.config.config.display()
            ))
            .into());
        }
        if let Some(threads) = self.threads {
            config.device.threads = threads;
        }
        device::set_cpu_threads(config.device.threads);
        let outcome = experiment::run(&config, &self.runs_dir)?.into_result()?;
        let summary = &outcome.summary;
        println!("run directory: {}", outcome.dir.display());
        if let (Some(acc), Some(loss)) = (summary.test_acc, summary.test_loss) {
            println!(
                "test accuracy {:.2}% (loss {loss:.4}), best validation epoch {} of {}",
                100.0 * acc,
                summary.best_epoch.unwrap_or(0),
                summary.epochs
            );
        }
        Ok(())
    }
}

#[derive(Args)]
struct SweepArgs {
    /// Config files, directories of them, or a sweep.json to run again (default: configs/).
    #[arg(value_name = "CONFIG|DIR")]
    paths: Vec<PathBuf>,
    /// Override for every run; a comma list sweeps: `--set optimizer.lr=0.01,0.05,0.1`.
    #[arg(long = "set", value_name = "KEY=VALUE[,VALUE...]")]
    set: Vec<SweepSet>,
    /// Where run directories and the sweep's record are created.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// CPU threads for every run (default: the first run's device.threads).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Run only the I-th of N disjoint slices of the runs (I from 0): one per machine.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Print the expanded runs (and their shards) without running them.
    #[arg(long)]
    list: bool,
    /// Name of the sweep's record folder (default: the config's or folder's name).
    #[arg(long)]
    name: Option<String>,
}

impl SweepArgs {
    fn execute(self) -> anyhow::Result<()> {
        let paths = if self.paths.is_empty() {
            vec![PathBuf::from("configs")]
        } else {
            self.paths.clone()
        };
        let planned = sweep::plan(&sweep::read_sources(&paths)?, &self.set)?;
        let total = planned.len();
        if self.list {
            let shards = self.shard.map_or(1, |s| s.count);
            print!("{}", sweep::plan_table(&planned, shards).to_text());
            return Ok(());
        }
        let mine: Vec<_> = planned
            .into_iter()
            .filter(|run| self.shard.is_none_or(|s| s.owns(run.index)))
            .collect();
        let Some(first) = mine.first() else {
            println!(
                "shard {} has no runs: the sweep expands to {total}",
                self.shard.unwrap_or(Shard { index: 0, count: 1 })
            );
            return Ok(());
        };
        device::set_cpu_threads(self.threads.unwrap_or(first.config.device.threads));
        let name = self.name.clone().unwrap_or_else(|| sweep_name(&paths));
        let record_dir = sweep::create_record_dir(&self.runs_dir, &name, self.shard)?;
        let record_path = record_dir.join(sweep::RECORD_FILE);
        let mut record = SweepRecord::new(&name, self.shard, total, &mine);
        eprintln!(
            "sweep {name}: {} of {total} runs; record {}",
            mine.len(),
            record_path.display()
        );
        let started = std::time::Instant::now();
        let failed = sweep::execute(&mine, &mut record, &record_path, &self.runs_dir)?;
        print!("{}", record.table().to_text());
        println!(
            "sweep wall time: {:.1} s; record: {}",
            started.elapsed().as_secs_f64(),
            record_path.display()
        );
        if crate::util::interrupt::stop_requested().is_some() {
            anyhow::bail!("sweep interrupted; the record says which runs are left pending");
        }
        if failed > 0 {
            anyhow::bail!(
                "{failed} of {} runs failed (errors in {})",
                mine.len(),
                record_path.display()
            );
        }
        Ok(())
    }
}

/// A single config's or folder's name; `sweep` for several.
fn sweep_name(paths: &[PathBuf]) -> String {
    match paths {
        [one] => one
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty() && s != "sweep")
            .unwrap_or_else(|| "sweep".into()),
        _ => "sweep".into(),
    }
}

#[derive(Args)]
struct RunsArgs {
    /// Folder of run directories.
    #[arg(default_value = "runs")]
    dir: PathBuf,
    /// Sort by this column (accuracies best first, the rest ascending).
    #[arg(long, value_enum, default_value = "started")]
    sort: SortKey,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

impl RunsArgs {
    fn execute(self) -> anyhow::Result<()> {
        let (mut runs, warnings) = inspect::scan(&self.dir)?;
        for warning in warnings {
            eprintln!("warning: {warning}");
        }
        inspect::sort(&mut runs, self.sort);
        if self.json {
            println!("{}", inspect::runs_json(&runs));
        } else if runs.is_empty() {
            eprintln!("no runs in {}", self.dir.display());
        } else {
            print!("{}", inspect::runs_table(&runs).to_text());
        }
        Ok(())
    }
}

#[derive(Args)]
struct CompareArgs {
    /// Run directories to compare.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Where compare.png and compare.md go (default: runs/compare-<time>/).
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
}

impl CompareArgs {
    fn execute(self) -> anyhow::Result<()> {
        let runs = self
            .runs
            .iter()
            .map(|dir| inspect::RunInfo::read(dir))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let curves = compare::load(runs)?;
        let output = match self.output {
            Some(dir) => dir,
            None => crate::util::fsio::create_unique_dir(&PathBuf::from("runs"), "compare")?,
        };
        let (figure, markdown) = compare::write(&curves, &output)?;
        print!("{markdown}");
        eprintln!(
            "wrote {} and {}",
            figure.display(),
            output.join(compare::TABLE_FILE).display()
        );
        Ok(())
    }
}

#[derive(Args)]
struct CheckpointArgs {
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
        TrainedModel::load(&self.run_dir, file, &self.set)
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    fn execute(self) -> anyhow::Result<()> {
        let model = self.checkpoint.load()?;
        let (evaluation, test) = evaluate::evaluate(&model)?;
        let written = evaluate::write_files(&evaluation, &test, &model.run.summary.name)?;
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
struct PredictArgs {
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
    fn execute(self) -> anyhow::Result<()> {
        let model = self.checkpoint.load()?;
        let predictions = predict::predict(&model, &self.images)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&predictions)?);
            return Ok(());
        }
        for p in predictions {
            let top: Vec<String> = p
                .top
                .iter()
                .map(|c| format!("{} ({:.1}%)", c.class, 100.0 * c.probability))
                .collect();
            println!("{}: {}", p.image.display(), top.join(", "));
        }
        Ok(())
    }
}

#[derive(Args)]
struct ReportArgs {
    /// Folder of run directories to report from.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// The configs to report, one row each.
    #[arg(long, value_name = "DIR", default_value = "configs")]
    configs: PathBuf,
    /// The README whose marked section is rewritten.
    #[arg(long, value_name = "FILE", default_value = "README.md")]
    readme: PathBuf,
    /// Where the images go, relative to the README.
    #[arg(long, value_name = "DIR", default_value = "docs/results")]
    assets: PathBuf,
}

impl ReportArgs {
    fn execute(self) -> anyhow::Result<()> {
        report::generate(&ReportOptions {
            runs_dir: self.runs_dir,
            configs_dir: self.configs,
            readme: self.readme.clone(),
            assets: self.assets,
        })?;
        eprintln!("rewrote the results section of {}", self.readme.display());
        Ok(())
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Models to measure (lenet5, lenet5_reg, custom_mlp); default all three.
    #[arg(long = "model", value_name = "M")]
    models: Vec<String>,
    /// Training batch sizes; default 64 and 256.
    #[arg(long = "batch-size", value_name = "B")]
    batch_sizes: Vec<usize>,
    /// CPU threads (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
    /// Timed training steps per measurement.
    #[arg(long, value_name = "N", default_value_t = 200)]
    steps: usize,
    /// Where the figures are written as JSON.
    #[arg(long, value_name = "FILE", default_value = "runs/bench.json")]
    output: PathBuf,
    /// Data directory (default: $MNIST_DIR, then data/mnist).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Skip the one-epoch runs that measure peak memory.
    #[arg(long)]
    no_epoch_runs: bool,
    /// Where to measure: cpu, cuda, cuda:N or auto.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: DeviceSpec,
}

impl BenchArgs {
    fn execute(self) -> anyhow::Result<()> {
        device::set_cpu_threads(self.threads);
        let models = if self.models.is_empty() {
            bench::PRESETS.iter().map(|m| m.to_string()).collect()
        } else {
            self.models
        };
        let batch_sizes = if self.batch_sizes.is_empty() {
            vec![64, 256]
        } else {
            self.batch_sizes
        };
        let single = models.len() == 1 && batch_sizes.len() == 1;
        // One model at one batch size is the scripted comparison: throughput only.
        let exe = if self.no_epoch_runs || single {
            None
        } else {
            Some(std::env::current_exe()?)
        };
        let report = bench::run(&bench::BenchPlan {
            models: &models,
            batch_sizes: &batch_sizes,
            steps: self.steps,
            data_dir: self.data_dir.as_deref(),
            device: self.device,
            epoch_runs_with: exe.as_deref(),
        })?;
        if let (true, [only]) = (single, report.results.as_slice()) {
            // The PyTorch reference's format, for scripts that compare the two.
            println!("train_images_per_s={:.0}", only.train_images_per_s);
            println!("eval_images_per_s={:.0}", only.eval_images_per_s);
        } else {
            print!("{}", report.table());
        }
        report.write_json(&self.output)?;
        eprintln!("figures written to {}", self.output.display());
        Ok(())
    }
}
