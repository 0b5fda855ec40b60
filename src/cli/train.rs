//! `run`, `sweep`: training from the command line.

use std::path::PathBuf;

use clap::Args;

use crate::cli::{ConfigArgs, UsageError};
use crate::config::{Config, Override};
use crate::run::experiment;
use crate::run::rundir;
use crate::run::sweep::{self, Shard, SweepRecord, SweepSet};
use crate::util::{device, interrupt};

#[derive(Args)]
pub(super) struct RunArgs {
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
    pub(super) fn execute(self) -> anyhow::Result<()> {
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
        print_outcome(&outcome);
        Ok(())
    }
}

#[derive(Args)]
pub(super) struct ResumeArgs {
    /// The run directory to continue.
    run_dir: PathBuf,
    /// Change what a resumed run may change: `train.epochs` (to extend it),
    /// `device.*`, `data.dir`, `train.eval_batch_size`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// CPU threads (default: the run's device.threads; 0 = one per core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

/// Whether a resumed run may change `key`: none of these changes what it learns.
fn resumable(key: &str) -> bool {
    matches!(key, "train.epochs" | "train.eval_batch_size" | "data.dir")
        || key.starts_with("device.")
}

impl ResumeArgs {
    pub(super) fn execute(mut self) -> anyhow::Result<()> {
        if let Some(changed) = self.set.iter().find(|o| !resumable(&o.key)) {
            return Err(UsageError(format!(
                "--set {}: a resumed run keeps its settings; only train.epochs, \
                 train.eval_batch_size, data.dir and device.* may change \
                 (start a new run to change {})",
                changed.key, changed.key
            ))
            .into());
        }
        if let Some(threads) = self.threads {
            self.set.push(
                format!("device.threads={threads}")
                    .parse()
                    .map_err(UsageError)?,
            );
        }
        // The run's own thread count unless changed; a config that does not load
        // is reported by `resume` itself.
        let config = Config::load(&self.run_dir.join(rundir::CONFIG_FILE), &self.set);
        let threads = config.map_or(0, |c| c.device.threads);
        device::set_cpu_threads(threads);
        let outcome = experiment::resume(&self.run_dir, &self.set)?.into_result()?;
        print_outcome(&outcome);
        Ok(())
    }
}

/// The lines a finished run prints: where it is and how it scored.
fn print_outcome(outcome: &experiment::RunOutcome) {
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
}

#[derive(Args)]
pub(super) struct SweepArgs {
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
    pub(super) fn execute(self) -> anyhow::Result<()> {
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
        if interrupt::stop_requested().is_some() {
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
