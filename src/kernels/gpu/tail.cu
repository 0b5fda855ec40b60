// A hidden layer's tail after its product z = conv(x) or x . w^T + b: a
// per-channel scale and shift (BatchNorm folded, or none: 1 and 0), the CPU's
// tanh, and for LeNet5's convolutions a 2x2 max-pool, forward and backward;
// and the per-channel sums BatchNorm needs. The CPU twins are
// src/kernels/block.rs and pool.rs. Layout NCHW; a fully connected layer is
// h = w = 1 with no pool.
#include "common.cuh"

// y = pool(tanh(z * scale[c] + shift[c])), one pooled output per thread, and
// which of the window's four (row-major) held the maximum: the first, on ties,
// as the CPU's scan with `>` finds it. Without `pool`, y = tanh(...) per
// element and `argmax` is not written.
extern "C" __global__ void affine_tanh_pool(const float *z, const float *scale, const float *shift,
                                            float *y, unsigned char *argmax, unsigned int images,
                                            unsigned int channels, unsigned int height,
                                            unsigned int width, int pool) {
    unsigned int out_h = pool ? height / 2 : height, out_w = pool ? width / 2 : width;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t len = (size_t)images * channels * out_h * out_w;
    if (i >= len) return;
    unsigned int c = (unsigned int)((i / ((size_t)out_h * out_w)) % channels);
    float a = scale[c], b = shift[c];
    if (!pool) {
        y[i] = fast_tanh(ADD(MUL(z[i], a), b));
        return;
    }
    size_t plane = i / ((size_t)out_h * out_w);
    unsigned int oy = (unsigned int)((i / out_w) % out_h), ox = (unsigned int)(i % out_w);
    const float *window = z + plane * height * width + (size_t)(2 * oy) * width + 2 * ox;
    float best = -INFINITY;
    unsigned char at = 0;
    for (unsigned char k = 0; k < 4; k++) {
        float t = fast_tanh(ADD(MUL(window[(k / 2) * width + (k % 2)], a), b));
        if (k == 0 || t > best) {
            best = t;
            at = k;
        }
    }
    y[i] = best;
    argmax[i] = at;
}

// The gradient at z from the gradient at y: dy * (1 - y^2) * scale[c] at the
// window's maximum, 0 at its other three (every element of dz written, one
// window per thread, no atomics).
extern "C" __global__ void affine_tanh_pool_backward(const float *dy, const float *y,
                                                     const unsigned char *argmax,
                                                     const float *scale, float *dz,
                                                     unsigned int images, unsigned int channels,
                                                     unsigned int height, unsigned int width,
                                                     int pool) {
    unsigned int out_h = pool ? height / 2 : height, out_w = pool ? width / 2 : width;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t len = (size_t)images * channels * out_h * out_w;
    if (i >= len) return;
    unsigned int c = (unsigned int)((i / ((size_t)out_h * out_w)) % channels);
    float t = y[i];
    float g = MUL(MUL(dy[i], SUB(1.0f, MUL(t, t))), scale[c]);
    if (!pool) {
        dz[i] = g;
        return;
    }
    size_t plane = i / ((size_t)out_h * out_w);
    unsigned int oy = (unsigned int)((i / out_w) % out_h), ox = (unsigned int)(i % out_w);
    float *window = dz + plane * height * width + (size_t)(2 * oy) * width + 2 * ox;
    for (unsigned char k = 0; k < 4; k++) window[(k / 2) * width + (k % 2)] = k == argmax[i] ? g : 0.0f;
}

// Per channel, the sum of `a` and the sum of `a * b` over images and
// positions (b = a: BatchNorm's sums for mean and variance; a = dz, b = z:
// the sums of its backward pass), in double, one block per channel, summed in
// a fixed order. Launch: `channels` blocks of a power-of-two thread count.
extern "C" __global__ void channel_sums(const float *a, const float *b, double *sums,
                                        double *products, unsigned int images,
                                        unsigned int channels, unsigned int plane) {
    __shared__ double partial[1024];
    unsigned int c = blockIdx.x;
    double sum = 0.0, product = 0.0;
    size_t count = (size_t)images * plane;
    for (size_t j = threadIdx.x; j < count; j += blockDim.x) {
        size_t at = ((j / plane) * channels + c) * plane + j % plane;
        double value = a[at];
        sum += value;
        product += value * (double)b[at];
    }
    sum = block_sum(sum, partial);
    if (threadIdx.x == 0) sums[c] = sum;
    __syncthreads();
    product = block_sum(product, partial);
    if (threadIdx.x == 0) products[c] = product;
}

// Per column of a (rows x columns) matrix, its sum: a fully connected layer's
// bias gradient. One thread per column, rows in order.
extern "C" __global__ void column_sums(const float *a, float *sums, unsigned int rows,
                                       unsigned int columns) {
    unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= columns) return;
    float sum = 0.0f;
    for (unsigned int r = 0; r < rows; r++) sum = ADD(sum, a[(size_t)r * columns + c]);
    sums[c] = sum;
}
