//! mnist-lab: train MNIST classifiers (LeNet5, CustomMLP) with Candle from TOML
//! configs, writing each run to a directory of metrics, checkpoints and plots.
//!
//! The modules follow a run from start to end: [`config`] reads the TOML,
//! [`device`] opens the device, [`data`] prepares MNIST, [`models`] builds the
//! network, [`optim`] updates it, [`train`] loops over epochs, [`experiment`]
//! ties them to a [`rundir`] with [`checkpoint`]s and [`plots`].

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod experiment;
pub mod kernels;
pub mod models;
pub mod optim;
pub mod plots;
pub mod progress;
pub mod rundir;
pub mod telemetry;
pub mod train;
