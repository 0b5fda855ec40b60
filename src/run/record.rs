//! What a run records as it goes: the summary, the epoch history, and the
//! [`Recorder`]s that keep the run directory's files current. Each recorder hears
//! about every epoch's end through one small interface, so a new output (or a
//! policy such as resuming) is a new recorder, not an edit of the training loop.

use candle_core::Device;

use crate::config::Config;
use crate::model::checkpoint;
use crate::run::metrics::{EpochMetrics, round};
use crate::run::rundir::{self, RunDir, Status, Summary};
use crate::run::{RunError, plots};
use crate::train::{Score, TrainError, Trainer};
use crate::util::telemetry::EventCapture;
use crate::util::{device, system};

/// What recorders hear at the end of each epoch.
pub struct EpochEnd<'a> {
    pub run: &'a RunDir,
    /// Every epoch so far; the last is the one that just ended.
    pub history: &'a [EpochMetrics],
    /// The summary, already counting this epoch.
    pub summary: &'a Summary,
    /// Whether this epoch has the best validation accuracy so far.
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

/// `model.safetensors` (the best validation epoch) and `last.safetensors`.
pub struct Checkpoints;

impl Recorder for Checkpoints {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        let trainer = end.trainer;
        if end.improved {
            let best = end.run.file(rundir::BEST_CHECKPOINT);
            checkpoint::save(&trainer.varmap, trainer.steps, &best)?;
        }
        let last = end.run.file(rundir::LAST_CHECKPOINT);
        Ok(checkpoint::save(&trainer.varmap, trainer.steps, &last)?)
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

/// `summary.json`.
pub struct SummaryJson;

impl Recorder for SummaryJson {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        Ok(end.run.write_summary(end.summary)?)
    }

    fn run_end(&mut self, run: &RunDir, summary: &Summary) -> Result<(), RunError> {
        Ok(run.write_summary(summary)?)
    }
}

/// `events.jsonl`: the run's tracing events, captured since it started.
pub struct Events(pub EventCapture);

impl Recorder for Events {
    fn epoch_end(&mut self, end: &EpochEnd) -> Result<(), RunError> {
        Ok(end.run.write_events(&self.0.contents())?)
    }

    fn run_end(&mut self, run: &RunDir, _summary: &Summary) -> Result<(), RunError> {
        Ok(run.write_events(&self.0.contents())?)
    }
}

/// A run in progress: its directory, summary, history and recorders.
pub struct RunRecord {
    pub run: RunDir,
    pub summary: Summary,
    history: Vec<EpochMetrics>,
    recorders: Vec<Box<dyn Recorder>>,
}

impl RunRecord {
    /// Creates the run directory's first files (config, a `running` summary, an
    /// empty metrics.csv) and starts capturing the run's events.
    pub fn start(
        run: RunDir,
        config: &Config,
        trainer: &Trainer,
        device: &Device,
    ) -> Result<RunRecord, RunError> {
        let capture = EventCapture::start();
        let summary = initial_summary(config, trainer, device);
        tracing::info!(
            run_dir = %run.path.display(),
            model = %config.model.kind,
            batch_norm = config.model.batch_norm,
            params = summary.params,
            device = %summary.device,
            threads = device::cpu_threads(),
            "run started"
        );
        run.write_config(&config.to_toml())?;
        run.write_summary(&summary)?;
        run.write_metrics(&[])?;
        Ok(RunRecord {
            run,
            summary,
            history: Vec::with_capacity(config.train.epochs),
            recorders: vec![
                Box::new(Checkpoints),
                Box::new(MetricsCsv),
                Box::new(Plots),
                Box::new(SummaryJson),
                Box::new(Events(capture)),
            ],
        })
    }

    /// Logs an epoch's figures and has every recorder write its output. A
    /// diverged epoch (non-finite validation loss) stops the run unrecorded.
    pub fn epoch_end(&mut self, metrics: EpochMetrics, trainer: &Trainer) -> Result<(), RunError> {
        metrics.log();
        if !metrics.val_loss.is_finite() {
            let (epoch, loss) = (metrics.epoch, metrics.val_loss);
            return Err(TrainError::Diverged { epoch, loss }.into());
        }
        let improved = self
            .summary
            .best_val_acc
            .is_none_or(|best| metrics.val_acc > best);
        if improved {
            self.summary.best_val_acc = Some(metrics.val_acc);
            self.summary.best_epoch = Some(metrics.epoch);
        }
        self.summary.epochs_completed = metrics.epoch;
        self.history.push(metrics);
        let end = EpochEnd {
            run: &self.run,
            history: &self.history,
            summary: &self.summary,
            improved,
            trainer,
        };
        for recorder in &mut self.recorders {
            recorder.epoch_end(&end)?;
        }
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
        summary.wall_secs = round(wall_secs, 2);
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
                summary.status = match error.interruption() {
                    Some(_) => Status::Interrupted,
                    None => Status::Failed,
                };
                summary.error = Some(error.to_string());
                let epochs_completed = summary.epochs_completed;
                match summary.status {
                    Status::Interrupted => tracing::warn!(epochs_completed, "run interrupted"),
                    _ => tracing::error!(error = %error, "run failed"),
                }
            }
        }
        for recorder in &mut self.recorders {
            recorder.run_end(&self.run, &self.summary)?;
        }
        Ok((self.run, self.summary))
    }
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
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        status: Status::Running,
        error: None,
    }
}
