# Sourced by check-cuda.sh and build-cuda.sh: a CUDA 13.0 toolchain from
# NVIDIA's PyPI wheels in a throw-away virtual environment, on a machine with
# no GPU and no CUDA toolkit.
#
# CUDA 13.0 because the GPU machines' driver (580) runs it: PTX from a newer nvcc
# would not load there. nvcc compiles Candle's kernels to PTX for
# CUDA_COMPUTE_CAP (default 90: H100, H200). The wheels' CUDA runtime, cuBLAS,
# cuRAND and NVRTC are what the binary links with (sonames libcudart.so.13,
# libcublas.so.13, libcurand.so.10, libnvrtc.so.13: the ones PyTorch's CUDA 13
# wheels install). The driver's libcuda is not on PyPI: link_stub_libcuda makes
# a stand-in for linking.
#
# Sets CUDA_ROOT, CUDA_PATH, PATH, CUDA_COMPUTE_CAP and cuda_venv.
# Environment: CUDA_VENV (default target/cuda-venv).

cuda_venv="${CUDA_VENV:-target/cuda-venv}"
cuda_version="13.0.*"
if [ ! -x "$cuda_venv/bin/python" ]; then
    python3 -m venv "$cuda_venv"
fi
"$cuda_venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$cuda_version" "nvidia-cuda-runtime==$cuda_version" \
    "nvidia-cuda-crt==$cuda_version" "nvidia-nvvm==$cuda_version" \
    "nvidia-cuda-cccl==$cuda_version"

cuda_root="$("$cuda_venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
if [ ! -x "$cuda_root/bin/nvcc" ]; then
    echo "no nvcc under $cuda_root after installing NVIDIA's wheels" >&2
    exit 1
fi
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# What the linker needs besides the wheels: unversioned names for their
# libraries (the wheels ship libcublas.so.13 only; the binary still records the
# soname), and the libcuda stub (make_stub_libcuda, below).
link_stub_libcuda() {
    local lib versioned
    # The libraries themselves (cuBLAS alone is ~600 MB): only a build that links needs them.
    "$cuda_venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvrtc==$cuda_version" "nvidia-cublas>=13,<14" "nvidia-curand>=10.4,<11"
    for lib in cudart cublas cublasLt curand nvrtc; do
        versioned="$(cd "$cuda_root/lib" && ls "lib$lib.so."* | grep -E "^lib$lib\.so\.[0-9]+$" | head -n 1)"
        ln -sf "$versioned" "$cuda_root/lib/lib$lib.so"
    done
}

# The libcuda stub in lib/stubs, where cudarc's build script looks: every
# driver function cudarc declares, each returning CUDA_ERROR_UNKNOWN (999)
# should it ever be loaded instead of the driver's. Made whenever this file is sourced, before
# any build: cudarc's build script lists lib/stubs for the linker only if the
# folder exists when it first runs, and Cargo keeps that answer.
make_stub_libcuda() {
    local registry driver_api stubs
    registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
    stubs="$cuda_root/lib/stubs"
    [ -f "$stubs/libcuda.so" ] && return 0
    cargo fetch --locked --quiet
    driver_api="$(ls -d "$registry"/*/cudarc-"$(cudarc_version)"/src/driver/sys/mod.rs | head -n 1)"
    mkdir -p "$stubs"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$driver_api" | sed 's/^pub unsafe fn //' | sort -u \
        | sed 's/.*/int &(void) { return 999; }/' >"$stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
}

# The cudarc version Cargo.lock pins.
cudarc_version() {
    awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock
}

make_stub_libcuda
