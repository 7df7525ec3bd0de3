// The batched optimizer update on CPU: Adam/AdamW and SGD over one flat buffer per parameter group,
// with the inverse-loss-scale unscale, the non-finite skip and the EMA shadow update in the same
// loop. The optimizer logic (param groups, flat buffers, state_dict) lives in fastgan/optim/fused.py;
// these functions only walk raw buffers. The CUDA twins are in csrc/cuda/optim.cu (C ABI, no torch)
// and csrc/cuda/optim_cuda.cpp (torch glue); the Python wrappers call the same names for both.
//
// Math: torch.optim.Adam / SGD's single-tensor path, op by op, in float (the opmath type of fp32 and
// bf16), with the bias corrections in double as torch computes them from Python floats; every
// operation is one IEEE float rounding (tests/test_optim.py checks this bit for bit against NumPy).
// torch itself is not quite that: its vectorised sqrt is off by one ulp on some inputs (measured,
// torch 2.13 CPU), so results agree with torch.optim to ~1e-7 relative per step, not bit for bit.
//
// Non-finite skip on CPU. A single pass cannot both write the update and know that no later
// gradient is non-finite, and undoing Adam exactly is impossible, so every gradient must be read
// once before the first write. We do it as "chunked check, then update" inside ONE parallel region:
// each thread checks its own slice (read-only, vectorised: see slice_nonfinite), the team meets at a
// barrier, and each thread then updates the same slice (no
// second thread fork/join). When one step spans several buffers the whole step must be skipped, so
// Python runs optim_nonfinite_check over all of them first and the updates only read found_inf.
//
// Where the time goes (fp32, 4.86 M parameters = 19.4 MB per buffer, this 2-core KVM guest,
// benchmarks/bench_optim.py): the step is bound by memory traffic, not arithmetic. Per element
// the update moves 28 B (g read; param, exp_avg, exp_avg_sq read and written), the check 4 B
// more, zero_grad's fill 4 B more (or, with step(zero_grad=True), the write-back of the zeroed
// gradient lines, in the same pass), the EMA 8 B more (shadow read and written): 36 B a step, 44 B
// with EMA, against torch's fused Adam's 28 B and 40 B with its separate lerp (12 B: shadow read
// and written, param read). Measured (2 threads, p10 of many rounds): update 1.3-1.45 ms, check
// 0.22-0.27 ms, fill 0.20 ms. Arithmetic is only visible in cache-resident buffers (0.5 M
// parameters): ~0.38 ns per element and thread, set by the FP divider (one sqrt and one division
// per element; the second division of torch's formula is replaced by an exact multiply, see
// sqrt_div). What makes fastgan's 36 B cheaper than torch's 28 B at 5 M and beyond is the page
// size (optim_flat_buffer: 1.3-1.45x on the same kernel) and one pass instead of one per tensor.
//
// Threads: the loops run on an OpenMP team sized by at::get_num_threads(). torch's wheel ships its
// own libgomp and this module links that same runtime (see ldd), so our team is torch's team and
// the two do not fight over cores. Each thread takes one contiguous, 64-byte aligned slice; the
// inner loops are `omp simd` over restrict pointers with all branches hoisted into template
// parameters, so the compiler emits straight AVX2/AVX-512 code (sqrt and div included).
#include <torch/extension.h>
#include <ATen/Parallel.h>

// torch.optim runs each line of the update as its own op, rounding every intermediate to float; keep
// the compiler from fusing a * b + c into one FMA here so that the results match it bit for bit
// more often (this costs nothing measurable: the loop is bound by memory, not by arithmetic).
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <omp.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace fastgan {

#ifdef FASTGAN_WITH_CUDA
// csrc/cuda/optim_cuda.cpp: same signatures, CUDA tensors, current stream, no host synchronisation.
namespace cuda {
void optim_nonfinite_check(const at::Tensor& grad, const c10::optional<at::Tensor>& inv_scale,
                           const at::Tensor& found_inf);
void optim_adam_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& steps, const at::Tensor& found_inf,
                     const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& lr_tensor,
                     double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                     const c10::optional<at::Tensor>& ema_shadow, double ema_beta, bool check_nonfinite);
void optim_sgd_step(const at::Tensor& param, const at::Tensor& grad,
                    const c10::optional<at::Tensor>& momentum_buffer, const at::Tensor& steps,
                    const at::Tensor& found_inf, const c10::optional<at::Tensor>& inv_scale,
                    const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                    bool nesterov, double weight_decay, const c10::optional<at::Tensor>& ema_shadow,
                    double ema_beta, bool check_nonfinite);
}  // namespace cuda
#endif

