// The fused log-D losses on CPU: loss, the game's statistics and d loss / d logits in one pass
// over the logits. Mirrors fastgan/ops/losses.py (the reference) and fastgan/ops/triton/losses.py.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastgan {
namespace {

// Loss kinds, in the order of fastgan.ops.losses.LOSS_KINDS.
enum LossKind : int64_t { kMinimax = 0, kNonSaturating = 1, kHinge = 2, kWasserstein = 3, kLeastSquares = 4 };

// exp(y) for y <= 0 and log1p(e) for e in [0, 1], in float, branch-free so that the loops below
// vectorise (std::exp / std::log1p are scalar library calls, ~10x slower than the whole rest of
// the op). exp: Cephes' expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp); values below
// -87 flush to 0 (the float range ends there). log1p: 2 atanh(e / (2 + e)) as an odd series in
// s = e / (2 + e) <= 1/3, truncated after s^15 (relative error < 2e-9). NaN propagates through both.
inline float exp_nonpositive(float y) {
  const float yc = y < -87.0f ? -87.0f : y;
  const float n = std::floor(yc * 1.44269504088896341f + 0.5f);
  float r = yc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y < -87.0f ? 0.0f : p * scale;
}
inline double exp_nonpositive(double y) { return std::exp(y); }

inline float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float t = 1.0f / 15.0f;
  t = t * s2 + 1.0f / 13.0f;
  t = t * s2 + 1.0f / 11.0f;
  t = t * s2 + 1.0f / 9.0f;
  t = t * s2 + 1.0f / 7.0f;
  t = t * s2 + 1.0f / 5.0f;
  t = t * s2 + 1.0f / 3.0f;
  t = t * s2 + 1.0f;
  return 2.0f * s * t;
}
inline double log1p_unit(double e) { return std::log1p(e); }

// softplus(x) = log(1 + exp(x)) and sigmoid(x) from one exp(-|x|): no overflow for any finite x.
template <typename T> struct SoftplusSigmoid {
  T softplus_pos, softplus_neg, sigmoid, sigmoid_neg;  // softplus(x), softplus(-x), sigmoid(x), sigmoid(-x)
};
template <typename T> inline SoftplusSigmoid<T> softplus_sigmoid(T x) {
  const T e = exp_nonpositive(-std::abs(x));
  const T log_term = log1p_unit(e);
  const T pos = x > T(0) ? x : T(0), neg = x < T(0) ? -x : T(0);
  const T inv = T(1) / (T(1) + e);
  // sigmoid(-x) directly rather than 1 - sigmoid(x), which cancels to 0 for large x.
  return {pos + log_term, neg + log_term, x >= T(0) ? inv : e * inv, x >= T(0) ? e * inv : inv};
}

// Per-element sums that make up the loss and the statistics of one side (real or fake).
struct SideSums {
  double loss = 0, softplus_term = 0, sigmoid = 0, nonfinite = 0;
};

// The D loss term of one logit and its derivative; KIND and REAL are template parameters so the
// element loop has no branch on them.
template <int64_t KIND, bool REAL, typename T>
inline void d_term(T v, const SoftplusSigmoid<T>& ss, T& term, T& g) {
  if constexpr (KIND == kMinimax || KIND == kNonSaturating) {  // -log D(x), -log(1 - D(G(z)))
    term = REAL ? ss.softplus_neg : ss.softplus_pos;
    g = REAL ? -ss.sigmoid_neg : ss.sigmoid;
  } else if constexpr (KIND == kHinge) {
    if constexpr (REAL) { term = v < T(1) ? T(1) - v : T(0); g = v < T(1) ? T(-1) : T(0); }
    else { term = v > T(-1) ? T(1) + v : T(0); g = v > T(-1) ? T(1) : T(0); }
  } else if constexpr (KIND == kWasserstein) {
    term = REAL ? -v : v;
    g = REAL ? T(-1) : T(1);
  } else {  // least squares: targets 1 (real) and 0 (fake)
    const T d = REAL ? v - T(1) : v;
    term = T(0.5) * d * d;
    g = d;
  }
}

