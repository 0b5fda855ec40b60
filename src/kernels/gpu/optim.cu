// Optimiser updates in place, one element per thread, in the CPU's order of
// rounding (src/train/optim.rs and optim/in_place.rs): `x * a + 0.0` is how
// Candle's affine op scales, so each scaling adds 0.0 as well.
#include "common.cuh"

#define SCALE(x, a) ADD(MUL((x), (a)), 0.0f)

__device__ __forceinline__ float decayed(float grad, float param, float weight_decay) {
    return weight_decay > 0.0f ? ADD(grad, SCALE(param, weight_decay)) : grad;
}

// SGD's momentum buffer: `buffer * momentum + g`, or `g` at the first step,
// with g the gradient plus L2.
extern "C" __global__ void sgd_momentum(float *buffer, const float *grad, const float *param,
                                        unsigned int len, float momentum, float weight_decay,
                                        int first) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float g = decayed(grad[i], param[i], weight_decay);
    buffer[i] = first ? g : ADD(SCALE(buffer[i], momentum), g);
}

// SGD's step: `param -= lr * step`, the step being g (no momentum), the
// buffer, or `g + momentum * buffer` (Nesterov).
extern "C" __global__ void sgd_step(float *param, const float *grad, const float *buffer,
                                    unsigned int len, float lr, float momentum,
                                    float weight_decay, int nesterov) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float p = param[i];
    float g = decayed(grad[i], p, weight_decay);
    float step = momentum > 0.0f ? (nesterov ? ADD(g, SCALE(buffer[i], momentum)) : buffer[i]) : g;
    param[i] = SUB(p, SCALE(step, lr));
}

// Adam and AdamW in one pass over parameter, gradient and both moments. The
// host works out each factor in f64 and rounds it to f32, as Candle's affine
// op does: `keep1 = 1 - beta1`, `keep2 = 1 - beta2`, `shrink` AdamW's
// `1 - lr * weight_decay` (1 for Adam), `l2` Adam's L2 factor (0 for AdamW),
// `inv_c1`, `inv_c2` the inverse bias corrections.
extern "C" __global__ void adam_step(float *param, const float *grad, float *first, float *second,
                                     unsigned int len, float lr, float beta1, float beta2,
                                     float keep1, float keep2, float eps, float shrink, float l2,
                                     float inv_c1, float inv_c2, int has_moments) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float p = param[i];
    float g = grad[i];
    if (shrink != 1.0f) p = SCALE(p, shrink);
    if (l2 > 0.0f) g = ADD(g, SCALE(p, l2));
    float m = SCALE(g, keep1);
    float v = SCALE(MUL(g, g), keep2);
    if (has_moments) {
        m = ADD(SCALE(first[i], beta1), m);
        v = ADD(SCALE(second[i], beta2), v);
    }
    first[i] = m;
    second[i] = v;
    float denominator = ADD(MUL(__fsqrt_rn(SCALE(v, inv_c2)), 1.0f), eps);
    float update = DIV(SCALE(m, inv_c1), denominator);
    param[i] = SUB(p, SCALE(update, lr));
}
