//! With the `cuda` feature: compiles the CUDA C kernels in `src/kernels/gpu/`
//! to PTX in `OUT_DIR` with `nvcc` (the one `scripts/cuda-env.sh` provides, or
//! `NVCC`), for `CUDA_COMPUTE_CAP` (default 90: H100, H200), warnings as
//! errors. Without the feature it does nothing: the CPU build needs no CUDA.

use std::path::Path;
use std::process::Command;

const KERNELS: &str = "src/kernels/gpu";

fn main() {
    println!("cargo::rerun-if-changed={KERNELS}");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().replace('.', "");
    for name in ["loss", "optim", "tail"] {
        let source = Path::new(KERNELS).join(format!("{name}.cu"));
        let ptx = Path::new(&out).join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-Werror", "all-warnings"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => panic!("{nvcc} could not compile {} ({status})", source.display()),
            Err(error) => panic!(
                "cannot run {nvcc} for {}: {error} (the cuda feature needs the CUDA \
                 toolkit; `source scripts/cuda-env.sh` provides one)",
                source.display()
            ),
        }
    }
}
