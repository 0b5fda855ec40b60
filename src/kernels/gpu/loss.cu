// Softmax cross-entropy over logits (rows x classes) and u32 labels: the mean
// loss in one block, and the gradient one row per thread. The CPU twin is
// src/kernels/loss.rs.
#include "common.cuh"

// The mean of `max + ln(sum exp(z - max)) - z[label]` over the rows, summed in
// double as the CPU does, into out[0]. A label out of range makes it NaN.
// Launch: one block of LOSS_THREADS threads (a power of two).
extern "C" __global__ void cross_entropy_loss(const float *logits, const unsigned int *labels,
                                              unsigned int rows, unsigned int classes, float *out) {
    __shared__ double partial[1024];
    double total = 0.0;
    for (unsigned int r = threadIdx.x; r < rows; r += blockDim.x) {
        const float *row = logits + (size_t)r * classes;
        unsigned int label = labels[r];
        if (label >= classes) {
            total = nan("");
            continue;
        }
        float max = -INFINITY;
        for (unsigned int k = 0; k < classes; k++) max = fmaxf(max, row[k]);
        float sum = 0.0f;
        for (unsigned int k = 0; k < classes; k++) sum = ADD(sum, expf(SUB(row[k], max)));
        total += (double)SUB(ADD(max, logf(sum)), row[label]);
    }
    double sum = block_sum(total, partial);
    if (threadIdx.x == 0) out[0] = (float)(sum / (double)rows);
}

// grad = scale * (softmax(z) - one_hot(label)), one row per thread, with
// scale = grad_loss[0] / rows read here, so the host never waits for it.
// Launch: ceil(rows / threads) blocks.
extern "C" __global__ void cross_entropy_grad(const float *logits, const unsigned int *labels,
                                              unsigned int rows, unsigned int classes,
                                              const float *grad_loss, float *grad) {
    unsigned int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float scale = DIV(grad_loss[0], (float)rows);
    const float *row = logits + (size_t)r * classes;
    float *out = grad + (size_t)r * classes;
    float max = -INFINITY;
    for (unsigned int k = 0; k < classes; k++) max = fmaxf(max, row[k]);
    float sum = 0.0f;
    for (unsigned int k = 0; k < classes; k++) {
        out[k] = expf(SUB(row[k], max));
        sum = ADD(sum, out[k]);
    }
    float factor = DIV(scale, sum);
    for (unsigned int k = 0; k < classes; k++) out[k] = MUL(out[k], factor);
    unsigned int label = labels[r];
    if (label < classes) out[label] = SUB(out[label], scale);
}
