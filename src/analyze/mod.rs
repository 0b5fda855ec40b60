//! After training: reading runs back, comparing, evaluating, predicting, reporting,
//! grouping seeds, reporting searches and benchmarking.

use std::path::PathBuf;

pub mod bench;
pub mod compare;
pub mod evaluate;
pub mod inspect;
pub mod markers;
pub mod predict;
pub mod report;
pub mod search_report;
pub mod seed_report;
pub mod seeds;

/// What can go wrong when reading, evaluating or benchmarking runs.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error(transparent)]
    File(#[from] crate::util::fsio::FileError),
    #[error(transparent)]
    Plot(#[from] crate::util::plots::PlotError),
    #[error(transparent)]
    Device(#[from] crate::util::device::DeviceError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Download(#[from] crate::data::download::DownloadError),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::checkpoint::CheckpointError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    RunFile(#[from] crate::run::rundir::RunFileError),
    #[error("no such run directory: {}", .0.display())]
    NoRun(PathBuf),
    #[error("{} is not a run directory (it has no {})", .0.display(), crate::run::rundir::SUMMARY_FILE)]
    NotARun(PathBuf),
    #[error("run {} has no checkpoint {file} (a run writes it after its first epoch)", run.display())]
    NoCheckpoint { run: PathBuf, file: String },
    #[error("cannot read image {}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    #[error("no digit found in {}: the image is blank", .0.display())]
    BlankImage(PathBuf),
    #[error("no completed run of {configs} (with exactly those settings) in {}: run `just sweep` (or `mnist-lab run` on each) first", runs_dir.display())]
    NotRun { configs: String, runs_dir: PathBuf },
    #[error("{} has no config that trains a single run: nothing to report", .0.display())]
    NothingToReport(PathBuf),
    #[error("{}: {reason}", path.display())]
    Readme { path: PathBuf, reason: String },
    /// A request that can never work (unknown model, batch size 0): a usage error.
    #[error("{0}")]
    Usage(String),
    #[error("one-epoch run of {preset} failed: {reason}")]
    EpochRun { preset: String, reason: String },
    #[error(
        "{} holds {count} weights that are not finite (NaN or infinite), in {tensors}: \
         the run diverged before it was saved; it cannot classify",
        path.display()
    )]
    NonFiniteWeights {
        path: PathBuf,
        count: usize,
        tensors: String,
    },
}

impl AnalyzeError {
    /// True when the request itself was wrong, not the files or the run.
    pub fn is_usage(&self) -> bool {
        matches!(self, AnalyzeError::Usage(_) | AnalyzeError::Config(_))
    }
}

pub type Result<T, E = AnalyzeError> = std::result::Result<T, E>;
