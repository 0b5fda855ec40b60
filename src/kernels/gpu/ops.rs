//! The launches (`cuda` feature): each function is the `cuda_fwd` of a Candle
//! op whose `cpu_fwd` is a CPU kernel, taking and giving the same tensors.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::launch::{Geometry, REDUCE_THREADS, SgdFactors};

/// Each module's name and PTX.
const LOSS: (&str, &str) = (
    "mnist_lab_loss",
    include_str!(concat!(env!("OUT_DIR"), "/loss.ptx")),
);
const OPTIM: (&str, &str) = (
    "mnist_lab_optim",
    include_str!(concat!(env!("OUT_DIR"), "/optim.ptx")),
);

fn config(geometry: Geometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (geometry.blocks, 1, 1),
        block_dim: (geometry.threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous part of `storage` that `layout` covers.
fn view<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

fn geometry(result: std::result::Result<Geometry, super::launch::TooLarge>) -> Result<Geometry> {
    result.map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

/// `loss::CrossEntropy`: the mean loss of logits `(rows, classes)` against u32 labels.
pub(crate) fn cross_entropy_loss(
    zs: &CudaStorage,
    zl: &Layout,
    ys: &CudaStorage,
    yl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (rows, classes) = zl.shape().dims2()?;
    let device = zs.device().clone();
    let (z, y) = (
        view::<f32>(zs, zl, "cross-entropy")?,
        view::<u32>(ys, yl, "cross-entropy")?,
    );
    let out: CudaSlice<f32> = device.alloc_zeros(1)?;
    let function = device.get_or_load_custom_func("cross_entropy_loss", LOSS.0, LOSS.1)?;
    let (rows, classes) = (rows as u32, classes as u32);
    let mut args = function.builder();
    args.arg(&z).arg(&y).arg(&rows).arg(&classes).arg(&out);
    let one_block = Geometry {
        blocks: 1,
        threads: REDUCE_THREADS,
    };
    // SAFETY: the arguments are the kernel's, in its order and types; the
    // views hold rows x classes and rows values.
    unsafe { args.launch(config(one_block)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(())))
}

/// `loss::CrossEntropyGrad`: `scale * (softmax(z) - one_hot(y))`, `scale`
/// the loss's gradient (read on the device) over the rows.
pub(crate) fn cross_entropy_grad(
    (zs, zl): (&CudaStorage, &Layout),
    (ys, yl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (rows, classes) = zl.shape().dims2()?;
    let device = zs.device().clone();
    let (z, y) = (
        view::<f32>(zs, zl, "cross-entropy")?,
        view::<u32>(ys, yl, "cross-entropy")?,
    );
    let grad_loss = view::<f32>(gs, gl, "cross-entropy")?;
    // SAFETY: the kernel writes every value before anything reads it.
    let grad: CudaSlice<f32> = unsafe { device.alloc(rows * classes) }?;
    let launch = geometry(Geometry::per_item("cross_entropy_grad", rows))?;
    let function = device.get_or_load_custom_func("cross_entropy_grad", LOSS.0, LOSS.1)?;
    let (rows, classes) = (rows as u32, classes as u32);
    let mut args = function.builder();
    args.arg(&z)
        .arg(&y)
        .arg(&rows)
        .arg(&classes)
        .arg(&grad_loss)
        .arg(&grad);
    // SAFETY: the arguments are the kernel's; `grad` holds rows x classes values.
    unsafe { args.launch(config(launch)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(grad, device),
        zl.shape().clone(),
    ))
}

/// The momentum buffer (in place) from gradient and parameter.
pub(crate) fn sgd_momentum(
    factors: SgdFactors,
    first: bool,
    buffer: (&mut CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    param: (&CudaStorage, &Layout),
) -> Result<()> {
    let scalars = [
        Scalar::F32(factors.momentum),
        Scalar::F32(factors.weight_decay),
        Scalar::I32(first as i32),
    ];
    update_in_place("sgd_momentum", buffer, grad, param, &scalars)
}

/// The parameter (in place) from its gradient and momentum buffer (the
/// gradient again where there is no momentum: unread).
pub(crate) fn sgd_step(
    factors: SgdFactors,
    nesterov: bool,
    param: (&mut CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    buffer: (&CudaStorage, &Layout),
) -> Result<()> {
    let scalars = [
        Scalar::F32(factors.lr),
        Scalar::F32(factors.momentum),
        Scalar::F32(factors.weight_decay),
        Scalar::I32(nesterov as i32),
    ];
    update_in_place("sgd_step", param, grad, buffer, &scalars)
}

/// A kernel argument after the buffers.
enum Scalar {
    F32(f32),
    I32(i32),
}

/// Launches `kernel` of `optim.cu`, one thread per value, over a tensor it
/// updates in place and two it reads, `len` values each, then `scalars`.
fn update_in_place(
    kernel: &'static str,
    (ds, dl): (&mut CudaStorage, &Layout),
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    scalars: &[Scalar],
) -> Result<()> {
    let device = a.device().clone();
    let len = dl.shape().elem_count();
    let (a, b) = (view::<f32>(a, al, kernel)?, view::<f32>(b, bl, kernel)?);
    let Some((start, end)) = dl.contiguous_offsets() else {
        candle_core::bail!("{kernel}: expected a contiguous tensor to update");
    };
    let mut updated = ds.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    let launch = geometry(Geometry::per_item(kernel, len))?;
    let function = device.get_or_load_custom_func(kernel, OPTIM.0, OPTIM.1)?;
    let len = len as u32;
    let mut args = function.builder();
    args.arg(&mut updated).arg(&a).arg(&b).arg(&len);
    for scalar in scalars {
        match scalar {
            Scalar::F32(value) => args.arg(value),
            Scalar::I32(value) => args.arg(value),
        };
    }
    // SAFETY: the arguments are the kernel's, in its order and types (the
    // callers push the scalars); the three views hold `len` values each.
    unsafe { args.launch(config(launch)) }.w()?;
    Ok(())
}