namespace {

// ---- element access: fp32 as is, bf16 by bit manipulation (vectorises; round to nearest even) ----
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const c10::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f(c10::BFloat16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  // NaN stays a (quiet) NaN instead of rounding into the exponent field (as c10::BFloat16 does).
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// Elements below which one thread does the whole buffer (a team wake-up costs a few microseconds).
constexpr int64_t kSerialBelow = 1 << 15;

// A non-finite check to run before an update in the same parallel region (see the header comment):
// check(lo, hi) -> true if that slice has a non-finite gradient. Set by CheckedUpdate below.
struct SliceCheck {
  std::function<bool(int64_t, int64_t)> check;
  bool found = false;
};
thread_local SliceCheck* t_slice_check = nullptr;

// Run body(lo, hi, slot) over [0, n) split into one contiguous slice per thread (slot in
// [0, at::get_num_threads())), slices aligned to 16 elements (64 bytes of fp32) so each thread's
// vector loop starts on a cache line. With a pending SliceCheck each thread first checks its own
// slice, the team meets at a barrier, and the bodies run only if no slice had a non-finite value;
// a thread then updates the very slice it just read. (Updating the slice from its end, where the
// lines the check read last might still be cached, was measured slower here: each block restart
// costs the hardware prefetcher more than the few cache hits gain.)
template <typename Body>
void parallel_slices(int64_t n, const Body& body) {
  SliceCheck* pending = t_slice_check;
  t_slice_check = nullptr;  // consumed by this call only
  const int max_threads = std::max(1, at::get_num_threads());
  const int64_t want = n < kSerialBelow ? 1 : std::min<int64_t>(max_threads, (n + kSerialBelow - 1) / kSerialBelow);
  if (want <= 1 || omp_in_parallel()) {
    if (pending != nullptr && (pending->found = pending->check(0, n))) return;
    body(int64_t(0), n, 0);
    return;
  }
  std::vector<char> bad(static_cast<size_t>(want) * 64, 0);  // one cache line per thread
  bool skip_all = false;
#pragma omp parallel num_threads(static_cast<int>(want))
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t per = (n + nt - 1) / nt;
    per = (per + 15) / 16 * 16;
    const int64_t lo = std::min(n, t * per), hi = std::min(n, lo + per);
    bool skip = false;
    if (pending != nullptr) {
      if (lo < hi) bad[static_cast<size_t>(t) * 64] = pending->check(lo, hi) ? 1 : 0;
#pragma omp barrier
      for (int i = 0; i < nt; ++i) skip = skip || bad[static_cast<size_t>(i) * 64] != 0;
      if (t == 0) skip_all = skip;
    }
    if (!skip && lo < hi) body(lo, hi, t);
  }
  if (pending != nullptr) pending->found = skip_all;
}

// ---- non-finite check ------------------------------------------------------------------------
// A float is inf/NaN iff its bits without the sign are >= those of +inf, so the slice is non-finite
// iff the integer max of (bits & 0x7fffffff) reaches 0x7f800000. An integer max is a 1-cycle
// dependency per vector; the float sum of g - g used before was a 3-cycle chain, slower than L2
// can feed it (at 5 M parameters the check took ~0.25 ms of a ~3 ms step, at 0.5 M all of its
// time). With an inverse scale the unscaled value is tested (g * inv can overflow for inv > 1).
template <typename grad_t, bool kScale>
bool slice_nonfinite(const grad_t* __restrict g, int64_t lo, int64_t hi, float inv) {
  uint32_t most = 0;
#pragma omp simd reduction(max : most)
  for (int64_t i = lo; i < hi; ++i) {
    float v = load_f(g, i);
    if (kScale) v *= inv;
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    most = std::max(most, bits & 0x7FFFFFFFu);
  }
  return most >= 0x7F800000u;
}

template <typename grad_t>
bool slice_nonfinite(const grad_t* g, int64_t lo, int64_t hi, bool scale, float inv) {
  return scale ? slice_nonfinite<grad_t, true>(g, lo, hi, inv) : slice_nonfinite<grad_t, false>(g, lo, hi, inv);
}

template <typename grad_t>
bool any_nonfinite(const grad_t* g, int64_t n, bool scale, float inv) {
  // Each thread reports into its own cache line.
  const int max_threads = std::max(1, at::get_num_threads());
  std::vector<char> bad(static_cast<size_t>(max_threads) * 64, 0);
  parallel_slices(n, [&](int64_t lo, int64_t hi, int t) {
    if (slice_nonfinite(g, lo, hi, scale, inv)) bad[static_cast<size_t>(t) * 64] = 1;
  });
  for (int t = 0; t < max_threads; ++t)
    if (bad[static_cast<size_t>(t) * 64] != 0) return true;
  return false;
}

// ---- argument checks (Python validates user input; these guard the raw pointers) --------------
void check_buffer(const at::Tensor& t, const char* name, int64_t n, bool fp32_only) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got ", t.numel());
  if (fp32_only) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
                " must be float32 or bfloat16, got ", t.scalar_type());
  }
}

