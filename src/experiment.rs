//! One experiment from config to run directory: load data, train, evaluate,
//! and keep every file of the run directory current after each epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint;
use crate::config::Config;
use crate::data::Datasets;
use crate::device;
use crate::plots;
use crate::progress;
use crate::rundir::{self, EpochMetrics, RunDir, Status, Summary};
use crate::telemetry::EventCapture;
use crate::train::{self, Score, Trainer};

/// What a run left: its directory and final summary (completed, failed or interrupted).
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub dir: PathBuf,
    pub summary: Summary,
}

impl RunOutcome {
    /// `Ok` for a completed run, else the error its summary records.
    pub fn into_result(self) -> anyhow::Result<RunOutcome> {
        match self.summary.status {
            Status::Completed => Ok(self),
            status => Err(anyhow::anyhow!(
                "run {status}: {} (run directory {})",
                self.summary.error.as_deref().unwrap_or("no error recorded"),
                self.dir.display()
            )),
        }
    }
}

/// Hands memory that earlier runs freed back to the OS, so a run that follows
/// others in one process (a sweep) starts from, and reports, its own footprint.
pub fn release_freed_memory() {
    // SAFETY: mi_collect only returns mimalloc's unused pages; it is harmless
    // where mimalloc is not the global allocator (its heaps are then empty).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Runs `config`, writing `<runs_dir>/<name>-<time>/`. Errors before training
/// (device, data) are returned and leave no run directory; once it exists, the
/// outcome is returned and its summary says whether the run `completed`, `failed`
/// (and why) or was `interrupted`.
pub fn run(config: &Config, runs_dir: &Path) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    release_freed_memory();
    rundir::reset_peak_rss();
    let device = device::select(config.device.kind)?;
    let data = Datasets::load(&config.data, config.seed, &device)?;
    tracing::info!(
        dir = %data.dir.display(),
        train = data.train.len(),
        validation = data.validation.len(),
        test = data.test.len(),
        load_secs = round(started.elapsed().as_secs_f64(), 3),
        "data ready"
    );
    let mut trainer = Trainer::new(config, data.side, &device)?;
    let run = RunDir::create(runs_dir, &config.name)?;
    let capture = EventCapture::start();
    tracing::info!(
        run_dir = %run.path.display(),
        model = %config.model.kind,
        batch_norm = config.model.batch_norm,
        params = trainer.parameter_count(),
        device = %device::describe(&device),
        threads = device::cpu_threads(),
        "run started"
    );
    run.write_config(&config.to_toml())?;
    let mut summary = Summary {
        name: config.name.clone(),
        model: config.model.kind.to_string(),
        batch_norm: config.model.batch_norm,
        params: trainer.parameter_count(),
        device: device::describe(&device),
        seed: config.seed,
        epochs: config.train.epochs,
        epochs_completed: 0,
        best_epoch: None,
        best_val_acc: None,
        test_loss: None,
        test_acc: None,
        wall_secs: 0.0,
        peak_rss_mb: None,
        threads: Some(device::cpu_threads()),
        host: rundir::host_description(),
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        status: Status::Running,
        error: None,
    };
    run.write_summary(&summary)?;
    run.write_metrics(&[])?;

    let result = train_and_test(config, &mut trainer, &data, &run, &mut summary, &capture);
    summary.wall_secs = round(started.elapsed().as_secs_f64(), 2);
    summary.peak_rss_mb = rundir::peak_rss_mb();
    match &result {
        Ok(test) => {
            summary.status = Status::Completed;
            tracing::info!(
                test_loss = round(test.loss, 5),
                test_acc = round(test.accuracy, 5),
                best_epoch = summary.best_epoch,
                wall_secs = summary.wall_secs,
                peak_rss_mb = summary.peak_rss_mb,
                "run completed"
            );
        }
        Err(_) if train::stop_requested() => {
            summary.status = Status::Interrupted;
            summary.error = Some("interrupted by Ctrl-C".into());
            tracing::warn!(
                epochs_completed = summary.epochs_completed,
                "run interrupted"
            );
        }
        Err(error) => {
            summary.status = Status::Failed;
            summary.error = Some(format!("{error:#}"));
            tracing::error!(error = %format!("{error:#}"), "run failed");
        }
    }
    run.write_summary(&summary)?;
    run.write_events(&capture.contents())?;
    Ok(RunOutcome {
        dir: run.path.clone(),
        summary,
    })
}

/// The epochs, then the test set on the best validation epoch's weights.
fn train_and_test(
    config: &Config,
    trainer: &mut Trainer,
    data: &Datasets,
    run: &RunDir,
    summary: &mut Summary,
    capture: &EventCapture,
) -> anyhow::Result<Score> {
    let epochs = config.train.epochs;
    let mut history: Vec<EpochMetrics> = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let epoch_start = Instant::now();
        let lr = trainer.learning_rate((epoch - 1) as f64);
        let bar = progress::epoch_bar(data.train.len(), epoch, epochs);
        let train = trainer.train_epoch(&data.train, epoch - 1, |n| bar.inc(n as u64))?;
        let train_secs = epoch_start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let validation = trainer.evaluate(&data.validation)?;
        let metrics = EpochMetrics {
            epoch,
            train_loss: train.loss,
            train_acc: train.accuracy,
            val_loss: validation.loss,
            val_acc: validation.accuracy,
            lr,
            epoch_secs: epoch_start.elapsed().as_secs_f64(),
            images_per_sec: data.train.len() as f64 / train_secs,
        };
        log_epoch(&metrics);
        if !metrics.val_loss.is_finite() {
            anyhow::bail!(
                "validation loss is {} at epoch {epoch}: training diverged (try a lower optimizer.lr)",
                metrics.val_loss
            );
        }
        if summary
            .best_val_acc
            .is_none_or(|best| metrics.val_acc > best)
        {
            summary.best_val_acc = Some(metrics.val_acc);
            summary.best_epoch = Some(epoch);
            checkpoint::save(
                &trainer.varmap,
                trainer.steps,
                &run.file(rundir::BEST_CHECKPOINT),
            )?;
        }
        checkpoint::save(
            &trainer.varmap,
            trainer.steps,
            &run.file(rundir::LAST_CHECKPOINT),
        )?;
        history.push(metrics);
        summary.epochs_completed = epoch;
        run.write_metrics(&history)?;
        plots::write_run_plots(run, &config.name, &history).map_err(anyhow::Error::msg)?;
        run.write_summary(summary)?;
        run.write_events(&capture.contents())?;
    }
    // The test set is touched once, by the weights chosen on validation.
    checkpoint::load(&trainer.varmap, &run.file(rundir::BEST_CHECKPOINT))?;
    let test = trainer.evaluate(&data.test)?;
    summary.test_loss = Some(test.loss);
    summary.test_acc = Some(test.accuracy);
    Ok(test)
}

/// The per-epoch event: the fields of `metrics.csv`, rounded for reading.
fn log_epoch(m: &EpochMetrics) {
    tracing::info!(
        epoch = m.epoch,
        train_loss = round(m.train_loss, 5),
        train_acc = round(m.train_acc, 5),
        val_loss = round(m.val_loss, 5),
        val_acc = round(m.val_acc, 5),
        lr = m.lr,
        epoch_secs = round(m.epoch_secs, 3),
        images_per_sec = m.images_per_sec.round(),
        "epoch"
    );
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}
