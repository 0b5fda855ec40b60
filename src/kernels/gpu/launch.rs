//! What the host works out before it launches a kernel: how many blocks of
//! how many threads, and the f32 factors a kernel takes, rounded from f64 as
//! Candle's ops round them, so the GPU's update is the CPU's to the bit.

use std::fmt;

/// Threads per block of the element-wise and per-row kernels.
pub const THREADS: u32 = 256;
/// Threads of the one block `cross_entropy_loss` and of each block of
/// `channel_sums` (a power of two: their sums halve it).
pub const REDUCE_THREADS: u32 = 512;
/// The most blocks a grid's x dimension takes (CUDA's limit).
const MAX_BLOCKS: u64 = (1 << 31) - 1;

/// A launch's grid and block sizes, one-dimensional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u32,
    pub threads: u32,
}

/// A launch that cannot be made: too many items for one grid or for the u32
/// counts the kernels take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub kernel: &'static str,
    pub items: u64,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} items is more than one launch takes",
            self.kernel, self.items
        )
    }
}

impl std::error::Error for TooLarge {}

impl Geometry {
    /// One thread per item, [`THREADS`] to a block: element-wise kernels,
    /// `cross_entropy_grad` (items are rows), the tail (items are outputs).
    pub fn per_item(kernel: &'static str, items: usize) -> Result<Geometry, TooLarge> {
        let too_large = TooLarge {
            kernel,
            items: items as u64,
        };
        if items as u64 > u32::MAX as u64 {
            return Err(too_large);
        }
        let blocks = (items as u64).div_ceil(THREADS as u64).max(1);
        if blocks > MAX_BLOCKS {
            return Err(too_large);
        }
        Ok(Geometry {
            blocks: blocks as u32,
            threads: THREADS,
        })
    }

    /// One block per group (a channel), [`REDUCE_THREADS`] threads summing it.
    pub fn per_group(kernel: &'static str, groups: usize) -> Result<Geometry, TooLarge> {
        match groups as u64 {
            0 | MAX_BLOCKS.. => Err(TooLarge {
                kernel,
                items: groups as u64,
            }),
            blocks => Ok(Geometry {
                blocks: blocks as u32,
                threads: REDUCE_THREADS,
            }),
        }
    }

    /// Threads launched in all.
    pub fn threads_in_all(&self) -> u64 {
        self.blocks as u64 * self.threads as u64
    }
}

/// The outputs of the tail over `(images, channels, height, width)`: one per
/// element, or per 2x2 window with `pool` (height and width even).
pub fn tail_outputs(dims: (usize, usize, usize, usize), pool: bool) -> Option<usize> {
    let (images, channels, height, width) = dims;
    match pool {
        true if height % 2 != 0 || width % 2 != 0 => None,
        true => Some(images * channels * (height / 2) * (width / 2)),
        false => Some(images * channels * height * width),
    }
}

/// `sgd_momentum` and `sgd_step`'s factors: Candle scales by `x * f32(a)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdFactors {
    pub lr: f32,
    pub momentum: f32,
    /// 0 for none.
    pub weight_decay: f32,
}

impl SgdFactors {
    pub fn new(lr: f64, momentum: f64, weight_decay: f64) -> SgdFactors {
        SgdFactors {
            lr: lr as f32,
            momentum: momentum as f32,
            weight_decay: weight_decay as f32,
        }
    }
}

/// `adam_step`'s factors, each worked out in f64 and rounded once, as the CPU's
/// Candle ops round the scalars they are given (`src/train/optim.rs`, `adam`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamFactors {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta1`, `1 - beta2`.
    pub keep1: f32,
    pub keep2: f32,
    pub eps: f32,
    /// AdamW's `1 - lr * weight_decay`; 1 for Adam.
    pub shrink: f32,
    /// Adam's L2 factor; 0 for AdamW.
    pub l2: f32,
    /// `1 / (1 - beta^step)`.
    pub inv_c1: f32,
    pub inv_c2: f32,
}

/// An Adam or AdamW step's settings.
#[derive(Debug, Clone, Copy)]
pub struct AdamSettings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay shrinks the weights instead of joining the gradient.
    pub decoupled: bool,
    /// The step being taken, from 1.
    pub step: u64,
}

impl AdamFactors {
    pub fn new(s: &AdamSettings) -> AdamFactors {
        let decays = s.weight_decay > 0.0;
        AdamFactors {
            lr: s.lr as f32,
            beta1: s.beta1 as f32,
            beta2: s.beta2 as f32,
            keep1: (1.0 - s.beta1) as f32,
            keep2: (1.0 - s.beta2) as f32,
            eps: s.eps as f32,
            shrink: match decays && s.decoupled {
                true => (1.0 - s.lr * s.weight_decay) as f32,
                false => 1.0,
            },
            l2: match decays && !s.decoupled {
                true => s.weight_decay as f32,
                false => 0.0,
            },
            inv_c1: (1.0 / (1.0 - s.beta1.powi(s.step as i32))) as f32,
            inv_c2: (1.0 / (1.0 - s.beta2.powi(s.step as i32))) as f32,
        }
    }

    /// `adam_step` on one element, in the kernel's order of rounding: what
    /// the tests hold against the CPU's update.
    pub fn apply(&self, param: f32, grad: f32, moments: Option<(f32, f32)>) -> (f32, f32, f32) {
        let scale = |x: f32, a: f32| x * a + 0.0;
        let mut p = param;
        let mut g = grad;
        if self.shrink != 1.0 {
            p = scale(p, self.shrink);
        }
        if self.l2 > 0.0 {
            g += scale(p, self.l2);
        }
        let (mut m, mut v) = (scale(g, self.keep1), scale(g * g, self.keep2));
        if let Some((first, second)) = moments {
            m += scale(first, self.beta1);
            v += scale(second, self.beta2);
        }
        let denominator = scale(v, self.inv_c2).sqrt() * 1.0 + self.eps;
        let update = scale(m, self.inv_c1) / denominator;
        (p - scale(update, self.lr), m, v)
    }
}

#[cfg(test)]
mod tests;