void check_scalar_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1 && t.is_contiguous(), name,
              " must be a one-element float32 CPU tensor");
}

float read_inv_scale(const c10::optional<at::Tensor>& inv_scale) {
  if (!inv_scale.has_value()) return 1.f;
  check_scalar_tensor(*inv_scale, "inv_scale");
  return *inv_scale->data_ptr<float>();
}

double read_lr(const c10::optional<at::Tensor>& lr_tensor, double lr) {
  if (!lr_tensor.has_value()) return lr;
  TORCH_CHECK(lr_tensor->device().is_cpu() && lr_tensor->numel() == 1, "lr tensor must be a one-element CPU tensor");
  return lr_tensor->item<double>();
}

// The found_inf protocol of a step. check_nonfinite: this call owns the check (one buffer per
// step): the next parallel_slices checks every slice, then updates unless one was non-finite, and
// found_inf := that outcome. Otherwise the caller ran optim_nonfinite_check over every buffer of
// the step first, and the update runs unless found_inf is already set.
template <typename grad_t>
struct CheckedUpdate {
  SliceCheck slice_check;
  float* flag;
  bool owns_check;

  CheckedUpdate(const grad_t* g, bool scale, float inv, const at::Tensor& found_inf, bool check_nonfinite)
      : flag(found_inf.data_ptr<float>()), owns_check(check_nonfinite) {
    if (owns_check) {
      slice_check.check = [g, scale, inv](int64_t lo, int64_t hi) {
        return slice_nonfinite(g, lo, hi, scale, inv);
      };
    }
  }
  bool skip_before() const { return !owns_check && *flag != 0.f; }
  void arm() { t_slice_check = owns_check ? &slice_check : nullptr; }
  // After the update call: whether it was skipped (and found_inf written when we own the check).
  bool skipped() {
    t_slice_check = nullptr;
    if (!owns_check) return false;
    *flag = slice_check.found ? 1.f : 0.f;
    return slice_check.found;
  }
};

void increment_steps(const at::Tensor& steps) {
  float* s = steps.data_ptr<float>();
  for (int64_t i = 0; i < steps.numel(); ++i) s[i] += 1.f;
}

// ---- Adam / AdamW ----------------------------------------------------------------------------
struct AdamScalars {
  float inv, lr_wd_keep, wd, w1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, ema_w;
  double inv_bc2_sqrt;  // 1 / bc2_sqrt (of the float bc2_sqrt) in double, see sqrt_div below
  bool w1_small, ema_small_w;
};

// torch's v.sqrt() / bc2_sqrt, exactly, without a division. The float quotient x / c equals
// float(double(x) * (1 / double(c))): with x = X 2^a, c = C 2^b (X, C 24-bit integers) the exact
// quotient lies at least 2^-49 (relative) away from every point where float rounding changes
// (|X 2^k - (2K + 1) C| >= 1 unless the quotient is a midpoint, and a quotient of two 24-bit
// numbers with 25 significant bits does not exist), while the double product is within 2^-52 of
// it; both roundings therefore agree. No under/overflow is possible in double. The FP divider is
// the bottleneck of this loop (the other division, m / denom, and the sqrt stay), so this is ~10 %
// of the arithmetic per element; the element-wise results are bit-identical to the division.
inline float sqrt_div(float v, double inv_c) {
  return static_cast<float>(static_cast<double>(std::sqrt(v)) * inv_c);
}


// torch's lerp as one FMA: coeff * (end - self) + base with (coeff, base) = (w, self) for |w| < 0.5,
// (w - 1, end) otherwise. kSmall is a template parameter: a loop-invariant bool read inside the
// loop keeps GCC from vectorising it ("no vectype" for the bool load).
template <bool kSmall>
inline float lerp_t(float self, float end, float w) {
  return kSmall ? std::fma(w, end - self, self) : std::fma(w - 1.f, end - self, end);
}

