//! The `mnist-lab` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mnist_lab::config::{Config, Override};
use mnist_lab::{device, experiment, telemetry};

#[derive(Parser)]
#[command(name = "mnist-lab", version, about = "Train MNIST classifiers with Candle from TOML configs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one config and write a run directory.
    Run(RunArgs),
    /// Print a config with every default and override resolved, without running it.
    Config(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// The TOML config file.
    config: PathBuf,
    /// Override a field: `--set optimizer.lr=0.05` (repeatable; VALUE is TOML, or a bare string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
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

fn main() -> ExitCode {
    telemetry::init();
    match Cli::parse().command.execute() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Config(args) => {
                print!("{}", args.load()?.to_toml());
                Ok(())
            }
            Command::Run(args) => {
                let mut config = args.config.load()?;
                if let Some(threads) = args.threads {
                    config.device.threads = threads;
                }
                device::set_cpu_threads(config.device.threads);
                let outcome = experiment::run(&config, &args.runs_dir)?;
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
    }
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.config, &self.set)?)
    }
}
