//! The [`Recorder`]s that keep a run directory's files current. Each hears
//! about every epoch's end through one small interface, so a new output is a
//! new recorder, not an edit of the training loop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::model::checkpoint;
use crate::run::metrics::EpochMetrics;
use crate::run::resume;
use crate::run::rundir::{self, RunDir, Status, Summary};
use crate::run::{RunError, plots};
use crate::train::Trainer;
use crate::util::system;
use crate::util::telemetry::EventCapture;
use crate::util::tensorboard::{self, Scalar, Session};

/// What recorders hear at the end of each epoch.
pub struct EpochEnd<'a> {
    pub run: &'a RunDir,
    /// Every epoch so far; the last is the one that just ended.
    pub history: &'a [EpochMetrics],
    /// The summary, already counting this epoch.
    pub summary: &'a Summary,
    /// Whether this epoch has the best validation accuracy so far (every
    /// epoch does when no images are held out: the last is the model).
    pub improved: bool,
    pub trainer: &'a Trainer,
}

/// One output of a run, kept current as epochs end.
pub trait Recorder {
    /// Called after every epoch, in the order the recorders were added.
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError>;

    /// Called once when the run ends, however it ends.
    fn run_end(&mut self, _run: &RunDir, _summary: &Summary) -> Result<(), RunError> {
        Ok(())
    }
}

/// `model.safetensors` (the best validation epoch; the last without a
/// validation split) and `last.safetensors`.
pub struct Checkpoints;

impl Recorder for Checkpoints {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        let trainer = end.trainer;
        if end.improved {
            let best = end.run.file(rundir::BEST_CHECKPOINT);
            trainer.with_validated_weights(|varmap| {
                checkpoint::save(varmap, trainer.steps, &best)
            })??;
        }
        let last = end.run.file(rundir::LAST_CHECKPOINT);
        Ok(checkpoint::save(&trainer.varmap, trainer.steps, &last)?)
    }
}

/// `training_state.safetensors`: what `mnist-lab resume` continues from. Written
/// after the checkpoints, so a state never names a best epoch whose weights are
/// not yet on disk. It carries the run's config, so that it is never taken up
/// by another run or under an edited config.toml.
pub struct TrainingState {
    pub config: String,
}

impl Recorder for TrainingState {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        let best = (end.summary.best_epoch, end.summary.best_val_acc);
        let owner = resume::Belonging {
            config: self.config.clone(),
            run_started_at: end.summary.started_at.clone(),
            run_id: end.summary.run_id.clone(),
        };
        Ok(resume::save(
            end.run,
            end.trainer,
            end.history,
            best,
            owner,
        )?)
    }
}

/// `metrics.csv`, one row per epoch.
pub struct MetricsCsv;

impl Recorder for MetricsCsv {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        Ok(end.run.write_metrics(end.history)?)
    }
}

/// `plots/loss.png`, `plots/accuracy.png` and `plots/curves.png`.
pub struct Plots;

impl Recorder for Plots {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        Ok(plots::write_run_plots(
            end.run,
            &end.summary.name,
            end.history,
        )?)
    }
}

/// `summary.json`, written under the lock the abort hook takes, so that once a
/// second signal has marked the run `interrupted` nothing overwrites it.
pub struct SummaryJson {
    pub latest: Arc<Mutex<Summary>>,
}

impl SummaryJson {
    fn write(&self, run: &RunDir, summary: &Summary) -> Result<(), RunError> {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        *latest = summary.clone();
        Ok(run.write_summary(summary)?)
    }
}

impl Recorder for SummaryJson {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        self.write(end.run, end.summary)
    }

    fn run_end(&mut self, run: &RunDir, summary: &Summary) -> Result<(), RunError> {
        self.write(run, summary)
    }
}

/// `events.out.tfevents.<start>.<host>`: the run's curves for TensorBoard,
/// rewritten whole from the history after every epoch (so a resumed run's file
/// holds every epoch once), with the test figures added at the end.
pub struct TensorBoard {
    file: String,
    /// The run's start, Unix seconds: each epoch is placed at its end.
    start: f64,
    hparams: BTreeMap<String, serde_json::Value>,
    history: Vec<EpochMetrics>,
}

impl TensorBoard {
    pub fn new(summary: &Summary, history: &[EpochMetrics]) -> TensorBoard {
        let start =
            chrono::DateTime::parse_from_rfc3339(&summary.started_at).map_or(0, |t| t.timestamp());
        let host = summary.hostname.clone().unwrap_or_else(system::hostname);
        TensorBoard {
            file: tensorboard::file_name(start, &host),
            start: start as f64,
            hparams: summary.hparams.clone(),
            history: history.to_vec(),
        }
    }

    /// Every epoch's figures as points; the test figures too once there are some.
    fn scalars(&self, summary: Option<&Summary>) -> Vec<Scalar> {
        let mut scalars = Vec::new();
        let mut wall_time = self.start;
        let mut step = 0;
        let mut point = |tag: &str, step: usize, wall_time: f64, value: f64| {
            let (tag, step, value) = (tag.to_string(), step as i64, value as f32);
            scalars.push(Scalar {
                tag,
                step,
                wall_time,
                value,
            });
        };
        for m in &self.history {
            (wall_time, step) = (wall_time + m.epoch_secs, m.epoch);
            for (tag, value) in m.board_scalars() {
                point(tag, step, wall_time, value);
            }
        }
        if let Some((loss, accuracy)) = summary.and_then(|s| s.test_loss.zip(s.test_acc)) {
            point("test/loss", step, wall_time, loss);
            point("test/accuracy", step, wall_time, accuracy);
        }
        scalars
    }

    fn write(&self, run: &RunDir, ended: Option<&Summary>) -> Result<(), RunError> {
        let session = Session {
            start_wall_time: self.start,
            hparams: &self.hparams,
            // An interrupted run has not ended: it may resume.
            ended: ended.and_then(|s| match s.status {
                Status::Completed => Some(true),
                Status::Failed | Status::Diverged => Some(false),
                _ => None,
            }),
        };
        let path = run.file(&self.file);
        Ok(tensorboard::write_events(
            &path,
            &session,
            &self.scalars(ended),
        )?)
    }
}

impl Recorder for TensorBoard {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        self.history = end.history.to_vec();
        self.write(end.run, None)
    }

    fn run_end(&mut self, run: &RunDir, summary: &Summary) -> Result<(), RunError> {
        self.write(run, Some(summary))
    }
}

/// `events.jsonl`: the run's tracing events, captured since it started (after
/// those of its earlier sessions, when it was resumed).
pub struct Events {
    pub earlier: Vec<u8>,
    pub capture: EventCapture,
}

impl Events {
    fn write(&self, run: &RunDir) -> Result<(), RunError> {
        let mut all = self.earlier.clone();
        all.extend_from_slice(&self.capture.contents());
        Ok(run.write_events(&all)?)
    }
}

impl Recorder for Events {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        self.write(end.run)
    }

    fn run_end(&mut self, run: &RunDir, _summary: &Summary) -> Result<(), RunError> {
        self.write(run)
    }
}
