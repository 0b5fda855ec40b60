//! Fast CPU kernels as Candle custom ops, each with its own backward pass:
//! convolution (im2col into a blocked GEMM from the `gemm` crate, threaded over
//! images; one-channel images straight from the image with AVX-512), fully
//! connected layers with the bias inside the GEMM, a hidden
//! layer's whole tail (BatchNorm or affine, tanh, 2x2 max-pool) as one op, in
//! training a whole hidden layer (product and tail) as one op, and softmax
//! cross-entropy. Fewer, fused nodes also spare Candle's autograd a
//! zero-filled gradient buffer and an addition per node. [`run_halves`] runs
//! a batch as two halves on two threads of their own, meeting at each
//! BatchNorm to add their sums (`halves`); the training loop
//! ([`on_training_thread`]) and evaluation ([`map_on_both_threads`]) run on
//! the same two threads.
//!
//! On CUDA, [`cross_entropy`] and SGD's update run our own kernels (`gpu`:
//! CUDA C compiled to PTX, the same ops' `cuda_fwd`); [`conv2d`] and
//! [`linear`] fall back to Candle's ops off the CPU; [`activation`] and [`fused_layer`] are CPU-only and models choose
//! [`max_pool2x2`] and Candle's BatchNorm and tanh elsewhere. Where [`enabled`]
//! says no (other devices, or `MNIST_LAB_CANDLE_OPS=1` on the CPU) the models
//! take that Candle path.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, Device, Layout, Result, Tensor};
use gemm::Parallelism;

mod activation;
mod block;
mod conv;
mod fused_layer;
pub mod gpu;
mod halves;
mod linear;
mod loss;
mod narrow_rows;
mod one_channel;
mod pool;
mod simd;

use block::{Activation, Saved};
use conv::Conv2d;
use fused_layer::{FusedLayer, Product};
use linear::Linear;
use loss::CrossEntropy;

pub use activation::fast_tanh;
pub use block::Norm;
#[cfg(test)]
pub use halves::run as run_halves_with;

/// Whether these kernels run on `device`: on the CPU, unless Candle's own ops
/// were asked for there too (`MNIST_LAB_CANDLE_OPS=1` or [`use_candle_ops`]),
/// which runs the path other devices take on a machine without them, to check
/// it or to compare against.
pub fn enabled(device: &Device) -> bool {
    device.is_cpu() && !candle_ops_requested()
}

/// Whether our CUDA kernels (`gpu`) run on `device`: a CUDA device in a build
/// with the `cuda` feature, unless Candle's ops were asked for
/// (`MNIST_LAB_CANDLE_OPS=1`, the reference). So far the loss and SGD's
/// update run there; the layers take Candle's ops.
pub fn gpu_enabled(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && !candle_ops_requested()
}

const UNSET: u8 = u8::MAX;
static CANDLE_OPS: AtomicU8 = AtomicU8::new(UNSET);

/// Runs Candle's ops instead of these kernels on the CPU (`true`) or not, for the
/// rest of the process; overrides `MNIST_LAB_CANDLE_OPS`.
pub fn use_candle_ops(on: bool) {
    CANDLE_OPS.store(on as u8, Ordering::SeqCst);
}

fn candle_ops_requested() -> bool {
    match CANDLE_OPS.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("MNIST_LAB_CANDLE_OPS").is_ok_and(|v| v == "1");
            let _ =
                CANDLE_OPS.compare_exchange(UNSET, on as u8, Ordering::SeqCst, Ordering::SeqCst);
            CANDLE_OPS.load(Ordering::SeqCst) == 1
        }
        value => value == 1,
    }
}

/// The contiguous f32 data of a CPU tensor argument.
pub(crate) fn f32_data<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 tensors");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// [`f32_data`] of the tensor an in-place op writes.
pub(crate) fn f32_data_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 tensors");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// A buffer of `len` values for a result its caller writes in full before
/// anything reads it (a GEMM that does not accumulate, im2col, an element-wise
/// map). Zero-filling such buffers cost a LeNet5 training step ~8% in `memset`
/// alone. In unit tests the buffer holds NaN instead, so a value a kernel
/// forgets to write spoils the comparisons against Candle's ops.
#[allow(clippy::uninit_vec)]
fn output_buffer(len: usize) -> Vec<f32> {
    if cfg!(test) {
        return vec![f32::NAN; len];
    }
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: f32 is plain data with no invalid bit patterns, and every caller
    // writes all `len` values before reading any (see above).
    unsafe { buffer.set_len(len) };
    buffer
}

/// `dst (m x n) = [dst +] lhs (m x k) . rhs (k x n)`, each matrix given by its data
/// and (row stride, column stride), so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    let last = |(rs, cs): (usize, usize), rows: usize, cols: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        dst.len() >= last(dst_strides, m, n),
        "matmul: dst too small"
    );
    assert!(
        lhs.len() >= last(lhs_strides, m, k),
        "matmul: lhs too small"
    );
    assert!(
        rhs.len() >= last(rhs_strides, k, n),
        "matmul: rhs too small"
    );
    // SAFETY: the assertions above keep every index the strides reach in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The thread pool the kernels run on, sized like Candle's (`--threads`).
fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .thread_name(|i| format!("mnist-lab-{i}"))
            .build()
            .expect("cannot start the kernel thread pool")
    })
}

/// Runs `work` (a training step, an evaluation) on `device`: on the CPU, on the
/// kernels' thread pool, so the caller is one of its workers and parallel loops
/// inside need no hand-off to another thread and back; elsewhere on the calling
/// thread. That matters on CUDA: Candle queues each host thread's kernels on
/// that thread's own stream, with no ordering between threads, so a forward
/// pass queued from a pool thread and a loss read from the caller's would race.
pub fn install<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        pool().install(work)
    } else {
        work()
    }
}

/// Runs a training loop on `device`: on the CPU, on the thread where each
/// batch's first half runs (see [`run_halves`]), so a step starts its halves
/// without handing itself to another thread and back; elsewhere on the calling
/// thread (see [`install`] for CUDA's per-thread streams).
pub fn on_training_thread<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    if enabled(device) {
        halves::on_first_half_thread(work)
    } else {
        work()
    }
}

/// `item(0)`, ..., `item(count - 1)` in order, computed on the two halves'
/// threads (see [`run_halves`]), each taking the next item when it finishes
/// one. Evaluation runs its batches so: on the two threads that train, so a
/// run's memory holds no other threads' allocator heaps.
pub fn map_on_both_threads<T: Send>(count: usize, item: impl Fn(usize) -> T + Sync) -> Vec<T> {
    halves::map(pool().current_num_threads() < 2, count, item)
}

/// Runs `pass(0)` and `pass(1)`, the two halves of a batch, each on a thread
/// of its own, meeting at every BatchNorm to add their sums (see `halves`);
/// with one kernel thread they take turns. Call it from the training thread
/// ([`on_training_thread`]) or from outside [`install`].
pub fn run_halves<R: Send>(pass: impl Fn(usize) -> R + Sync) -> (R, R) {
    halves::run(pool().current_num_threads() < 2, pass)
}

/// Length of a parallel task over whole items of `item_len` values: enough
/// items that each task is worth handing to another thread.
fn task_len(item_len: usize) -> usize {
    const MIN_VALUES: usize = 1 << 14;
    item_len.max(1) * MIN_VALUES.div_ceil(item_len.max(1))
}

fn threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// `conv2d(x, w) + b` (valid, stride 1), with the fast kernel on the CPU.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if enabled(x.device()) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d)
    } else {
        x.conv2d(w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }
}

/// `x . w^T + b` for x `(n, in)`, w `(out, in)`, b `(out,)`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if enabled(x.device()) {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            Linear { epilogue: None },
        )
    } else {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }
}

/// `tanh((x . w^T + b) * scale + shift)` for evaluation, as one op on the CPU
/// (each block of rows finished while in cache, one hand-off to the threads);
/// the result is detached: it has no backward pass.
pub fn linear_affine_tanh(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<Tensor> {
    if !enabled(x.device()) {
        let z = x.matmul(&w.t()?)?.broadcast_add(b)?;
        return z.broadcast_mul(scale)?.broadcast_add(shift)?.tanh();
    }
    let epilogue = linear::AffineTanh {
        scale: scale.to_vec1()?,
        shift: shift.to_vec1()?,
    };
    x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &b.contiguous()?,
        &Linear {
            epilogue: Some(epilogue),
        },
    )
}

/// `dst += src` in place, for two f32 CPU tensors of one shape: the same
/// values as `dst + src` with no tensor allocated.
pub fn add_assign(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() {
        candle_core::bail!("add_assign: {:?} += {:?}", dst.shape(), src.shape());
    }
    dst.inplace_op2(&src.contiguous()?, &AddAssign)
}

struct AddAssign;

impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "mnist-lab-add-assign"
    }

    fn cpu_fwd(
        &self,
        ds: &mut CpuStorage,
        dl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let src = f32_data(ss, sl, self.name())?;
        let dst = f32_data_mut(ds, dl, self.name())?;
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        Ok(())
    }
}

/// Mean cross-entropy of `logits` `(n, classes)` against u32 `labels` `(n,)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if enabled(logits.device()) || gpu_enabled(logits.device()) {
        logits
            .contiguous()?
            .apply_op2(&labels.contiguous()?, CrossEntropy)
    } else {
        candle_nn::loss::cross_entropy(logits, labels)
    }
}

/// 2x2 max-pooling, stride 2, with Candle's ops: the path for devices without
/// the fused kernels (on the CPU, [`activation`] pools).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    // Candle's max_pool2d backward scales gradients by 1/4; max over reshaped
    // windows routes them to the maxima unscaled.
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

/// A batch's per-channel means and biased variances, and the values per
/// channel they were taken over.
pub struct BatchStats {
    pub means: Vec<f32>,
    pub vars: Vec<f32>,
    pub count: usize,
}