// step(zero_grad=True): the gradient is zeroed right behind the update, 4 KB at a time, while that
// chunk's lines are still in L1 from the update's read (the update's four or five streams take 16-20 KB
// of a chunk's worth, under the 32 KB L1); the lines then go back to memory once, already zero. That
// replaces zero_grad's separate fill, a second stream over the whole buffer (5 M parameters, 1 thread,
// interleaved: step + fill 3.80 ms, step with the zeroing in its pass 3.50-3.61 ms, the step alone
// 3.43-3.67 ms; 16 and 64 KB chunks measured no better). Chunks follow one another in address order,
// so the hardware prefetcher's streams are not broken.
constexpr int64_t kZeroChunkBytes = 4 << 10;

template <typename grad_t, typename Update>
void update_then_zero(grad_t* zero_g, int64_t lo, int64_t hi, const Update& update) {
  if (zero_g == nullptr) {
    update(lo, hi);
    return;
  }
  constexpr int64_t chunk = kZeroChunkBytes / static_cast<int64_t>(sizeof(grad_t));
  for (int64_t c = lo; c < hi; c += chunk) {
    const int64_t e = std::min(hi, c + chunk);
    update(c, e);
    std::memset(zero_g + c, 0, static_cast<size_t>(e - c) * sizeof(grad_t));  // +0.0 in fp32 and bf16
  }
}

template <typename param_t, bool kScale, bool kDecoupled, bool kSmallW1, int kEma>
void adam_slice(param_t* __restrict p, const param_t* __restrict g, float* __restrict m, float* __restrict v,
                float* __restrict shadow, int64_t lo, int64_t hi, const AdamScalars& s) {
  // Scalars as locals: the vectoriser wants registers, not loads from the struct.
  const float inv = s.inv, keep = s.lr_wd_keep, wd = s.wd, w1 = s.w1, beta2 = s.beta2, omb2 = s.one_minus_beta2;
  const float neg_step = s.neg_step_size, eps = s.eps, ema_w = s.ema_w;
  const double inv_bc2_sqrt = s.inv_bc2_sqrt;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    float gi = load_f(g, i);
    if (kScale) gi *= inv;
    float pi = load_f(p, i);
    if (kDecoupled) pi = pi * keep;  // param.mul_(1 - lr * wd)
    else gi = gi + wd * pi;          // grad.add(param, alpha=wd)  (wd = 0: exact no-op)
    const float mi = lerp_t<kSmallW1>(m[i], gi, w1);  // exp_avg.lerp_(grad, 1 - beta1)
    const float vi = v[i] * beta2 + omb2 * gi * gi;   // mul_(beta2).addcmul_(g, g, 1 - beta2)
    const float denom = sqrt_div(vi, inv_bc2_sqrt) + eps;  // (v.sqrt() / bc2_sqrt).add_(eps)
    pi = pi + neg_step * mi / denom;                     // addcdiv_(m, denom, -step_size)
    m[i] = mi;
    v[i] = vi;
    store_f(p, i, pi);
    // kEma: 0 none, 1 lerp weight < 0.5 (every useful beta), 2 weight >= 0.5
    if (kEma == 1) shadow[i] = lerp_t<true>(shadow[i], load_f(p, i), ema_w);
    if (kEma == 2) shadow[i] = lerp_t<false>(shadow[i], load_f(p, i), ema_w);
  }
}

template <typename param_t, bool kScale, bool kDecoupled>
void adam_dispatch_ema(param_t* p, const param_t* g, float* m, float* v, float* shadow, param_t* zero_g, int64_t n,
                       const AdamScalars& s) {
  const int ema = shadow == nullptr ? 0 : (s.ema_small_w ? 1 : 2);
  parallel_slices(n, [&](int64_t slice_lo, int64_t slice_hi, int) {
    update_then_zero(zero_g, slice_lo, slice_hi, [&](int64_t lo, int64_t hi) {
      if (s.w1_small) {
        if (ema == 0) adam_slice<param_t, kScale, kDecoupled, true, 0>(p, g, m, v, shadow, lo, hi, s);
        else if (ema == 1) adam_slice<param_t, kScale, kDecoupled, true, 1>(p, g, m, v, shadow, lo, hi, s);
        else adam_slice<param_t, kScale, kDecoupled, true, 2>(p, g, m, v, shadow, lo, hi, s);
      } else {
        if (ema == 0) adam_slice<param_t, kScale, kDecoupled, false, 0>(p, g, m, v, shadow, lo, hi, s);
        else if (ema == 1) adam_slice<param_t, kScale, kDecoupled, false, 1>(p, g, m, v, shadow, lo, hi, s);
        else adam_slice<param_t, kScale, kDecoupled, false, 2>(p, g, m, v, shadow, lo, hi, s);
      }
    });
  });
}

