//! Throughput benchmark with the same protocol as the PyTorch reference
//! (`scripts/torch_ref.py --bench-steps`): training steps (forward, loss,
//! backward, SGD step) on batches already in memory after 20 warm-up steps, then
//! evaluation of the test set in batches of 1000 (repeated for at least half a
//! second, where the reference times one pass).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::analyze::{AnalyzeError, Result};
use crate::config::Config;
use crate::data::Datasets;
use crate::kernels;
use crate::model::ModelKind;
use crate::train::{self, Trainer};
use crate::util::device::DeviceSpec;
use crate::util::fsio::{FileError, write_atomic};

/// The benchmarked models: the three of the PyTorch reference.
pub const PRESETS: [&str; 3] = ["lenet5", "lenet5_reg", "custom_mlp"];
const WARMUP_STEPS: usize = 20;
const EVAL_BATCH: usize = 1000;
/// Evaluation is timed over whole passes of the test set lasting at least this long.
const EVAL_SECS: f64 = 0.5;
/// Distinct batches the timed steps cycle through.
const BATCH_POOL: usize = 100;

/// The reference's training set-up for a preset: SGD, lr 0.01, momentum 0.9, and
/// for `lenet5_reg` BatchNorm with weight decay 5e-4.
pub fn preset_config(preset: &str, batch_size: usize) -> Result<Config> {
    let mut config = Config::default();
    let (kind, regularised) = match preset.strip_suffix("_reg") {
        Some(kind) => (kind, true),
        None => (preset, false),
    };
    let kind = (ModelKind::ALL.iter())
        .find(|k| k.name() == kind && PRESETS.contains(&preset))
        .ok_or_else(|| {
            AnalyzeError::Usage(format!(
                "unknown model {preset:?}: expected one of {PRESETS:?}"
            ))
        })?;
    config.model.kind = *kind;
    if regularised {
        config.model.batch_norm = true;
        config.optimizer.weight_decay = 5e-4;
    }
    config.name = preset.to_string();
    config.optimizer.lr = Some(0.01);
    config.train.batch_size = batch_size;
    config.train.eval_batch_size = EVAL_BATCH;
    Ok(config)
}

/// Figures of one model at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub model: String,
    pub batch_size: usize,
    pub train_images_per_s: f64,
    pub eval_images_per_s: f64,
    /// Heap allocations per timed training step, on every thread.
    pub allocations_per_step: f64,
}

/// Times `steps` training steps and one pass over the test set.
pub fn measure(
    preset: &str,
    batch_size: usize,
    steps: usize,
    data: &Datasets,
    device: &Device,
) -> Result<Throughput> {
    let config = preset_config(preset, batch_size)?;
    let mut trainer = Trainer::new(&config.train_setup(), data.side, device)?;
    // A bounded pool of batches, cycled: memory stays flat however many steps.
    let batches = random_batches(data, batch_size, BATCH_POOL, device)?;
    // On the training thread, as `Trainer::train_epoch` runs the steps of
    // batches that train as halves (every preset's do).
    let (train_secs, allocations_per_step) = kernels::on_training_thread(device, || {
        for (images, labels) in batches.iter().cycle().take(WARMUP_STEPS) {
            trainer.train_step(images, labels, 0.01)?;
        }
        let allocations = crate::util::alloc::allocations();
        let start = Instant::now();
        for (images, labels) in batches.iter().cycle().take(steps) {
            trainer.train_step(images, labels, 0.01)?;
        }
        device.synchronize()?;
        let allocations = crate::util::alloc::allocations() - allocations;
        Ok::<_, AnalyzeError>((
            start.elapsed().as_secs_f64(),
            allocations as f64 / steps as f64,
        ))
    })?;

    let warm_set = data.test.slice(0, data.test.len().min(2 * EVAL_BATCH))?;
    train::evaluate(trainer.model.as_ref(), &warm_set, EVAL_BATCH)?;
    // One pass of a small model takes milliseconds, where one stray context switch
    // shows: repeat whole passes for at least EVAL_SECS and take the mean.
    let start = Instant::now();
    let mut passes = 0;
    while passes == 0 || start.elapsed().as_secs_f64() < EVAL_SECS {
        train::evaluate(trainer.model.as_ref(), &data.test, EVAL_BATCH)?;
        passes += 1;
    }
    let eval_secs = start.elapsed().as_secs_f64() / passes as f64;
    Ok(Throughput {
        model: preset.to_string(),
        batch_size,
        train_images_per_s: (steps * batch_size) as f64 / train_secs,
        eval_images_per_s: data.test.len() as f64 / eval_secs,
        allocations_per_step,
    })
}

/// `count` batches of random training examples, gathered in advance.
fn random_batches(
    data: &Datasets,
    batch_size: usize,
    count: usize,
    device: &Device,
) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = data.train.len() as u32;
    (0..count)
        .map(|_| {
            let indices: Vec<u32> = (0..batch_size).map(|_| rng.random_range(0..n)).collect();
            data.train
                .gather(&Tensor::from_vec(indices, batch_size, device)?)
        })
        .collect()
}

/// Everything one `bench` invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub threads: usize,
    pub device: String,
    pub load_secs: f64,
    pub steps: usize,
    pub results: Vec<Throughput>,
    /// One-epoch runs (batch 64) in a child process, for their peak memory.
    pub epoch_runs: Vec<EpochRun>,
}

/// A real one-epoch run of a preset: its wall time and peak resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRun {
    pub model: String,
    pub wall_secs: f64,
    pub peak_rss_mb: Option<f64>,
}

