// Shared by the kernels: rounding-exact arithmetic and the CPU's tanh.
//
// Every multiply and add goes through __fmul_rn / __fadd_rn, so nvcc cannot
// contract them into fused multiply-adds: each kernel rounds exactly where
// its CPU twin (src/kernels/*.rs) rounds, and gives the same bits.
#pragma once

#define MUL(a, b) __fmul_rn((a), (b))
#define ADD(a, b) __fadd_rn((a), (b))
#define SUB(a, b) __fsub_rn((a), (b))
#define DIV(a, b) __fdiv_rn((a), (b))

// The CPU kernels' tanh (src/kernels/activation.rs, fast_tanh): a rational
// approximation within 1e-6 of tanh, clamped where it reaches +-1.
__device__ __forceinline__ float fast_tanh(float x) {
    const float clamp = 7.905311f;
    x = fminf(fmaxf(x, -clamp), clamp);
    float x2 = MUL(x, x);
    float p = ADD(MUL(x2, -2.7607685e-16f), 2.000188e-13f);
    p = SUB(MUL(p, x2), 8.604672e-11f);
    p = ADD(MUL(p, x2), 5.122297e-8f);
    p = ADD(MUL(p, x2), 1.4857224e-5f);
    p = ADD(MUL(p, x2), 6.3726193e-4f);
    p = ADD(MUL(p, x2), 4.8935246e-3f);
    float q = ADD(MUL(x2, 1.1982584e-6f), 1.1853471e-4f);
    q = ADD(MUL(q, x2), 2.2684346e-3f);
    q = ADD(MUL(q, x2), 4.893525e-3f);
    return DIV(MUL(x, p), q);
}

// Sums `value` over the block (blockDim.x a power of two, at most 1024) into
// thread 0's return value, in a fixed order: the same inputs give the same bits.
__device__ __forceinline__ double block_sum(double value, double *shared) {
    unsigned int t = threadIdx.x;
    shared[t] = value;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) shared[t] += shared[t + half];
        __syncthreads();
    }
    return shared[0];
}