// One side of the discriminator loss: writes d(mean term)/d(logit) into grad (if given) and
// returns the sums. Fixed chunks reduce into their own slots, so results are deterministic.
template <int64_t KIND, bool REAL, typename scalar_t, typename acc_t>
SideSums d_side(const scalar_t* x, scalar_t* grad, int64_t n) {
  const acc_t inv_n = acc_t(1) / acc_t(n);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t grain = 4096;
  const int64_t chunks = (n + grain - 1) / grain;
  std::vector<SideSums> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * grain, hi = std::min(n, lo + grain);
      acc_t s_loss = 0, s_sp = 0, s_sig = 0, s_bad = 0;
#pragma omp simd reduction(+ : s_loss, s_sp, s_sig, s_bad)
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t v = static_cast<acc_t>(x[i]);
        const auto ss = softplus_sigmoid(v);
        acc_t term, g;
        d_term<KIND, REAL>(v, ss, term, g);
        const bool finite = (v - v) == acc_t(0);  // false for NaN and +-inf
        s_bad += finite ? acc_t(0) : acc_t(1);
        s_loss += term;
        // value term: log D(x) for real = -softplus(-v); log(1 - D(G(z))) for fake = -softplus(v)
        s_sp += REAL ? ss.softplus_neg : ss.softplus_pos;
        s_sig += ss.sigmoid;
        if (grad) grad[i] = static_cast<scalar_t>(finite ? g * inv_n : nan);
      }
      partial[c] = SideSums{double(s_loss), double(s_sp), double(s_sig), double(s_bad)};
    }
  });
  SideSums total;
  for (const auto& p : partial) {
    total.loss += p.loss; total.softplus_term += p.softplus_term; total.sigmoid += p.sigmoid; total.nonfinite += p.nonfinite;
  }
  return total;
}

template <bool REAL, typename scalar_t, typename acc_t>
SideSums d_side_of_kind(const scalar_t* x, scalar_t* grad, int64_t n, int64_t kind) {
  switch (kind) {
    case kMinimax: return d_side<kMinimax, REAL, scalar_t, acc_t>(x, grad, n);
    case kNonSaturating: return d_side<kNonSaturating, REAL, scalar_t, acc_t>(x, grad, n);
    case kHinge: return d_side<kHinge, REAL, scalar_t, acc_t>(x, grad, n);
    case kWasserstein: return d_side<kWasserstein, REAL, scalar_t, acc_t>(x, grad, n);
    default: return d_side<kLeastSquares, REAL, scalar_t, acc_t>(x, grad, n);
  }
}

void check_logits(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpu implementation");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.numel() > 0, name, " must be a non-empty contiguous 1-D tensor");
}