/// Trains `preset` for one epoch with `exe run` (this program) and reads its summary.
pub fn one_epoch_run(
    exe: &std::path::Path,
    preset: &str,
    data_dir: Option<&std::path::Path>,
    device: DeviceSpec,
) -> Result<EpochRun> {
    let mut config = preset_config(preset, 64)?;
    config.train.epochs = 1;
    // A run as users start it: the default evaluation batch, not the protocol's.
    config.train.eval_batch_size = crate::train::TrainConfig::default().eval_batch_size;
    config.device.kind = device;
    config.data.dir = data_dir.map(|d| d.to_path_buf());
    let failed = |reason: String| AnalyzeError::EpochRun {
        preset: preset.to_string(),
        reason,
    };
    let scratch = tempfile::tempdir().map_err(|e| failed(format!("no scratch folder: {e}")))?;
    let config_path = scratch.path().join(format!("{preset}.toml"));
    write_atomic(&config_path, config.to_toml().as_bytes())?;
    let output = std::process::Command::new(exe)
        .arg("run")
        .arg(&config_path)
        .arg("--runs-dir")
        .arg(scratch.path().join("runs"))
        .env("RUST_LOG", "warn")
        .output()
        .map_err(|e| failed(format!("cannot start {}: {e}", exe.display())))?;
    if !output.status.success() {
        return Err(failed(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let runs_dir = scratch.path().join("runs");
    let run_dir = std::fs::read_dir(&runs_dir)
        .map_err(FileError::on("read", &runs_dir))?
        .find_map(|entry| entry.ok().map(|e| e.path()))
        .ok_or_else(|| failed("it left no run directory".into()))?;
    let summary =
        crate::run::rundir::read_summary(&run_dir.join(crate::run::rundir::SUMMARY_FILE))?;
    Ok(EpochRun {
        model: preset.to_string(),
        wall_secs: summary.wall_secs,
        peak_rss_mb: summary.peak_rss_mb,
    })
}

/// What one `bench` invocation measures, and where.
pub struct BenchPlan<'a> {
    pub models: &'a [String],
    pub batch_sizes: &'a [usize],
    pub steps: usize,
    pub data_dir: Option<&'a std::path::Path>,
    pub device: DeviceSpec,
    /// This program, to run one-epoch runs in a child process (`None`: skip them).
    pub epoch_runs_with: Option<&'a std::path::Path>,
}

/// Loads MNIST once onto the device, then measures every model at every batch size.
pub fn run(plan: &BenchPlan) -> Result<Report> {
    let BenchPlan {
        models,
        batch_sizes,
        steps,
        data_dir,
        device: device_spec,
        epoch_runs_with,
    } = *plan;
    for model in models {
        preset_config(model, 1)?;
    }
    if let Some(&zero) = batch_sizes.iter().find(|&&b| b == 0) {
        return Err(AnalyzeError::Usage(format!(
            "--batch-size {zero}: expected at least 1"
        )));
    }
    let device = crate::util::device::select(device_spec)?;
    let data_config = crate::data::DataConfig {
        dir: data_dir.map(|d| d.to_path_buf()),
        ..Default::default()
    };
    let start = Instant::now();
    let data = Datasets::load(&data_config, 0, &device)?;
    let load_secs = start.elapsed().as_secs_f64();
    let threads = crate::util::device::cpu_threads();
    tracing::info!(threads, load_secs, "data ready; measuring");
    let mut results = Vec::new();
    for model in models {
        for &batch_size in batch_sizes {
            let figures = measure(model, batch_size, steps, &data, &device)?;
            tracing::info!(
                model = %figures.model,
                batch_size,
                train_images_per_s = figures.train_images_per_s.round(),
                eval_images_per_s = figures.eval_images_per_s.round(),
                allocations_per_step = figures.allocations_per_step.round(),
                "measured"
            );
            results.push(figures);
        }
    }
    let mut epoch_runs = Vec::new();
    if let Some(exe) = epoch_runs_with {
        for model in models {
            let run = one_epoch_run(exe, model, data_dir, device_spec)?;
            tracing::info!(model = %run.model, wall_secs = run.wall_secs, peak_rss_mb = run.peak_rss_mb, "one-epoch run");
            epoch_runs.push(run);
        }
    }
    Ok(Report {
        threads,
        device: crate::util::device::describe(&device),
        load_secs,
        steps,
        results,
        epoch_runs,
    })
}

impl Report {
    /// A markdown table of the figures.
    pub fn table(&self) -> String {
        let mut out = format!(
            "device {}, {} threads, dataset load and prepare {:.2} s\n\n\
             | model | batch | train images/s | eval images/s (batch {EVAL_BATCH}) | allocations per step |\n|---|---|---|---|---|\n",
            self.device, self.threads, self.load_secs
        );
        for r in &self.results {
            out += &format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} |\n",
                r.model,
                r.batch_size,
                r.train_images_per_s,
                r.eval_images_per_s,
                r.allocations_per_step
            );
        }
        if !self.epoch_runs.is_empty() {
            out += "\n| one-epoch run (batch 64) | wall s | peak RSS MiB |\n|---|---|---|\n";
            for r in &self.epoch_runs {
                let rss = r
                    .peak_rss_mb
                    .map_or("n/a".to_string(), |m| format!("{m:.0}"));
                out += &format!("| {} | {:.1} | {rss} |\n", r.model, r.wall_secs);
            }
        }
        out
    }

    pub fn write_json(&self, path: &std::path::Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(FileError::on("create", dir))?;
        }
        let json = serde_json::to_vec_pretty(self).expect("a bench report serialises");
        write_atomic(path, &json)?;
        Ok(())
    }
}
