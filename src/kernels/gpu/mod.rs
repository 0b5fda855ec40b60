//! Our CUDA kernels: CUDA C in this folder (`*.cu`, compiled to PTX by
//! `build.rs` with the `cuda` feature), launched as the `cuda_fwd` of the same
//! Candle ops whose `cpu_fwd` the CPU kernels are. Each kernel rounds where
//! its CPU twin rounds (no fused multiply-adds: `common.cuh`), so the two give
//! the same bits wherever they add in the same order.
//!
//! - `loss.cu`: softmax cross-entropy, the mean loss and the gradient.
//! - `optim.cu`: SGD's momentum buffer and step, Adam and AdamW's step.
//! - `tail.cu`: a hidden layer's per-channel scale and shift, tanh and 2x2
//!   max-pool, forward and backward; BatchNorm's per-channel sums; bias sums.
//!
//! [`launch`] holds what the host works out for a launch (grid, block, the
//! factors each kernel takes) and is tested without a GPU; `ops` (with the
//! `cuda` feature) launches.

pub mod launch;
#[cfg(feature = "cuda")]
pub(crate) mod ops;