template <typename param_t>
void adam_run(param_t* p, const param_t* g, float* m, float* v, float* shadow, param_t* zero_g, int64_t n, bool scale,
              bool decoupled, const AdamScalars& s) {
  if (scale) {
    if (decoupled) adam_dispatch_ema<param_t, true, true>(p, g, m, v, shadow, zero_g, n, s);
    else adam_dispatch_ema<param_t, true, false>(p, g, m, v, shadow, zero_g, n, s);
  } else {
    if (decoupled) adam_dispatch_ema<param_t, false, true>(p, g, m, v, shadow, zero_g, n, s);
    else adam_dispatch_ema<param_t, false, false>(p, g, m, v, shadow, zero_g, n, s);
  }
}

void check_common(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& steps,
                  const at::Tensor& found_inf, const c10::optional<at::Tensor>& ema_shadow) {
  const int64_t n = param.numel();
  check_buffer(param, "param", n, false);
  check_buffer(grad, "grad", n, false);
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "grad dtype ", grad.scalar_type(),
              " must match param dtype ", param.scalar_type());
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kFloat && steps.is_contiguous() &&
                  steps.numel() >= 1,
              "steps must be a contiguous float32 CPU tensor with at least one element");
  check_scalar_tensor(found_inf, "found_inf");
  if (ema_shadow.has_value()) check_buffer(*ema_shadow, "ema_shadow", n, true);
}

void optim_zero(const at::Tensor& buffer);  // below, with the streaming fill

void optim_adam_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& steps, const at::Tensor& found_inf,
                     const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& lr_tensor,
                     double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                     const c10::optional<at::Tensor>& ema_shadow, double ema_beta, bool check_nonfinite,
                     bool zero_grad) {
#ifdef FASTGAN_WITH_CUDA
  if (param.is_cuda()) {
    cuda::optim_adam_step(param, grad, exp_avg, exp_avg_sq, steps, found_inf, inv_scale, lr_tensor, lr, beta1,
                          beta2, eps, weight_decay, decoupled, ema_shadow, ema_beta, check_nonfinite);
    if (zero_grad) grad.zero_();  // a memset launch on the same stream (capturable)
    return;
  }
#endif
  const int64_t n = param.numel();
  check_common(param, grad, steps, found_inf, ema_shadow);
  check_buffer(exp_avg, "exp_avg", n, true);
  check_buffer(exp_avg_sq, "exp_avg_sq", n, true);
  const float inv = read_inv_scale(inv_scale);
  const double lr_v = read_lr(lr_tensor, lr);
  at::NoGradGuard no_grad;

  const bool bf16 = param.scalar_type() == at::kBFloat16;
  if (*found_inf.data_ptr<float>() != 0.f && !check_nonfinite) {
    if (zero_grad) optim_zero(grad);
    return;
  }

  // Bias corrections as torch computes them: Python floats (double), step = count after increment.
  const double step = static_cast<double>(*steps.data_ptr<float>()) + 1.0;
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  AdamScalars s;
  s.inv = inv;
  s.lr_wd_keep = static_cast<float>(1.0 - lr_v * weight_decay);
  s.wd = decoupled ? 0.f : static_cast<float>(weight_decay);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.w1_small = std::abs(1.0 - beta1) < 0.5;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.neg_step_size = static_cast<float>(-(lr_v / bc1));
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.inv_bc2_sqrt = 1.0 / static_cast<double>(s.bc2_sqrt);
  s.eps = static_cast<float>(eps);
  s.ema_w = static_cast<float>(1.0 - ema_beta);
  s.ema_small_w = std::abs(1.0 - ema_beta) < 0.5;
  float* shadow = ema_shadow.has_value() ? ema_shadow->data_ptr<float>() : nullptr;
  const bool decoupled_active = decoupled && weight_decay != 0.0;
  bool skipped;
  if (bf16) {
    CheckedUpdate<at::BFloat16> cu(grad.data_ptr<at::BFloat16>(), inv_scale.has_value(), inv, found_inf, check_nonfinite);
    cu.arm();
    adam_run(param.data_ptr<at::BFloat16>(), grad.data_ptr<at::BFloat16>(), exp_avg.data_ptr<float>(),
             exp_avg_sq.data_ptr<float>(), shadow, zero_grad ? grad.data_ptr<at::BFloat16>() : nullptr, n,
             inv_scale.has_value(), decoupled_active, s);
    skipped = cu.skipped();
  } else {
    CheckedUpdate<float> cu(grad.data_ptr<float>(), inv_scale.has_value(), inv, found_inf, check_nonfinite);
    cu.arm();
    adam_run(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
             exp_avg_sq.data_ptr<float>(), shadow, zero_grad ? grad.data_ptr<float>() : nullptr, n,
             inv_scale.has_value(), decoupled_active, s);
    skipped = cu.skipped();
  }
  if (!skipped) increment_steps(steps);
  else if (zero_grad) optim_zero(grad);  // a skipped step still leaves the gradients zeroed
}

