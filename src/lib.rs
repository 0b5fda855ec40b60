//! mnist-lab: train MNIST classifiers (LeNet5, CustomMLP) with Candle from TOML
//! configs, writing each run to a directory of metrics, checkpoints and plots.
//!
//! The map, lowest layer first; a module uses only its own layer and those
//! below it (`tests/layers.rs` checks it):
//!
//! - [`util`]: shared pieces: atomic files, devices, signals, tables, plots,
//!   progress bars, logging, TensorBoard event files, the allocation count.
//! - [`data`]: the `[data]` config; MNIST found or downloaded, read, split,
//!   prepared as tensors, augmented.
//! - [`kernels`]: the fast CPU ops, each with its own backward pass, as Candle
//!   custom ops; the threads that train a batch as two halves.
//! - [`model`]: the `[model]` config and the list of model kinds; the networks,
//!   their layers, checkpoints.
//! - [`train`]: the `[train]`, `[optimizer]` and `[schedule]` configs; the
//!   trainer (one epoch, one step, evaluation), optimisers, schedules, the
//!   moving average of the weights.
//! - [`config`]: the whole config file: loading, `--set` overrides, validation,
//!   the `[sweep]` grid.
//! - [`run`]: one run into a run directory, its recorders, its training state
//!   and resumption, and sweeps.
//! - [`analyze`]: runs read back, grouped over seeds, compared, evaluated, used
//!   to predict, reported (with the seeds and the ablation); throughput benchmarks.
//! - [`cli`]: the command line.

pub mod analyze;
pub mod cli;
pub mod config;
pub mod data;
pub mod kernels;
pub mod model;
pub mod run;
pub mod train;
pub mod util;
