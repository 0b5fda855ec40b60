//! One experiment from config to run directory: load the data, train epoch after
//! epoch while the [`RunRecord`] keeps the directory current, then test the best
//! epoch's weights once.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{Config, Override};
use crate::data::{Datasets, download};
use crate::model::checkpoint;
use crate::run::RunError;
use crate::run::metrics::{EpochMetrics, round};
use crate::run::record::RunRecord;
use crate::run::rundir::{self, RunDir, Status, Summary};
use crate::run::{owner, resume};
use crate::train::{Score, Trainer};
use crate::util::{device, progress, system};

/// What a run left: its directory and final summary (completed, failed or interrupted).
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub dir: PathBuf,
    pub summary: Summary,
}

/// A run that ended without completing, as its summary records it.
#[derive(Debug, thiserror::Error)]
#[error("run {}: {} (run directory {})", summary.status, summary.error.as_deref().unwrap_or("no error recorded"), dir.display())]
pub struct Unfinished {
    pub dir: PathBuf,
    pub summary: Box<Summary>,
}

impl RunOutcome {
    /// `Ok` for a completed run, else the summary's account of why not.
    pub fn into_result(self) -> Result<RunOutcome, Unfinished> {
        match self.summary.status {
            Status::Completed => Ok(self),
            _ => Err(Unfinished {
                dir: self.dir,
                summary: Box::new(self.summary),
            }),
        }
    }
}

/// Runs `config`, writing `<runs_dir>/<name>-<time>/`. Errors before training
/// (device, data) are returned and leave no run directory; once it exists, the
/// outcome is returned and its summary says whether the run `completed`, `failed`
/// (and why) or was `interrupted`.
pub fn run(config: &Config, runs_dir: &Path) -> Result<RunOutcome, RunError> {
    run_telling(config, runs_dir, |_| {})
}

/// [`run`], telling `created` the run directory as soon as it exists (a sweep
/// records it, so that a sweep killed mid-run can resume that run).
pub fn run_telling(
    config: &Config,
    runs_dir: &Path,
    created: impl FnOnce(&Path),
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    crate::util::fsio::check_can_hold_dirs(runs_dir)?;
    system::release_freed_memory();
    system::reset_peak_rss();
    let device = device::select(config.device.kind)?;
    let data = load_data(config, &device, started)?;
    let mut trainer = Trainer::new(&config.train_setup(), data.side, &device)?;
    let run = RunDir::create(runs_dir, &config.name)?;
    // Claimed before the first file: no reader ever sees the run unowned.
    let owner = owner::claim(&run.path, false).inspect_err(|_| run.remove())?;
    let record = RunRecord::start(run.clone(), owner, config, &trainer, &data, &device)
        .inspect_err(|_| run.remove())?;
    created(&record.run.path);
    train_and_test(&mut trainer, &data, record, started)
}

/// How `resume` treats the run it continues.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// `--set`: keys a resumed run may change ([`resume::resumable`]).
    pub overrides: Vec<Override>,
    /// Take the run even where the file system cannot lock and its owner may
    /// still be alive.
    pub force: bool,
}

