//! mnist-lab: train MNIST classifiers (LeNet5, CustomMLP) with Candle from TOML
//! configs, writing each run to a directory of metrics, checkpoints and plots.
//!
//! The modules follow a run from start to end: [`config`] reads the TOML,
//! [`device`] opens the device, [`data`] prepares MNIST, [`models`] builds the
//! network, [`optim`] updates it, [`train`] loops over epochs, [`experiment`]
//! ties them to a [`rundir`] with [`checkpoint`]s and [`plots`].
//!
//! After training: [`sweep`] runs many configs, [`inspect`] reads runs back,
//! [`compare`] overlays them, [`evaluate`] and [`predict`] use a checkpoint, and
//! [`report`] writes the README's results. [`cli`] is the command line.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod data;
pub mod device;
pub mod evaluate;
pub mod experiment;
pub mod inspect;
pub mod kernels;
pub mod models;
pub mod optim;
pub mod plots;
pub mod predict;
pub mod progress;
pub mod report;
pub mod rundir;
pub mod sweep;
pub mod table;
pub mod telemetry;
pub mod train;
