//! The `mnist-lab` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;
use mnist_lab::config::{Config, Override};
use mnist_lab::{bench, device, experiment, telemetry};

// Training allocates and frees many same-sized tensors per step; mimalloc reuses
// that memory instead of returning it to the OS and faulting it back in.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "mnist-lab",
    version,
    about = "Train MNIST classifiers with Candle from TOML configs"
)]
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
    /// Measure training and evaluation throughput (images/s).
    Bench(BenchArgs),
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
    // First Ctrl-C: finish the batch, write the run's files, exit. Second: exit now.
    let _ = ctrlc::set_handler(|| {
        if mnist_lab::train::request_stop() {
            std::process::exit(130);
        }
        eprintln!("stopping after this batch (Ctrl-C again to quit at once)");
    });
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
            Command::Bench(args) => args.execute(),
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
        let report = bench::run(
            &models,
            &batch_sizes,
            self.steps,
            self.data_dir.as_deref(),
            exe.as_deref(),
        )?;
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
