//! Runs: one experiment into a run directory ([`experiment`]), what it records
//! after every epoch ([`record`], through its [`recorders`]), when it stops as
//! diverged ([`divergence`]), how it continues ([`resume`]) under one owner at a
//! time ([`owner`]), the directory's files ([`rundir`], [`metrics`], [`plots`]),
//! sweeps of many runs ([`sweep`]) and searches over a space of settings
//! ([`search`]).

pub mod divergence;
pub mod experiment;
pub mod metrics;
pub mod owner;
pub mod plots;
pub mod record;
pub mod recorders;
pub mod resume;
pub mod rundir;
pub mod search;
pub mod sweep;

use crate::data::DataError;
use crate::model::checkpoint::CheckpointError;
use crate::train::TrainError;
use crate::util::device::DeviceError;
use crate::util::fsio::FileError;
use crate::util::interrupt::Signal;
use crate::util::plots::PlotError;

/// Why a run could not start, or stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error(transparent)]
    State(#[from] resume::StateError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    RunFile(#[from] rundir::RunFileError),
    #[error(transparent)]
    Owner(#[from] owner::OwnerError),
    /// A run that `resume` cannot continue, and why.
    #[error("cannot resume {}: {reason}", dir.display())]
    NotResumable {
        dir: std::path::PathBuf,
        reason: String,
    },
    /// A bug: a sweep records it as the run's failure and goes on.
    #[error("panicked: {0}")]
    Panicked(String),
}

impl RunError {
    /// A config error: the command line or a config asked for what cannot be
    /// (exit status 2, as when `run` reads a bad config).
    pub fn is_usage(&self) -> bool {
        matches!(self, RunError::Config(_))
    }

    /// The signal that stopped the run, when a signal did.
    pub fn interruption(&self) -> Option<Signal> {
        match self {
            RunError::Train(TrainError::Interrupted(signal)) => Some(*signal),
            _ => None,
        }
    }
}
