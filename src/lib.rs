//! mnist-lab: train MNIST classifiers (LeNet5, CustomMLP) with Candle from TOML
//! configs, writing each run to a directory of metrics, checkpoints and plots.

pub mod analyze;
pub mod cli;
pub mod config;
pub mod data;
pub mod model;
pub mod run;
pub mod train;
pub mod util;