/// Continues the run in `run_dir` from its training state, in the same directory,
/// with its saved config (and the overrides: more epochs, another device), on the
/// MNIST files it trained on. It first takes the run's lock, so only one process
/// ever continues a run; a run left `running` by a lost process is taken over.
/// On the CPU it ends as the run would have ended had it never stopped.
pub fn resume(run_dir: &Path, options: &ResumeOptions) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    system::release_freed_memory();
    system::reset_peak_rss();
    let summary_path = run_dir.join(rundir::SUMMARY_FILE);
    // A run directory at all, before a lock file is made in it.
    rundir::read_summary(&summary_path)?;
    let owner = owner::claim(run_dir, options.force)?;
    // Read again now that no other process can be writing it.
    let mut summary = rundir::read_summary(&summary_path)?;
    if summary.status == Status::Running {
        tracing::warn!(
            run_dir = %run_dir.display(),
            host = summary.hostname.as_deref().unwrap_or("?"),
            pid = summary.pid,
            updated_at = summary.updated_at.as_deref().unwrap_or("?"),
            "the run says `running`, but no process holds it (the process or its machine \
             was lost): taking it over"
        );
    }
    let config = resumed_config(run_dir, &summary, &options.overrides)?;
    check_resumable(run_dir, &summary, &config)?;
    let (state, tensors) = resume::load(run_dir)?;
    resume::check_belongs(&state, run_dir, &summary, &config)?;
    let removed = resume::remove_stray_temporaries(run_dir);
    if removed > 0 {
        tracing::info!(
            removed,
            "removed temporary files of writes a kill cut short"
        );
    }
    if let Some(note) = resume::schedule_note(&config, summary.epochs, state.epoch) {
        tracing::warn!("{note}");
    }
    let device = device::select(config.device.kind)?;
    let data = load_data(&config, &device, started)?;
    warn_if_other_data(&summary, &data);
    // What it reads now is what a later resume reads.
    summary.data_dir = Some(std::path::absolute(&data.dir).unwrap_or(data.dir.clone()));
    summary.data_sha256 = data.sha256.clone();
    let mut trainer = Trainer::new(&config.train_setup(), data.side, &device)?;
    let origin = run_dir.join(resume::STATE_FILE).display().to_string();
    trainer.restore(&state.trainer, &tensors, &origin)?;
    let run = RunDir::open(run_dir);
    let record = RunRecord::resume(run, owner, &config, summary, &state)?;
    train_and_test(&mut trainer, &data, record, started)
}

/// The run's saved config with the overrides; MNIST from the folder the run
/// recorded unless `--set data.dir` names another.
fn resumed_config(
    run_dir: &Path,
    summary: &Summary,
    overrides: &[Override],
) -> Result<Config, RunError> {
    let mut config = Config::load(&run_dir.join(rundir::CONFIG_FILE), overrides)?;
    let data_dir_given = overrides.iter().any(|o| o.key == "data.dir");
    if let (Some(recorded), false) = (&summary.data_dir, data_dir_given) {
        if !download::holds(recorded, &download::all_files()) {
            return Err(RunError::NotResumable {
                dir: run_dir.to_path_buf(),
                reason: format!(
                    "it trained on the MNIST files in {}, which are no longer there; \
                     name their folder with --set data.dir=DIR",
                    recorded.display()
                ),
            });
        }
        config.data.dir = Some(recorded.clone());
    }
    Ok(config)
}

/// Warns when the files read now are not those the run trained on.
fn warn_if_other_data(summary: &Summary, data: &Datasets) {
    let recorded = &summary.data_sha256;
    let differ: Vec<&String> = (recorded.iter())
        .filter(|(stem, sha)| data.sha256.get(*stem).is_some_and(|now| now != *sha))
        .map(|(stem, _)| stem)
        .collect();
    if !differ.is_empty() {
        tracing::warn!(
            dir = %data.dir.display(),
            files = ?differ,
            "these MNIST files differ from those the run trained on (SHA-256): \
             the resumed epochs learn from other data"
        );
    }
}

/// Refuses a run that has nothing to continue, is complete at the epochs asked
/// for, or stopped early and would stop again at once.
fn check_resumable(run_dir: &Path, summary: &Summary, config: &Config) -> Result<(), RunError> {
    let refuse = |reason: String| {
        Err(RunError::NotResumable {
            dir: run_dir.to_path_buf(),
            reason,
        })
    };
    let done = summary.epochs_completed;
    if config.train.epochs < done {
        return Err(crate::config::ConfigError::Override {
            assignment: format!("train.epochs={}", config.train.epochs),
            message: format!("fewer than the {done} epochs the run completed"),
        }
        .into());
    }
    if summary.status == Status::Completed {
        if config.train.epochs <= done {
            return refuse(format!(
                "it completed all {done} epochs; add epochs with --set train.epochs={}",
                done + 10
            ));
        }
        let patience = config.train.early_stopping;
        if let Some(best) = summary.best_epoch
            && patience > 0
            && done - best >= patience
        {
            return refuse(format!(
                "it stopped early after epoch {done}: no better validation accuracy since \
                 epoch {best} (train.early_stopping = {patience}); to train on, add \
                 --set train.early_stopping=0 (or more than {})",
                done - best
            ));
        }
    }
    if !run_dir.join(resume::STATE_FILE).is_file() {
        return refuse(if done == 0 {
            format!(
                "it completed no epoch; start it afresh with `mnist-lab run {}`",
                run_dir.join(rundir::CONFIG_FILE).display()
            )
        } else {
            format!("it has no {}", resume::STATE_FILE)
        });
    }
    Ok(())
}

