// The batched optimizer update on CUDA: Adam/AdamW and SGD over one flat buffer, with the
// inverse-loss-scale unscale, the non-finite skip and the EMA shadow update in the same kernel.
// Mirrors csrc/cpu/optim.cpp (same math, same found_inf protocol).
//
// No torch headers: this file exposes a small C ABI (raw pointers, sizes, scalars, a stream) that
// csrc/cuda/optim_cuda.cpp calls, so it compiles with plain `nvcc -arch=sm_90 -c`.
//
// Capturable in a CUDA graph: no host synchronisation, no allocation; everything that changes from
// step to step (step count, found_inf, inv_scale, optionally lr) is read from device memory by the
// kernels. A step over one buffer is at most four stream operations:
//   [memset found_inf, non-finite check]   (only when this call owns the check)
//   update kernel   -- one launch, grid-stride over the whole buffer; returns at once if found_inf
//   step increment  -- a tiny kernel after the update, so no block reads a half-incremented count
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // enough resident warps to saturate HBM with scalar 4-byte loads

enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const uint16_t* p, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(p[i]) << 16);
}
__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(uint16_t* p, int64_t i, float v) {
  // round to nearest even; NaN stays a quiet NaN
  const uint32_t u = __float_as_uint(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// torch's lerp: self + w * (end - self) for |w| < 0.5, else end - (end - self) * (1 - w).
__device__ __forceinline__ float lerp_f(float self, float end, float w) {
  return fabsf(w) < 0.5f ? fmaf(w, end - self, self) : fmaf(w - 1.f, end - self, end);
}

int grid_for(int64_t n) {
  static int sm_count[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  int sms = (device >= 0 && device < 64) ? sm_count[device] : 0;
  if (sms == 0) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (sms <= 0) sms = 1;
    if (device >= 0 && device < 64) sm_count[device] = sms;
  }
  const int64_t needed = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  return static_cast<int>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

// ---- non-finite check: found_inf := 1 if any grad * inv_scale is inf/NaN (benign same-value race) --
template <typename T>
__global__ void nonfinite_kernel(const T* __restrict__ g, int64_t n, const float* __restrict__ inv_scale,
                                 float* __restrict__ found_inf) {
  const float inv = inv_scale != nullptr ? *inv_scale : 1.f;
  bool bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = load_f(g, i) * inv;
    bad |= !isfinite(v);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.f;
}

__global__ void increment_steps_kernel(float* __restrict__ steps, int64_t count, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) steps[i] += 1.f;
}

// ---- Adam / AdamW ------------------------------------------------------------------------------
template <typename T>
__global__ void adam_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, int64_t n, const float* __restrict__ steps,
                            const float* __restrict__ found_inf, const float* __restrict__ inv_scale,
                            const double* __restrict__ lr_ptr, double lr_value, double beta1, double beta2, float eps,
                            double weight_decay, int decoupled, float* __restrict__ shadow, float ema_w) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  // Per-thread scalars, in double as torch computes them on the host from Python floats.
  const double lr = lr_ptr != nullptr ? *lr_ptr : lr_value;
  const double step = static_cast<double>(steps[0]) + 1.0;
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  const float neg_step_size = static_cast<float>(-(lr / bc1));
  const float bc2_sqrt = static_cast<float>(sqrt(bc2));
  const float keep = static_cast<float>(1.0 - lr * weight_decay);
  const float wd = decoupled ? 0.f : static_cast<float>(weight_decay);
  const bool decay_param = decoupled && weight_decay != 0.0;
  const float w1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2);
  const float omb2 = static_cast<float>(1.0 - beta2);
  const float inv = inv_scale != nullptr ? *inv_scale : 1.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float gi = load_f(g, i) * inv;
    float pi = load_f(p, i);
    if (decay_param) pi = __fmul_rn(pi, keep);   // param.mul_(1 - lr * wd)
    else gi = __fadd_rn(gi, __fmul_rn(wd, pi));  // grad.add(param, alpha=wd)
    const float mi = lerp_f(m[i], gi, w1);       // exp_avg.lerp_(grad, 1 - beta1)
    const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(omb2, gi), gi));
    const float denom = __fadd_rn(__fdiv_rn(sqrtf(vi), bc2_sqrt), eps);
    pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step_size, mi), denom));  // addcdiv_(m, denom, -step_size)
    m[i] = mi;
    v[i] = vi;
    store_f(p, i, pi);
    if (shadow != nullptr) shadow[i] = lerp_f(shadow[i], load_f(p, i), ema_w);
  }
}

// ---- SGD ---------------------------------------------------------------------------------------
template <typename T>
__global__ void sgd_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ buf, int64_t n,
                           const float* __restrict__ steps, const float* __restrict__ found_inf,
                           const float* __restrict__ inv_scale, const double* __restrict__ lr_ptr, double lr_value,
                           float momentum, float dampening, int nesterov, float weight_decay,
                           float* __restrict__ shadow, float ema_w) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const float neg_lr = static_cast<float>(-(lr_ptr != nullptr ? *lr_ptr : lr_value));
  const float inv = inv_scale != nullptr ? *inv_scale : 1.f;
  const bool first = steps[0] == 0.f;  // torch: the momentum buffer starts as a clone of the gradient
  const float omd = 1.f - dampening;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float gi = load_f(g, i) * inv;
    const float pi = load_f(p, i);
    gi = __fadd_rn(gi, __fmul_rn(weight_decay, pi));
    if (buf != nullptr) {
      const float bi = first ? gi : __fadd_rn(__fmul_rn(buf[i], momentum), __fmul_rn(omd, gi));
      buf[i] = bi;
      gi = nesterov ? __fadd_rn(gi, __fmul_rn(momentum, bi)) : bi;
    }
    store_f(p, i, __fadd_rn(pi, __fmul_rn(neg_lr, gi)));
    if (shadow != nullptr) shadow[i] = lerp_f(shadow[i], load_f(p, i), ema_w);
  }
}

