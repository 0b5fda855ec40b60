//! The command line: argument parsing and one short `execute` per subcommand,
//! each a call into the library module that does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::analyze::AnalyzeError;
use crate::config::{Config, ConfigError, Override};
use crate::util::interrupt;

mod bench;
mod inspect;
mod search;
mod sweep;
mod train;

use bench::BenchArgs;
use inspect::{CompareArgs, EvalArgs, PredictArgs, ReportArgs, RunsArgs};
use search::SearchArgs;
use sweep::SweepArgs;
use train::{ResumeArgs, RunArgs};

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
    /// Continue an interrupted, failed or stale run (or extend a finished one).
    Resume(ResumeArgs),
    /// Run many configs: files, directories, `[sweep]` grids, comma lists in --set.
    Sweep(SweepArgs),
    /// Search a config's `[search]` space: random trials, or successive halving.
    Search(SearchArgs),
    /// List the runs in a directory.
    Runs(RunsArgs),
    /// Overlay several runs' validation curves and tabulate them.
    Compare(CompareArgs),
    /// Evaluate a run's checkpoint on the test set: per-class accuracy, confusion, mistakes.
    Eval(EvalArgs),
    /// Classify image files with a trained run.
    Predict(PredictArgs),
    /// Regenerate docs/results.md (its marked section) from the runs on disk.
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
    let usage = error.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause.is::<UsageError>()
            || cause
                .downcast_ref::<AnalyzeError>()
                .is_some_and(AnalyzeError::is_usage)
            || cause
                .downcast_ref::<crate::run::RunError>()
                .is_some_and(crate::run::RunError::is_usage)
            || cause
                .downcast_ref::<crate::run::sweep::SweepError>()
                .is_some_and(crate::run::sweep::SweepError::is_usage)
    });
    if usage { 2 } else { 1 }
}

impl Cli {
    pub fn execute(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(args) => args.execute(),
            Command::Sweep(args) => args.execute(),
            Command::Search(args) => args.execute(),
            Command::Resume(args) => args.execute(),
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