// ---- SGD (momentum, dampening, nesterov, weight decay) -----------------------------------------
struct SgdScalars {
  float inv, neg_lr, wd, momentum, one_minus_dampening, ema_w;
  bool ema_small_w;
};

// kMomentum: 0 = no momentum, 1 = first step (buf = grad), 2 = later steps (buf = mu * buf + (1 - d) * g).
template <typename param_t, bool kScale, int kMomentum, bool kNesterov, int kEma>
void sgd_slice(param_t* __restrict p, const param_t* __restrict g, float* __restrict buf, float* __restrict shadow,
               int64_t lo, int64_t hi, const SgdScalars& s) {
  const float inv = s.inv, wd = s.wd, mu = s.momentum, omd = s.one_minus_dampening, neg_lr = s.neg_lr;
  const float ema_w = s.ema_w;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    float gi = load_f(g, i);
    if (kScale) gi *= inv;
    const float pi = load_f(p, i);
    gi = gi + wd * pi;  // grad.add(param, alpha=wd)  (wd = 0: exact no-op)
    if (kMomentum != 0) {
      const float bi = kMomentum == 1 ? gi : buf[i] * mu + omd * gi;  // buf.mul_(mu).add_(g, alpha=1-d)
      buf[i] = bi;
      gi = kNesterov ? gi + mu * bi : bi;
    }
    store_f(p, i, pi + neg_lr * gi);  // param.add_(grad, alpha=-lr)
    if (kEma == 1) shadow[i] = lerp_t<true>(shadow[i], load_f(p, i), ema_w);
    if (kEma == 2) shadow[i] = lerp_t<false>(shadow[i], load_f(p, i), ema_w);
  }
}

template <typename param_t, bool kScale, int kMomentum, bool kNesterov>
void sgd_dispatch_ema(param_t* p, const param_t* g, float* buf, float* shadow, param_t* zero_g, int64_t n,
                      const SgdScalars& s) {
  const int ema = shadow == nullptr ? 0 : (s.ema_small_w ? 1 : 2);
  parallel_slices(n, [&](int64_t slice_lo, int64_t slice_hi, int) {
    update_then_zero(zero_g, slice_lo, slice_hi, [&](int64_t lo, int64_t hi) {
      if (ema == 0) sgd_slice<param_t, kScale, kMomentum, kNesterov, 0>(p, g, buf, shadow, lo, hi, s);
      else if (ema == 1) sgd_slice<param_t, kScale, kMomentum, kNesterov, 1>(p, g, buf, shadow, lo, hi, s);
      else sgd_slice<param_t, kScale, kMomentum, kNesterov, 2>(p, g, buf, shadow, lo, hi, s);
    });
  });
}

template <typename param_t, bool kScale>
void sgd_dispatch_momentum(param_t* p, const param_t* g, float* buf, float* shadow, param_t* zero_g, int64_t n,
                           int mode, bool nesterov, const SgdScalars& s) {
  if (mode == 0) sgd_dispatch_ema<param_t, kScale, 0, false>(p, g, buf, shadow, zero_g, n, s);
  else if (mode == 1) {
    if (nesterov) sgd_dispatch_ema<param_t, kScale, 1, true>(p, g, buf, shadow, zero_g, n, s);
    else sgd_dispatch_ema<param_t, kScale, 1, false>(p, g, buf, shadow, zero_g, n, s);
  } else {
    if (nesterov) sgd_dispatch_ema<param_t, kScale, 2, true>(p, g, buf, shadow, zero_g, n, s);
    else sgd_dispatch_ema<param_t, kScale, 2, false>(p, g, buf, shadow, zero_g, n, s);
  }
}

