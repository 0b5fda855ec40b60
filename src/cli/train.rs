//! `run`, `resume`: training one run from the command line.

use std::path::PathBuf;

use clap::Args;

use crate::cli::{ConfigArgs, UsageError};
use crate::config::{Config, Override};
use crate::run::rundir;
use crate::run::sweep;
use crate::run::{experiment, resume};
use crate::util::device;

#[derive(Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where run directories are created.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// CPU threads (default: the config's device.threads; 0 = one per core).
    #[arg(long, value_name = "N", value_parser = device::parse_threads)]
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
        if config.search.is_some() {
            return Err(UsageError(format!(
                "{} has a [search] table: run it with `mnist-lab search {}`",
                self.config.config.display(),
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
    /// `train.early_stopping`, `device.*`, `data.dir`, `train.eval_batch_size`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Take the run even if its owner may be alive, where the file system cannot
    /// lock and the owner's heartbeat is recent (see the README: lost nodes).
    #[arg(long)]
    force: bool,
    /// CPU threads (default: the run's device.threads; 0 = one per core).
    #[arg(long, value_name = "N", value_parser = device::parse_threads)]
    threads: Option<usize>,
}

impl ResumeArgs {
    pub(super) fn execute(mut self) -> anyhow::Result<()> {
        if let Some(changed) = self.set.iter().find(|o| !resume::resumable(&o.key)) {
            return Err(UsageError(format!(
                "--set {}: a resumed run keeps its settings; only train.epochs, \
                 train.early_stopping, train.eval_batch_size, data.dir and device.* may \
                 change (start a new run to change {})",
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
        let options = experiment::ResumeOptions {
            overrides: self.set,
            force: self.force,
        };
        let outcome = experiment::resume(&self.run_dir, &options)?.into_result()?;
        print_outcome(&outcome);
        Ok(())
    }
}

/// The lines a finished run prints: where it is and how it scored.
pub(super) fn print_outcome(outcome: &experiment::RunOutcome) {
    let summary = &outcome.summary;
    println!("run directory: {}", outcome.dir.display());
    if let (Some(acc), Some(loss)) = (summary.test_acc, summary.test_loss) {
        let epoch = summary.best_epoch.unwrap_or(0);
        let which = match summary.best_val_acc {
            Some(_) => format!("best validation epoch {epoch} of {}", summary.epochs),
            None => format!(
                "epoch {epoch} of {}, trained on every training image",
                summary.epochs
            ),
        };
        println!(
            "test accuracy {:.2}% (loss {loss:.4}), {which}",
            100.0 * acc
        );
    }
}
