//! `bench`: training and evaluation throughput.

use std::path::PathBuf;

use clap::Args;

use crate::analyze::bench;
use crate::util::device::{self, DeviceSpec};

#[derive(Args)]
pub(super) struct BenchArgs {
    /// Models to measure (lenet5, lenet5_reg, custom_mlp); default all three.
    #[arg(long = "model", value_name = "M")]
    models: Vec<String>,
    /// Training batch sizes; default 64 and 256 (at most 8192).
    #[arg(long = "batch-size", value_name = "B", value_parser = batch_size)]
    batch_sizes: Vec<usize>,
    /// CPU threads (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = device::parse_threads)]
    threads: usize,
    /// Timed training steps per measurement.
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = at_least_one)]
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
    pub(super) fn execute(self) -> anyhow::Result<()> {
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

/// `--steps N`: timing zero steps measures nothing.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a whole number of at least 1, got {text:?}"
        )),
    }
}

/// `--batch-size B`: bounded as a config's `train.batch_size` is.
fn batch_size(text: &str) -> Result<usize, String> {
    let max = crate::train::MAX_BATCH_SIZE;
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a whole number from 1 to {max}, got {text:?}"
        )),
    }
}