/// Trains the epochs the record has not completed, tests the best epoch, and
/// settles the record however that went.
fn train_and_test(
    trainer: &mut Trainer,
    data: &Datasets,
    mut record: RunRecord,
    started: Instant,
) -> Result<RunOutcome, RunError> {
    let test = train_epochs(trainer, data, &mut record)
        .and_then(|()| test_best_epoch(trainer, &record.run, data));
    let test = match test {
        // A run that completed no epoch has nothing to keep: it leaves no directory.
        Err(error) if record.epochs_recorded() == 0 => {
            record.run.remove();
            return Err(error);
        }
        test => test,
    };
    let (run, summary) = record.finish(test, started.elapsed().as_secs_f64())?;
    Ok(RunOutcome {
        dir: run.path,
        summary,
    })
}

fn load_data(
    config: &Config,
    device: &candle_core::Device,
    started: Instant,
) -> Result<Datasets, RunError> {
    let data = Datasets::load(&config.data, config.seed, device)?;
    system::release_freed_memory();
    tracing::info!(
        dir = %data.dir.display(),
        train = data.train.len(),
        validation = data.validation.as_ref().map_or(0, |v| v.len()),
        test = data.test.len(),
        load_secs = round(started.elapsed().as_secs_f64(), 3),
        "data ready"
    );
    Ok(data)
}

/// Every epoch still to do: train, validate, record; with early stopping, until
/// the validation accuracy has not improved for `train.early_stopping` epochs.
fn train_epochs(
    trainer: &mut Trainer,
    data: &Datasets,
    record: &mut RunRecord,
) -> Result<(), RunError> {
    let epochs = record.summary.epochs;
    let patience = trainer.setup().train.early_stopping;
    for epoch in record.epochs_done() + 1..=epochs {
        let metrics = train_epoch(trainer, data, epoch, epochs)?;
        record.epoch_end(metrics, trainer)?;
        let since_best = epoch - record.summary.best_epoch.unwrap_or(epoch);
        if patience > 0 && since_best >= patience {
            tracing::info!(
                epoch,
                best_epoch = record.summary.best_epoch,
                "early stop: no better validation accuracy for {patience} epochs"
            );
            break;
        }
    }
    Ok(())
}

/// One epoch of training (`epoch` counts from 1), then validation where images
/// are held out.
fn train_epoch(
    trainer: &mut Trainer,
    data: &Datasets,
    epoch: usize,
    epochs: usize,
) -> Result<EpochMetrics, RunError> {
    let epoch_start = Instant::now();
    let lr = trainer.learning_rate((epoch - 1) as f64);
    let bar = progress::epoch_bar(data.train.len(), epoch, epochs);
    let mut shown = Instant::now();
    let train = trainer.train_epoch(&data.train, epoch - 1, |n, running| {
        bar.inc(n as u64);
        // Twice a second, on a terminal only: reading the sums waits for the device.
        if !bar.is_hidden() && shown.elapsed().as_secs_f64() > 0.5 {
            shown = Instant::now();
            if let Ok(score) = running.score() {
                bar.set_message(progress::running_figures(&bar, score.loss, score.accuracy));
            }
        }
    })?;
    let train_secs = epoch_start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let validation = match &data.validation {
        Some(set) => Some(trainer.validate(set)?),
        None => None,
    };
    Ok(EpochMetrics {
        epoch,
        train_loss: train.loss,
        train_acc: train.accuracy,
        val_loss: validation.map(|v| v.loss),
        val_acc: validation.map(|v| v.accuracy),
        lr,
        epoch_secs: epoch_start.elapsed().as_secs_f64(),
        images_per_sec: data.train.len() as f64 / train_secs,
    })
}

/// The test set, touched once, by the weights of the best validation epoch
/// (the last epoch's when no images are held out).
fn test_best_epoch(trainer: &Trainer, run: &RunDir, data: &Datasets) -> Result<Score, RunError> {
    checkpoint::load(&trainer.varmap, &run.file(rundir::BEST_CHECKPOINT))?;
    Ok(trainer.evaluate(&data.test)?)
}
