//! What a run records as it goes: the summary, the epoch history, and the
//! [`Recorder`]s (see [`crate::run::recorders`]) that keep the run directory's
//! files current, in turn after every epoch and once at the end.

use std::sync::{Arc, Mutex};

use candle_core::Device;

use crate::config::Config;
use crate::data::Datasets;
use crate::run::RunError;
use crate::run::divergence::{divergence, not_learning};
use crate::run::metrics::{EpochMetrics, read_metrics, round};
use crate::run::owner::OwnerLock;
use crate::run::recorders::{
    Checkpoints, EpochEnd, Events, MetricsCsv, Plots, Recorder, SummaryJson, TensorBoard,
    TrainingState,
};
use crate::run::resume::SavedState;
use crate::run::rundir::{self, RunDir, Status, Summary};
use crate::train::{Score, TrainError, Trainer};
use crate::util::interrupt::{self, AbortHook};
use crate::util::telemetry::EventCapture;
use crate::util::{device, system};

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
