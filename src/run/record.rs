//! What a run records as it goes: the summary, the epoch history, and the
//! [`Recorder`]s that keep the run directory's files current. Each recorder hears
//! about every epoch's end through one small interface, so a new output (or a
//! policy such as resuming) is a new recorder, not an edit of the training loop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::Device;

use crate::config::Config;
use crate::data::Datasets;
use crate::model::checkpoint;
use crate::run::metrics::{EpochMetrics, read_metrics, round};
use crate::run::owner::OwnerLock;
use crate::run::resume::{self, SavedState};
use crate::run::rundir::{self, RunDir, Status, Summary};
use crate::run::{RunError, plots};
use crate::train::{Score, TrainError, Trainer};
use crate::util::interrupt::{self, AbortHook};
use crate::util::telemetry::EventCapture;
use crate::util::tensorboard::{self, Scalar, Session};
use crate::util::{device, system};

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
    config: String,
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
    latest: Arc<Mutex<Summary>>,
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
    fn new(summary: &Summary, history: &[EpochMetrics]) -> TensorBoard {
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

/// A run in progress: its directory, summary, history and recorders.
pub struct RunRecord {
    pub run: RunDir,
    pub summary: Summary,
    history: Vec<EpochMetrics>,
    recorders: Vec<Box<dyn Recorder>>,
    /// Epochs whose files were all written.
    recorded: usize,
    /// `optimizer.lr`, which a divergence error says to lower.
    peak_lr: f64,
    /// Wall time of the run's earlier sessions (before a resume).
    earlier_wall_secs: f64,
    /// When this session started recording, for the wall time after each epoch.
    session_start: std::time::Instant,
    /// The summary as last written, for the abort hook to mark `interrupted`.
    written: Arc<Mutex<Summary>>,
    /// The summary after the last epoch whose files were all written: what a
    /// run that fails mid-epoch (a full disk) reports.
    recorded_summary: Summary,
    _abort: AbortHook,
    /// Held for as long as the run trains: one process per run.
    _owner: OwnerLock,
}

impl RunRecord {
    /// Creates the run directory's first files (config, a `running` summary, an
    /// empty metrics.csv) and starts capturing the run's events.
    pub fn start(
        run: RunDir,
        owner: OwnerLock,
        config: &Config,
        trainer: &Trainer,
        data: &Datasets,
        device: &Device,
    ) -> Result<RunRecord, RunError> {
        let capture = EventCapture::start();
        let mut summary = initial_summary(config, trainer, device);
        summary.data_dir = Some(std::path::absolute(&data.dir).unwrap_or(data.dir.clone()));
        summary.data_sha256 = data.sha256.clone();
        tracing::info!(
            run_dir = %run.path.display(),
            model = %config.model.kind,
            batch_norm = config.model.batch_norm,
            params = summary.params,
            device = %summary.device,
            threads = device::cpu_threads(),
            "run started"
        );
        let events = Events {
            earlier: Vec::new(),
            capture,
        };
        Self::open(run, owner, config, summary, Vec::new(), events)
    }

    /// Continues a run from its saved training state: the summary says `running`
    /// again (and when it was resumed), metrics.csv is rebuilt from the state's
    /// history, and new events follow the earlier ones.
    pub fn resume(
        run: RunDir,
        owner: OwnerLock,
        config: &Config,
        mut summary: Summary,
        state: &SavedState,
    ) -> Result<RunRecord, RunError> {
        let events_path = run.file(rundir::EVENTS_FILE);
        let earlier = std::fs::read(&events_path).unwrap_or_default();
        let events = Events {
            earlier,
            capture: EventCapture::start(),
        };
        summary.status = Status::Running;
        summary.error = None;
        (summary.test_loss, summary.test_acc) = (None, None);
        summary.epochs = config.train.epochs;
        summary.epochs_completed = state.epoch;
        (summary.best_epoch, summary.best_val_acc) = (state.best_epoch, state.best_val_acc);
        summary.resumed_at.push(system::now_rfc3339());
        tracing::info!(
            run_dir = %run.path.display(),
            from_epoch = state.epoch,
            epochs = config.train.epochs,
            "run resumed"
        );
        Self::open(run, owner, config, summary, state.history.clone(), events)
    }

    /// Writes the run's config, its summary and metrics.csv as they stand, and
    /// sets up the recorders.
    fn open(
        run: RunDir,
        owner: OwnerLock,
        config: &Config,
        mut summary: Summary,
        history: Vec<EpochMetrics>,
        events: Events,
    ) -> Result<RunRecord, RunError> {
        run.write_config(&config.to_toml())?;
        summary.touch();
        run.write_summary(&summary)?;
        run.write_metrics(&history)?;
        let tensorboard = TensorBoard::new(&summary, &history);
        let written = Arc::new(Mutex::new(summary.clone()));
        let abort = abort_hook(run.clone(), Arc::clone(&written));
        Ok(RunRecord {
            run,
            peak_lr: config.optimizer.lr(),
            recorded: history.len(),
            earlier_wall_secs: summary.wall_secs,
            session_start: std::time::Instant::now(),
            recorded_summary: summary.clone(),
            summary,
            history,
            recorders: vec![
                Box::new(Checkpoints),
                Box::new(TrainingState {
                    config: config.to_toml(),
                }),
                Box::new(MetricsCsv),
                Box::new(Plots),
                Box::new(SummaryJson {
                    latest: Arc::clone(&written),
                }),
                Box::new(tensorboard),
                Box::new(events),
            ],
            written,
            _abort: abort,
            _owner: owner,
        })
    }

    /// Epochs completed so far.
    pub fn epochs_done(&self) -> usize {
        self.history.len()
    }

    /// Epochs whose files were all written: what a stopped run has to keep.
    pub fn epochs_recorded(&self) -> usize {
        self.recorded
    }

    /// Logs an epoch's figures and has every recorder write its output. A
    /// diverged epoch (non-finite validation loss) stops the run unrecorded.
    pub fn epoch_end(&mut self, metrics: EpochMetrics, trainer: &Trainer) -> Result<(), RunError> {
        metrics.log(self.summary.epochs);
        if let Some(diverged) = divergence(&metrics, self.history.first(), self.peak_lr) {
            return Err(diverged.into());
        }
        if let Some(stuck) = not_learning(&self.history, &metrics, trainer.steps, self.peak_lr) {
            return Err(stuck.into());
        }
        let improved = match metrics.val_acc {
            Some(acc) => self.summary.best_val_acc.is_none_or(|best| acc > best),
            None => true,
        };
        if improved {
            self.summary.best_val_acc = metrics.val_acc;
            self.summary.best_epoch = Some(metrics.epoch);
        }
        self.summary.epochs_completed = metrics.epoch;
        let session_secs = self.session_start.elapsed().as_secs_f64();
        self.summary.wall_secs = round(self.earlier_wall_secs + session_secs, 2);
        self.summary.touch();
        self.history.push(metrics);
        let end = EpochEnd {
            run: &self.run,
            history: &self.history,
            summary: &self.summary,
            improved,
            trainer,
        };
        // Before the files: once summary.json counts this epoch, so must the hook.
        *self.written.lock().unwrap_or_else(|e| e.into_inner()) = self.summary.clone();
        for recorder in &mut self.recorders {
            recorder.epoch_end(&end)?;
        }
        self.recorded = self.history.len();
        self.recorded_summary = self.summary.clone();
        Ok(())
    }

    /// Settles the summary from how the run ended (`test`: the test-set figures,
    /// or why it stopped) and has every recorder write its last output.
    pub fn finish(
        mut self,
        test: Result<Score, RunError>,
        wall_secs: f64,
    ) -> Result<(RunDir, Summary), RunError> {
        let summary = &mut self.summary;
        summary.touch();
        summary.wall_secs = round(self.earlier_wall_secs + wall_secs, 2);
        summary.peak_rss_mb = system::peak_rss_mb();
        match test {
            Ok(test) => {
                summary.status = Status::Completed;
                summary.test_loss = Some(test.loss);
                summary.test_acc = Some(test.accuracy);
                tracing::info!(
                    test_loss = round(test.loss, 5),
                    test_acc = round(test.accuracy, 5),
                    best_epoch = summary.best_epoch,
                    wall_secs = summary.wall_secs,
                    peak_rss_mb = summary.peak_rss_mb,
                    "run completed"
                );
            }
            Err(error) => {
                // An epoch whose files were not all written (a full disk) counts
                // only if metrics.csv holds it: the summary agrees with the file.
                let metrics_path = self.run.file(rundir::METRICS_FILE);
                let rows = read_metrics(&metrics_path).map_or(self.recorded, |rows| rows.len());
                if rows < self.history.len() {
                    let recorded = &self.recorded_summary;
                    summary.epochs_completed = recorded.epochs_completed;
                    (summary.best_epoch, summary.best_val_acc) =
                        (recorded.best_epoch, recorded.best_val_acc);
                }
                summary.status = match &error {
                    _ if error.interruption().is_some() => Status::Interrupted,
                    RunError::Train(
                        TrainError::Diverged { .. } | TrainError::NotLearning { .. },
                    ) => Status::Diverged,
                    _ => Status::Failed,
                };
                summary.error = Some(error.to_string());
                let epochs_completed = summary.epochs_completed;
                match summary.status {
                    Status::Interrupted => tracing::warn!(epochs_completed, "run interrupted"),
                    _ => tracing::error!(error = %error, "run failed"),
                }
            }
        }
        *self.written.lock().unwrap_or_else(|e| e.into_inner()) = self.summary.clone();
        for recorder in &mut self.recorders {
            recorder.run_end(&self.run, &self.summary)?;
        }
        Ok((self.run, self.summary))
    }
}

/// If a second signal ends the process at once, the summary as last written is
/// marked `interrupted` (its completed epochs stay resumable).
fn abort_hook(run: RunDir, written: Arc<Mutex<Summary>>) -> AbortHook {
    interrupt::on_abort(move |signal| {
        let mut summary = interrupt::hold_until_exit(&written);
        if summary.status != Status::Running {
            return; // the run had already ended and said how
        }
        if summary.epochs_completed == 0 {
            run.remove(); // nothing worth keeping, as when the first signal stops it
            return;
        }
        summary.status = Status::Interrupted;
        summary.error = Some(format!("stopped at once by a second {signal}"));
        summary.touch();
        let _ = run.write_summary(&summary);
    })
}

/// Mean cross-entropy above ten times chance level's (ln 10 = 2.30): no
/// classifier that still learns gets there.
const DIVERGED_LOSS: f64 = 10.0 * std::f64::consts::LN_10;

/// Why an epoch's figures say training diverged, if they do: a loss that is not
/// finite, above [`DIVERGED_LOSS`], or ten times the first epoch's.
fn divergence(
    metrics: &EpochMetrics,
    first: Option<&EpochMetrics>,
    peak_lr: f64,
) -> Option<TrainError> {
    let losses = [
        (
            "training",
            Some(metrics.train_loss),
            first.map(|f| f.train_loss),
        ),
        (
            "validation",
            metrics.val_loss,
            first.and_then(|f| f.val_loss),
        ),
    ];
    // Without a validation split only the training loss is measured.
    let mut measured = losses
        .into_iter()
        .filter_map(|(what, loss, first)| Some((what, loss?, first)));
    measured.find_map(|(what, loss, first)| {
        let exploded = first.is_some_and(|first| loss > 10.0 * first);
        (!loss.is_finite() || loss > DIVERGED_LOSS || exploded).then_some(TrainError::Diverged {
            epoch: metrics.epoch,
            what,
            loss,
            lr: peak_lr,
        })
    })
}

/// Epochs after which a run still at chance accuracy is stopped, and the
/// optimiser steps it must have taken by then (so that tiny test runs of a few
/// batches are not judged).
const CHANCE_EPOCHS: usize = 3;
const CHANCE_STEPS: u64 = 500;
/// Training accuracy below this is chance level for ten classes (10%), give or take.
const CHANCE_ACCURACY: f64 = 0.2;

/// Why a run that has learned nothing is stopped: training accuracy at chance
/// level for each of its first [`CHANCE_EPOCHS`] epochs (a learning rate so high
/// the weights saturate keeps the loss finite and near ln 10, so the loss rules
/// of [`divergence`] never fire).
fn not_learning(
    earlier: &[EpochMetrics],
    metrics: &EpochMetrics,
    steps: u64,
    peak_lr: f64,
) -> Option<TrainError> {
    if metrics.epoch != CHANCE_EPOCHS || steps < CHANCE_STEPS {
        return None;
    }
    let best = (earlier.iter().chain([metrics]))
        .map(|m| m.train_acc)
        .fold(0.0, f64::max);
    (best < CHANCE_ACCURACY).then_some(TrainError::NotLearning {
        epochs: metrics.epoch,
        accuracy: best,
        lr: peak_lr,
    })
}

/// The summary a run starts with: what it is, and status `running`.
fn initial_summary(config: &Config, trainer: &Trainer, device: &Device) -> Summary {
    Summary {
        name: config.name.clone(),
        model: config.model.kind.to_string(),
        batch_norm: config.model.batch_norm,
        params: trainer.parameter_count(),
        device: device::describe(device),
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
        host: system::host_description(),
        started_at: system::now_rfc3339(),
        run_id: Some(format!("{:016x}", rand::random::<u64>())),
        status: Status::Running,
        error: None,
        hostname: None,
        pid: None,
        updated_at: None,
        data_dir: None,
        data_sha256: Default::default(),
        resumed_at: Vec::new(),
        hparams: config.hyperparameters(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, train_loss: f64, val_loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss,
            val_loss: Some(val_loss),
            lr: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn divergence_is_a_loss_not_finite_too_high_or_ten_times_the_first() {
        let first = epoch(1, 0.5, 0.4);
        assert!(divergence(&first, None, 0.5).is_none());
        assert!(divergence(&epoch(2, 0.3, 0.2), Some(&first), 0.5).is_none());
        assert!(divergence(&epoch(2, f64::NAN, 0.2), Some(&first), 0.5).is_some());
        assert!(
            divergence(&epoch(1, 30.0, 0.2), None, 0.5).is_some(),
            "above 10 ln 10"
        );
        let Some(TrainError::Diverged { what, lr, .. }) =
            divergence(&epoch(3, 0.3, 4.5), Some(&first), 0.5)
        else {
            panic!("ten times the first validation loss is divergence");
        };
        assert_eq!((what, lr), ("validation", 0.5));
    }
}