void optim_sgd_step(const at::Tensor& param, const at::Tensor& grad, const c10::optional<at::Tensor>& momentum_buffer,
                    const at::Tensor& steps, const at::Tensor& found_inf, const c10::optional<at::Tensor>& inv_scale,
                    const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                    bool nesterov, double weight_decay, const c10::optional<at::Tensor>& ema_shadow, double ema_beta,
                    bool check_nonfinite, bool zero_grad) {
#ifdef FASTGAN_WITH_CUDA
  if (param.is_cuda()) {
    cuda::optim_sgd_step(param, grad, momentum_buffer, steps, found_inf, inv_scale, lr_tensor, lr, momentum,
                         dampening, nesterov, weight_decay, ema_shadow, ema_beta, check_nonfinite);
    if (zero_grad) grad.zero_();
    return;
  }
#endif
  const int64_t n = param.numel();
  check_common(param, grad, steps, found_inf, ema_shadow);
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum != 0 needs a momentum_buffer");
  if (momentum_buffer.has_value()) check_buffer(*momentum_buffer, "momentum_buffer", n, true);
  const float inv = read_inv_scale(inv_scale);
  const double lr_v = read_lr(lr_tensor, lr);
  at::NoGradGuard no_grad;

  const bool bf16 = param.scalar_type() == at::kBFloat16;
  if (*found_inf.data_ptr<float>() != 0.f && !check_nonfinite) {
    if (zero_grad) optim_zero(grad);
    return;
  }

  SgdScalars s;
  s.inv = inv;
  s.neg_lr = static_cast<float>(-lr_v);
  s.wd = static_cast<float>(weight_decay);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.ema_w = static_cast<float>(1.0 - ema_beta);
  s.ema_small_w = std::abs(1.0 - ema_beta) < 0.5;
  // torch creates the momentum buffer as a clone of the first step's gradient.
  const int mode = momentum == 0.0 ? 0 : (*steps.data_ptr<float>() == 0.f ? 1 : 2);
  float* buf = momentum_buffer.has_value() ? momentum_buffer->data_ptr<float>() : nullptr;
  float* shadow = ema_shadow.has_value() ? ema_shadow->data_ptr<float>() : nullptr;
  const bool scale = inv_scale.has_value();
  bool skipped;
  if (bf16) {
    auto* p = param.data_ptr<at::BFloat16>();
    auto* g = grad.data_ptr<at::BFloat16>();
    CheckedUpdate<at::BFloat16> cu(g, scale, inv, found_inf, check_nonfinite);
    cu.arm();
    auto* zero_g = zero_grad ? g : nullptr;
    if (scale) sgd_dispatch_momentum<at::BFloat16, true>(p, g, buf, shadow, zero_g, n, mode, nesterov, s);
    else sgd_dispatch_momentum<at::BFloat16, false>(p, g, buf, shadow, zero_g, n, mode, nesterov, s);
    skipped = cu.skipped();
  } else {
    auto* p = param.data_ptr<float>();
    auto* g = grad.data_ptr<float>();
    CheckedUpdate<float> cu(g, scale, inv, found_inf, check_nonfinite);
    cu.arm();
    auto* zero_g = zero_grad ? g : nullptr;
    if (scale) sgd_dispatch_momentum<float, true>(p, g, buf, shadow, zero_g, n, mode, nesterov, s);
    else sgd_dispatch_momentum<float, false>(p, g, buf, shadow, zero_g, n, mode, nesterov, s);
    skipped = cu.skipped();
  }
  if (!skipped && mode != 0) increment_steps(steps);  // SGD's counts count momentum updates
  if (skipped && zero_grad) optim_zero(grad);
}

// found_inf := max(found_inf, any non-finite in grad * inv_scale). Run over every buffer of a step
// before the updates when a step spans several buffers (the whole step is skipped, not one buffer).
void optim_nonfinite_check(const at::Tensor& grad, const c10::optional<at::Tensor>& inv_scale,
                           const at::Tensor& found_inf) {
#ifdef FASTGAN_WITH_CUDA
  if (grad.is_cuda()) {
    cuda::optim_nonfinite_check(grad, inv_scale, found_inf);
    return;
  }
#endif
  check_buffer(grad, "grad", grad.numel(), false);
  check_scalar_tensor(found_inf, "found_inf");
  const float inv = read_inv_scale(inv_scale);
  const int64_t n = grad.numel();
  const bool bad = grad.scalar_type() == at::kBFloat16
                       ? any_nonfinite(grad.data_ptr<at::BFloat16>(), n, inv_scale.has_value(), inv)
                       : any_nonfinite(grad.data_ptr<float>(), n, inv_scale.has_value(), inv);
  if (bad) *found_inf.data_ptr<float>() = 1.f;
}

// Buffers above this many bytes are zeroed with non-temporal stores: they do not fit the caches
// anyway, and a streaming store writes each line once instead of first reading it (the
// read-for-ownership of an ordinary store), halving the fill's memory traffic.
constexpr int64_t kStreamingZeroBytes = int64_t(16) << 20;

void zero_bytes(char* p, int64_t bytes, bool streaming) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if (streaming) {
    char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
    const int64_t head = std::min<int64_t>(bytes, aligned - p);
    std::memset(p, 0, static_cast<size_t>(head));
    const int64_t body = (bytes - head) / 64 * 64;
#if defined(__AVX512F__)
    const __m512i z = _mm512_setzero_si512();
    for (int64_t i = 0; i < body; i += 64) _mm512_stream_si512(reinterpret_cast<__m512i*>(aligned + i), z);
#else
    const __m256i z = _mm256_setzero_si256();
    for (int64_t i = 0; i < body; i += 64) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(aligned + i), z);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(aligned + i + 32), z);
    }