/// A hidden layer's tail on the CPU: per-channel normalisation, tanh, then 2x2
/// max-pooling when `pool`. With [`Norm::Batch`], `weight` and `bias` are
/// BatchNorm's and the batch's per-channel means and variances come back too;
/// with [`Norm::Affine`] they are a fixed scale and shift.
pub fn activation(
    z: &Tensor,
    norm: Norm,
    weight: &Tensor,
    bias: &Tensor,
    pool: bool,
) -> Result<(Tensor, Option<BatchStats>)> {
    if !z.device().is_cpu() {
        candle_core::bail!("the fused activation runs on the CPU only");
    }
    let saved = Arc::new(Mutex::new(Saved::default()));
    let op = Activation {
        norm,
        pool,
        saved: saved.clone(),
        meeting: None,
    };
    let y = z
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    Ok((y, batch_stats(norm, &saved)))
}

/// The batch's per-channel statistics a forward pass kept, with BatchNorm.
fn batch_stats(norm: Norm, saved: &Mutex<Saved>) -> Option<BatchStats> {
    match norm {
        Norm::Batch { .. } => {
            let saved = saved.lock().expect("activation state lock");
            Some(BatchStats {
                means: saved.means.clone(),
                vars: saved.vars.clone(),
                count: saved.count,
            })
        }
        Norm::Affine => None,
    }
}

/// A hidden layer in training, on the CPU, as one op (see `fused_layer`): its
/// product, `conv2d(x, w) + b` for a 4-d `w` or `x . w^T + b` for a 2-d one,
/// then per-channel normalisation with `tail`'s `(norm_w, norm_b)` as for
/// [`activation`] (none: the identity, for a layer without BatchNorm), tanh and
/// 2x2 max-pooling when `pool`. When this pass is one half of a batch
/// ([`run_halves`]), BatchNorm takes the whole batch's statistics, and only
/// the first half returns them (running statistics move once per batch).
pub fn fused_layer(
    x: &Tensor,
    (w, b): (&Tensor, &Tensor),
    norm: Norm,
    tail: Option<(&Tensor, &Tensor)>,
    pool: bool,
) -> Result<(Tensor, Option<BatchStats>)> {
    if !x.device().is_cpu() {
        candle_core::bail!("the fused layer runs on the CPU only");
    }
    if tail.is_none() && norm != Norm::Affine {
        candle_core::bail!("fused layer: BatchNorm needs its weight and bias");
    }
    let product = match w.rank() {
        4 => Product::Conv(w.shape().clone()),
        2 => Product::Dense(w.shape().clone()),
        rank => candle_core::bail!("fused layer: a weight of rank {rank}, expected 2 or 4"),
    };
    let per_channel = match tail {
        Some((norm_w, norm_b)) => Tensor::cat(&[b, norm_w, norm_b], 0)?,
        None => b.contiguous()?,
    };
    let saved = Arc::new(Mutex::new(Saved::default()));
    let meeting = match norm {
        Norm::Batch { .. } => halves::current(),
        Norm::Affine => None,
    };
    let keeps_stats = meeting.as_ref().is_none_or(|m| m.is_first());
    let op = FusedLayer::new(
        product,
        (norm, meeting, tail.is_none()),
        pool,
        saved.clone(),
    );
    let y = x
        .contiguous()?
        .apply_op3(&w.contiguous()?, &per_channel, op)?;
    let stats = batch_stats(norm, &saved).filter(|_| keeps_stats);
    Ok((y, stats))
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, ModuleT, Tensor};

    use super::{Norm, max_pool2x2};

    /// A layer's tail in Candle's own ops: BatchNorm (training mode) or an
    /// affine map, tanh, then max-pooling over reshaped windows.
    pub fn candle_tail(z: &Tensor, w: &Tensor, b: &Tensor, norm: Norm, pool: bool) -> Tensor {
        let c = w.elem_count();
        let shape: Vec<usize> = (0..z.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
        let normalised = match norm {
            Norm::Batch { eps } => {
                let zeros = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
                let ones = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
                let bn =
                    candle_nn::BatchNorm::new(c, zeros, ones, w.clone(), b.clone(), eps as f64)
                        .unwrap();
                bn.forward_t(z, true).unwrap()
            }
            Norm::Affine => z
                .broadcast_mul(&w.reshape(shape.clone()).unwrap())
                .unwrap()
                .broadcast_add(&b.reshape(shape).unwrap())
                .unwrap(),
        };
        let y = normalised.tanh().unwrap();
        if !pool {
            return y;
        }
        // The fallback path other devices use.
        max_pool2x2(&y.to_device(&Device::Cpu).unwrap()).unwrap()
    }

    /// Makes sure the kernels, not Candle's ops, are what a test exercises,
    /// whatever `MNIST_LAB_CANDLE_OPS` says (no unit test asks for Candle's ops).
    pub fn on_the_kernel_path() {
        super::use_candle_ops(false);
        assert!(
            super::enabled(&Device::Cpu),
            "the kernel path is the one under test"
        );
    }

    pub fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