// Returns (stats, grad_real, grad_fake); stats = [loss, value, jsd, d_real, d_fake] in the
// accumulation dtype (float64 for float64 logits, float32 otherwise).
std::vector<torch::Tensor> d_loss_forward(const torch::Tensor& real, const torch::Tensor& fake, int64_t kind,
                                          bool need_grad) {
  check_logits(real, "real_logits");
  check_logits(fake, "fake_logits");
  TORCH_CHECK(real.scalar_type() == fake.scalar_type(), "real_logits and fake_logits must share a dtype");
  TORCH_CHECK(kind >= 0 && kind <= 4, "unknown loss kind ", kind);
  const auto acc_type = real.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stats = torch::empty({5}, real.options().dtype(acc_type));
  auto grad_real = need_grad ? torch::empty_like(real) : torch::empty({0}, real.options());
  auto grad_fake = need_grad ? torch::empty_like(fake) : torch::empty({0}, fake.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real.scalar_type(), "d_loss_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const SideSums r = d_side_of_kind<true, scalar_t, acc_t>(
        real.data_ptr<scalar_t>(), need_grad ? grad_real.data_ptr<scalar_t>() : nullptr, real.numel(), kind);
    const SideSums f = d_side_of_kind<false, scalar_t, acc_t>(
        fake.data_ptr<scalar_t>(), need_grad ? grad_fake.data_ptr<scalar_t>() : nullptr, fake.numel(), kind);
    const double nr = double(real.numel()), nf = double(fake.numel());
    double loss = r.loss / nr + f.loss / nf;
    double value = -(r.softplus_term / nr + f.softplus_term / nf);
    double jsd = 0.5 * (value + std::log(4.0));
    double d_real = r.sigmoid / nr, d_fake = f.sigmoid / nf;
    if (r.nonfinite + f.nonfinite > 0) {  // never hide a NaN/inf logit behind a finite mean
      loss = value = jsd = d_real = d_fake = std::numeric_limits<double>::quiet_NaN();
    }
    auto* out = stats.data_ptr<acc_t>();
    out[0] = acc_t(loss); out[1] = acc_t(value); out[2] = acc_t(jsd); out[3] = acc_t(d_real); out[4] = acc_t(d_fake);
  });
  return {stats, grad_real, grad_fake};
}

// Returns (loss, grad_fake) for the generator's loss.
std::vector<torch::Tensor> g_loss_forward(const torch::Tensor& fake, int64_t kind, bool need_grad) {
  check_logits(fake, "fake_logits");
  TORCH_CHECK(kind >= 0 && kind <= 4, "unknown loss kind ", kind);
  const auto acc_type = fake.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = torch::empty({}, fake.options().dtype(acc_type));
  auto grad = need_grad ? torch::empty_like(fake) : torch::empty({0}, fake.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "g_loss_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = fake.data_ptr<scalar_t>();
    scalar_t* g_out = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const int64_t n = fake.numel();
    const acc_t inv_n = acc_t(1) / acc_t(n);
    const int64_t grain = 2048, chunks = (n + grain - 1) / grain;
    std::vector<double> part_loss(chunks), part_bad(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * grain, hi = std::min(n, lo + grain);
        acc_t s = 0, bad = 0;
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t v = static_cast<acc_t>(x[i]);
          const auto ss = softplus_sigmoid(v);
          acc_t term, g;
          switch (kind) {
            case kMinimax: term = -ss.softplus_pos; g = -ss.sigmoid; break;                 // minimise log(1 - D)
            case kNonSaturating: term = ss.softplus_neg; g = -ss.sigmoid_neg; break;  // maximise log D
            case kHinge:
            case kWasserstein: term = -v; g = acc_t(-1); break;
            default: { const acc_t d = v - acc_t(1); term = acc_t(0.5) * d * d; g = d; }
          }
          const bool finite = std::isfinite(v);
          bad += finite ? acc_t(0) : acc_t(1);
          s += term;
          if (g_out) g_out[i] = static_cast<scalar_t>(finite ? g * inv_n : std::numeric_limits<acc_t>::quiet_NaN());
        }
        part_loss[c] = double(s); part_bad[c] = double(bad);
      }
    });
    double total = 0, bad = 0;
    for (int64_t c = 0; c < chunks; ++c) { total += part_loss[c]; bad += part_bad[c]; }
    *loss.data_ptr<acc_t>() = bad > 0 ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(total / double(n));
  });
  return {loss, grad};
}

}  // namespace

void register_losses(pybind11::module_& m) {
  m.def("d_loss_forward", &d_loss_forward, "D loss, statistics and gradients in one pass (CPU)",
        pybind11::arg("real"), pybind11::arg("fake"), pybind11::arg("kind"), pybind11::arg("need_grad"));
  m.def("g_loss_forward", &g_loss_forward, "G loss and gradient in one pass (CPU)",
        pybind11::arg("fake"), pybind11::arg("kind"), pybind11::arg("need_grad"));
}

}  // namespace fastgan