#endif
    _mm_sfence();
    std::memset(aligned + body, 0, static_cast<size_t>(bytes - head - body));
    return;
  }
#endif
  (void)streaming;
  std::memset(p, 0, static_cast<size_t>(bytes));
}

// zero_grad(set_to_none=False) of a flat gradient buffer: one fill, threads on large buffers.
void optim_zero(const at::Tensor& buffer) {
  if (!buffer.device().is_cpu()) {
    buffer.zero_();
    return;
  }
  TORCH_CHECK(buffer.is_contiguous(), "buffer must be contiguous");
  auto* base = static_cast<char*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size();
  const bool streaming = bytes >= kStreamingZeroBytes;
  parallel_slices(bytes, [&](int64_t lo, int64_t hi, int) { zero_bytes(base + lo, hi - lo, streaming); });
}

// ---- flat buffers on 2 MB pages -----------------------------------------------------------------
// A step streams every flat buffer once; at 4 KB pages each stream crosses a page every 1024 fp32
// elements, and beyond the TLB's reach (a few thousand entries, ~12 MB) each crossing is a page walk --
// two-dimensional under a hypervisor, so expensive: measured here (KVM guest, THP in "madvise" mode), a
// 5 M-parameter Adam step ran 1.4x faster on 2 MB pages than on 4 KB pages. Large buffers are therefore
// mapped fresh, 2 MB aligned, and advised MADV_HUGEPAGE before their first touch (what torch's own
// allocator does under THP_MEM_ALLOC_ENABLE=1). Where the kernel declines (THP "never", no free huge
// pages) they are ordinary zeroed pages; values and results are the same either way. A buffer then
// occupies whole 2 MB pages: up to 2 MB more resident memory than its size.
constexpr size_t kHugePage = size_t(2) << 20;

at::Tensor optim_flat_buffer(int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "numel must be >= 0");
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (bytes < kHugePage) return at::zeros({numel}, at::TensorOptions().dtype(dtype));
  const size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return at::zeros({numel}, at::TensorOptions().dtype(dtype));
  // Trim the mapping to a 2 MB aligned start (anonymous pages are zero until written).
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  if (start > base) munmap(raw, start - base);
  const uintptr_t end = start + len, raw_end = base + len + kHugePage;
  if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
  void* data = reinterpret_cast<void*>(start);
#ifdef MADV_HUGEPAGE
  madvise(data, len, MADV_HUGEPAGE);  // advice only: refused, the pages are ordinary ones
#endif
  return at::from_blob(
      data, {numel}, [len](void* p) { munmap(p, len); }, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

}  // namespace

void register_optim(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("optim_adam_step", &optim_adam_step,
        "Adam/AdamW step over one flat buffer (in place): optional unscale, non-finite skip, EMA shadow; "
        "zero_grad=True leaves grad zeroed (also when the step is skipped).",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("steps"),
        py::arg("found_inf"), py::arg("inv_scale"), py::arg("lr_tensor"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("ema_shadow"),
        py::arg("ema_beta"), py::arg("check_nonfinite"), py::arg("zero_grad") = false);
  m.def("optim_sgd_step", &optim_sgd_step,
        "SGD step (momentum, dampening, nesterov, weight decay) over one flat buffer (in place); zero_grad as "
        "for optim_adam_step.", py::arg("param"),
        py::arg("grad"), py::arg("momentum_buffer"), py::arg("steps"), py::arg("found_inf"), py::arg("inv_scale"),
        py::arg("lr_tensor"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("weight_decay"), py::arg("ema_shadow"), py::arg("ema_beta"), py::arg("check_nonfinite"),
        py::arg("zero_grad") = false);
  m.def("optim_nonfinite_check", &optim_nonfinite_check,
        "found_inf := 1 if any grad * inv_scale is inf/NaN (left unchanged otherwise).", py::arg("grad"),
        py::arg("inv_scale"), py::arg("found_inf"));
  m.def("optim_zero", &optim_zero, "Zero a contiguous buffer (the flat-gradient zero_grad).", py::arg("buffer"));
  m.def("optim_flat_buffer", &optim_flat_buffer,
        "A zero-filled 1-D CPU buffer; from 2 MB up, freshly mapped, 2 MB aligned and advised onto huge pages.",
        py::arg("numel"), py::arg("dtype"));
}

}  // namespace fastgan