int launch_check(const void* grad, int dtype, int64_t n, const float* inv_scale, float* found_inf,
                 cudaStream_t stream) {
  if (n <= 0) return 0;
  const int grid = grid_for(n);
  if (dtype == kBFloat16)
    nonfinite_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(grad), n, inv_scale,
                                                              found_inf);
  else
    nonfinite_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(grad), n, inv_scale, found_inf);
  return static_cast<int>(cudaGetLastError());
}

int prologue(const void* grad, int dtype, int64_t n, const float* inv_scale, float* found_inf, int check_nonfinite,
             cudaStream_t stream) {
  if (!check_nonfinite) return 0;
  cudaError_t err = cudaMemsetAsync(found_inf, 0, sizeof(float), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  return launch_check(grad, dtype, n, inv_scale, found_inf, stream);
}

int epilogue(float* steps, int64_t steps_count, const float* found_inf, cudaStream_t stream) {
  increment_steps_kernel<<<1, 128, 0, stream>>>(steps, steps_count, found_inf);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

// found_inf := 1 if any grad * inv_scale (inv_scale may be null) is non-finite; unchanged otherwise.
int fastgan_optim_nonfinite_check(const void* grad, int dtype, int64_t n, const float* inv_scale, float* found_inf,
                                  cudaStream_t stream) {
  return launch_check(grad, dtype, n, inv_scale, found_inf, stream);
}

// One Adam/AdamW step over n elements (param/grad: dtype 0 = float32, 1 = bfloat16; state float32).
// check_nonfinite: zero found_inf and check this buffer first; otherwise found_inf was set by
// fastgan_optim_nonfinite_check over every buffer of the step. steps[0] is the count before this
// step; all steps_count entries are incremented unless the step is skipped. lr_ptr (device) overrides lr.
int fastgan_optim_adam(void* param, const void* grad, int dtype, float* exp_avg, float* exp_avg_sq, int64_t n,
                       float* steps, int64_t steps_count, float* found_inf, int check_nonfinite,
                       const float* inv_scale, const double* lr_ptr, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int decoupled, float* ema_shadow, double ema_beta, cudaStream_t stream) {
  int err = prologue(grad, dtype, n, inv_scale, found_inf, check_nonfinite, stream);
  if (err != 0) return err;
  if (n > 0) {
    const int grid = grid_for(n);
    const float ema_w = static_cast<float>(1.0 - ema_beta);
    if (dtype == kBFloat16)
      adam_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<uint16_t*>(param), static_cast<const uint16_t*>(grad), exp_avg, exp_avg_sq, n, steps, found_inf,
          inv_scale, lr_ptr, lr, beta1, beta2, static_cast<float>(eps), weight_decay, decoupled, ema_shadow, ema_w);
    else
      adam_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<float*>(param), static_cast<const float*>(grad), exp_avg, exp_avg_sq, n, steps, found_inf,
          inv_scale, lr_ptr, lr, beta1, beta2, static_cast<float>(eps), weight_decay, decoupled, ema_shadow, ema_w);
    err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
  }
  return epilogue(steps, steps_count, found_inf, stream);
}

// One SGD step (momentum_buffer may be null when momentum == 0); protocol as fastgan_optim_adam, except
// that the step counts advance only when momentum != 0.
int fastgan_optim_sgd(void* param, const void* grad, int dtype, float* momentum_buffer, int64_t n, float* steps,
                      int64_t steps_count, float* found_inf, int check_nonfinite, const float* inv_scale,
                      const double* lr_ptr, double lr, double momentum, double dampening, int nesterov,
                      double weight_decay, float* ema_shadow, double ema_beta, cudaStream_t stream) {
  int err = prologue(grad, dtype, n, inv_scale, found_inf, check_nonfinite, stream);
  if (err != 0) return err;
  if (n > 0) {
    const int grid = grid_for(n);
    const float ema_w = static_cast<float>(1.0 - ema_beta);
    float* buf = momentum != 0.0 ? momentum_buffer : nullptr;
    if (dtype == kBFloat16)
      sgd_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          static_cast<uint16_t*>(param), static_cast<const uint16_t*>(grad), buf, n, steps, found_inf, inv_scale,
          lr_ptr, lr, static_cast<float>(momentum), static_cast<float>(dampening), nesterov,
          static_cast<float>(weight_decay), ema_shadow, ema_w);
    else
      sgd_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<float*>(param), static_cast<const float*>(grad), buf, n, steps, found_inf, inv_scale, lr_ptr, lr,
          static_cast<float>(momentum), static_cast<float>(dampening), nesterov, static_cast<float>(weight_decay),
          ema_shadow, ema_w);
    err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
  }
  // SGD's counts count momentum updates: the first one copies the gradient into the buffer, so a
  // step taken while momentum is 0 must not count (torch starts the buffer when momentum comes on).
  return momentum != 0.0 ? epilogue(steps, steps_count, found_inf, stream) : 0;
}

}  // extern "C"
