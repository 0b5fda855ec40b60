//! Small shared pieces every layer may use: atomic files, devices, signals,
//! tables, plots (lines and scatters), progress bars, logging, process facts and the allocation count.

pub mod alloc;
pub mod device;
pub mod fsio;
pub mod interrupt;
pub mod invalid;
pub mod plots;
pub mod progress;
pub mod scatter;
pub mod system;
pub mod table;
pub mod telemetry;
pub mod tensorboard;
