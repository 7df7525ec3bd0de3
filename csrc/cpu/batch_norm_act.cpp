// BatchNorm + activation on CPU, forward and backward. Mirrors fastgan/ops/batch_norm_act.py (the
// reference and the math) and fastgan/ops/triton/batch_norm_act.py.
//
// Two layouts, chosen from x's strides (Python hands over nothing else):
//  * planar: 4-D contiguous NCHW with H*W > 1. Parallel over one group of channels per thread, each
//    pass streaming n outer, channels inner (see forward_planar).
//  * rows: (N*H*W) x C with channels contiguous (2-D input, channels_last, or H*W == 1). Parallel over
//    fixed chunks of rows with per-chunk partial sums (deterministic whatever the thread count),
//    then an elementwise pass, vectorised across channels.
// Statistics: per-plane lane (planar) or per-chunk (rows) sums in the op-math type of values shifted by
// the mean of the channel's first values (see shift_sample), combined in double.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/activations.h"

namespace fastgan {
namespace {

using at::Tensor;

template <typename T> using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Layout {
  int64_t n, c, hw;  // rows = n * hw
  bool planar;
  int64_t rows() const { return n * hw; }
  int64_t count() const { return n * hw; }  // values per channel
};

bool rows_layout_ok(const Tensor& t) {
  if (t.dim() == 2) return t.is_contiguous();
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) || (t.size(2) * t.size(3) == 1 && t.is_contiguous());
}

Layout layout_of(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 4, "batch_norm_act: x must be 2-D or 4-D, got ", x.dim(), "-D");
  Layout L{x.size(0), x.size(1), x.dim() == 4 ? x.size(2) * x.size(3) : 1, false};
  L.planar = x.dim() == 4 && L.hw > 1 && x.is_contiguous();
  TORCH_CHECK(L.planar || rows_layout_ok(x), "batch_norm_act: x must be contiguous or channels_last");
  return L;
}

void check_like_x(const Tensor& t, const Tensor& x, const Layout& L, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "batch_norm_act: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "batch_norm_act: ", name, " must have x's dtype");
  TORCH_CHECK(L.planar ? t.is_contiguous() : rows_layout_ok(t), "batch_norm_act: ", name,
              " must have x's memory layout");
}

// A per-channel vector in the op-math type, contiguous (weight, bias, statistics).
Tensor channel_vector(const std::optional<Tensor>& t, at::ScalarType acc, int64_t c, const char* name) {
  if (!t.has_value()) return Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c, "batch_norm_act: ", name, " must have shape (", c, ")");
  TORCH_CHECK(t->device().is_cpu(), "batch_norm_act: ", name, " must be a CPU tensor");
  return t->to(acc).contiguous();
}

template <typename T> const T* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// z = (x - mean) * scale + shift per channel: scale = w invstd, shift = b. Centred first, as the
// reference computes it: x - mean is exact near the mean, so z is exactly b where x == mean (0 at
// relu's kink when b = 0: the reference's gradient there is 0). The folded x * scale + (b - mean
// scale) left the rounding error of mean * scale there (a contracted FMA keeps x * scale exact), which
// put such values on either side of the kink. Forward and backward derive them identically, so the
// backward's recomputed z is bit-identical to the forward's.
template <typename opm> struct ChannelAffine {
  double invstd;
  opm scale, shift;
};
template <typename opm>
inline ChannelAffine<opm> channel_affine(const opm* w, const opm* b, opm var, double eps, int64_t c) {
  const double invstd = 1.0 / std::sqrt(double(var) + eps);
  const double scale = w ? double(w[c]) * invstd : invstd;
  return {invstd, static_cast<opm>(scale), static_cast<opm>(b ? b[c] : opm(0))};
}

template <typename opm>
inline opm normalise(opm x, opm mean, opm scale, opm shift) { return (x - mean) * scale + shift; }

// dy * act'(z), z recomputed from x (act' through the table's rule in y = act(z), all in op-math; relu's
// a select, as torch's: see act_backward_ct).
template <int64_t ACT, typename opm>
inline opm grad_z(opm gy, opm x, opm mean, opm scale, opm shift, opm alpha) {
  return act_backward_ct<ACT>(gy, apply_act_ct<ACT>(normalise(x, mean, scale, shift), alpha), alpha);
}

// Below this many elements per task, at::parallel_for runs inline: waking threads costs more.
constexpr int64_t kMinTaskElements = 16384;
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(elements_per_item, 1));
}

// Fixed row chunks of the rows layout: partial sums per chunk, summed in chunk order.
int64_t rows_per_chunk(int64_t rows) { return std::clamp<int64_t>((rows + 63) / 64, 1, 1024); }

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// Planar (NCHW) kernels split the channels into one contiguous group per thread; each pass walks n
// outer and the group's channels inner, so it streams runs of G*H*W contiguous values (not one plane
// of H*W values C*H*W apart, channel by channel). Pass A reduces each plane into per-channel lane
// sums: kLanes float partials per channel (no horizontal reduction per plane, which dominated at
// H*W = 16 or 64), moved into double lanes after each plane (after several for planes shorter than
// 32 values: see flush_interval). Measured on the 2-core Zen 4 this was written on, streaming both
// passes beat reducing one channel (or an L2-sized group) at a time and re-reading it from a staged
// copy in L2: 1.6-1.8x faster at DCGAN sizes. A channel's result depends only on its own values in a
// fixed order: not on the grouping or the thread count.
constexpr int kLanes = 16;

// The shift of a channel's sums, sum(x - ref) and sum((x - ref)^2): the mean of its first kShiftSample
// values (in memory order). The variance is then sum(d^2)/n - mean(d)^2, which cancels by as many digits
// as the shift is standard deviations away from the mean: with the channel's first value as the shift,
// an atypical first value (100 sigma off: 4 digits) cost that much; a sample's mean stays close.
constexpr int64_t kShiftSample = 64;

// Of one plane's values, the float lanes hold at most this many per lane before they move to double
// (a 2048 x 2048 plane summed in float lanes lost 1e-4 of its variance).
constexpr int64_t kMaxFloatRun = 4096 * kLanes;

template <typename scalar_t, typename opm>
opm planar_shift(const scalar_t* x, const Layout& L, int64_t c) {
  const int64_t want = std::min<int64_t>(kShiftSample, L.count());
  double s = 0;
  int64_t got = 0;
  for (int64_t n = 0; n < L.n && got < want; ++n) {
    const scalar_t* p = x + (n * L.c + c) * L.hw;
    for (int64_t i = 0; i < L.hw && got < want; ++i, ++got) s += double(p[i]);
  }
  return static_cast<opm>(s / double(want));
}

template <typename scalar_t, typename opm>
opm rows_shift(const scalar_t* x, const Layout& L, int64_t c) {
  const int64_t want = std::min<int64_t>(kShiftSample, L.rows());
  double s = 0;
  for (int64_t r = 0; r < want; ++r) s += double(x[r * L.c + c]);
  return static_cast<opm>(s / double(want));
}

// Channels per group: an even share per thread (at least one channel).
inline int64_t channel_group(int64_t C) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  return std::max<int64_t>(1, (C + threads - 1) / threads);
}

// Adds one plane's sum(d) and sum(d^2), d = x - ref, into the channel's float lanes A and Q. The
// caller moves the lanes into double every few planes (flush_interval).
template <typename scalar_t, typename opm>
inline void plane_moments(const scalar_t* __restrict__ p, int64_t HW, opm ref, opm* __restrict__ A,
                          opm* __restrict__ Q) {
  opm a[kLanes], q[kLanes];
#pragma omp simd
  for (int j = 0; j < kLanes; ++j) {
    a[j] = A[j];
    q[j] = Q[j];
  }
  int64_t i = 0;
  for (; i + kLanes <= HW; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const opm d = static_cast<opm>(p[i + j]) - ref;
      a[j] += d;
      q[j] += d * d;
    }
  }
  for (int j = 0; i + j < HW; ++j) {
    const opm d = static_cast<opm>(p[i + j]) - ref;
    a[j] += d;
    q[j] += d * d;
  }
#pragma omp simd
  for (int j = 0; j < kLanes; ++j) {
    A[j] = a[j];
    Q[j] = q[j];
  }
}

// Planes whose lane sums stay in float before they move to double: every plane from 2 vectors a
// plane up (the move is then cheap next to the plane), else up to 256 values per lane (4x4 maps:
// the per-plane move would cost as much as the plane itself).
inline int64_t flush_interval(int64_t HW) {
  if (HW >= 2 * kLanes) return 1;
  return std::max<int64_t>(1, 256 / std::max<int64_t>(1, (HW + kLanes - 1) / kLanes));
}

// Moves n float lane pairs into their double lanes and clears them.
template <typename opm>
inline void flush_lanes(opm* __restrict__ fa, opm* __restrict__ fq, double* __restrict__ da, double* __restrict__ dq,
                        int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    da[j] += fa[j];
    dq[j] += fq[j];
    fa[j] = opm(0);
    fq[j] = opm(0);
  }
}

template <int64_t ACT, typename scalar_t, typename opm>
inline void plane_normalise(const scalar_t* __restrict__ p, scalar_t* __restrict__ o, int64_t HW, opm mean, opm scale,
                            opm shift, opm alpha) {
#pragma omp simd
  for (int64_t i = 0; i < HW; ++i)
    o[i] = static_cast<scalar_t>(apply_act_ct<ACT>(normalise(static_cast<opm>(p[i]), mean, scale, shift), alpha));
}

template <typename scalar_t, int64_t ACT>
void forward_planar(const scalar_t* x, scalar_t* y, const Layout& L, bool training, const opmath_t<scalar_t>* w,
                    const opmath_t<scalar_t>* b, opmath_t<scalar_t>* mean, opmath_t<scalar_t>* var, double eps,
                    opmath_t<scalar_t> alpha) {
  using opm = opmath_t<scalar_t>;
  const int64_t C = L.c, HW = L.hw, N = L.n;
  const int64_t group = channel_group(C), groups = (C + group - 1) / group;
  at::parallel_for(0, groups, 1, [=](int64_t g0, int64_t g1) {
    std::vector<double> lane_s(group * kLanes), lane_q(group * kLanes);
    std::vector<opm> float_s(group * kLanes), float_q(group * kLanes);
    std::vector<opm> scale(group), shift(group), ref(group);
    const int64_t flush_every = flush_interval(HW);
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t c0 = gi * group, G = std::min(C, c0 + group) - c0;
      if (training) {
        std::fill(lane_s.begin(), lane_s.end(), 0.0);
        std::fill(lane_q.begin(), lane_q.end(), 0.0);
        std::fill(float_s.begin(), float_s.end(), opm(0));
        std::fill(float_q.begin(), float_q.end(), opm(0));
        for (int64_t k = 0; k < G; ++k) ref[k] = planar_shift<scalar_t, opm>(x, L, c0 + k);
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* p = x + (n * C + c0) * HW;
          for (int64_t k = 0; k < G; ++k, p += HW) {
            opm* A = float_s.data() + k * kLanes;
            opm* Q = float_q.data() + k * kLanes;
            if (HW <= kMaxFloatRun) {
              plane_moments(p, HW, ref[k], A, Q);
              continue;
            }
            for (int64_t off = 0; off < HW; off += kMaxFloatRun) {  // a large plane: to double piece by piece
              plane_moments(p + off, std::min(kMaxFloatRun, HW - off), ref[k], A, Q);
              flush_lanes(A, Q, lane_s.data() + k * kLanes, lane_q.data() + k * kLanes, kLanes);
            }
          }
          if ((n + 1) % flush_every == 0 || n + 1 == N)
            flush_lanes(float_s.data(), float_q.data(), lane_s.data(), lane_q.data(), G * kLanes);
        }
        const double cnt = double(L.count());
        for (int64_t k = 0; k < G; ++k) {
          double s = 0, ss = 0;
          for (int j = 0; j < kLanes; ++j) {
            s += lane_s[k * kLanes + j];
            ss += lane_q[k * kLanes + j];
          }
          const double m = s / cnt;
          mean[c0 + k] = static_cast<opm>(double(ref[k]) + m);
          var[c0 + k] = static_cast<opm>(std::max(ss / cnt - m * m, 0.0));
        }
      }
      for (int64_t k = 0; k < G; ++k) {
        const auto aff = channel_affine<opm>(w, b, var[c0 + k], eps, c0 + k);
        scale[k] = aff.scale;
        shift[k] = aff.shift;
      }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < G; ++k) {
          const int64_t off = (n * C + c0 + k) * HW;
          plane_normalise<ACT>(x + off, y + off, HW, mean[c0 + k], scale[k], shift[k], alpha);
        }
      }
    }
  });
}

template <typename scalar_t, int64_t ACT>
void forward_rows(const scalar_t* x, scalar_t* y, const Layout& L, bool training, const opmath_t<scalar_t>* w,
                  const opmath_t<scalar_t>* b, opmath_t<scalar_t>* mean, opmath_t<scalar_t>* var, double eps,
                  opmath_t<scalar_t> alpha) {
  using opm = opmath_t<scalar_t>;
  const int64_t C = L.c, R = L.rows();
  if (training) {
    const int64_t rpc = rows_per_chunk(R), chunks = (R + rpc - 1) / rpc;
    std::vector<opm> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = rows_shift<scalar_t, opm>(x, L, c);
    std::vector<double> partial(size_t(chunks) * 2 * C);
    at::parallel_for(0, chunks, grain_for(rpc * C), [&](int64_t k0, int64_t k1) {
      std::vector<opm> a(C), q(C);
      const opm* __restrict__ sh = shift.data();
      for (int64_t k = k0; k < k1; ++k) {
        std::fill(a.begin(), a.end(), opm(0));
        std::fill(q.begin(), q.end(), opm(0));
        opm* __restrict__ pa = a.data();
        opm* __restrict__ pq = q.data();
        for (int64_t r = k * rpc, r_end = std::min(R, (k + 1) * rpc); r < r_end; ++r) {
          const scalar_t* __restrict__ p = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const opm d = static_cast<opm>(p[c]) - sh[c];
            pa[c] += d;
            pq[c] += d * d;
          }
        }
        double* out = partial.data() + size_t(k) * 2 * C;
        for (int64_t c = 0; c < C; ++c) {
          out[c] = pa[c];
          out[C + c] = pq[c];
        }
      }
    });
    const double cnt = double(L.count());
    for (int64_t c = 0; c < C; ++c) {
      double s = 0, ss = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        s += partial[size_t(k) * 2 * C + c];
        ss += partial[size_t(k) * 2 * C + C + c];
      }
      const double m = s / cnt;
      mean[c] = static_cast<opm>(double(shift[c]) + m);
      var[c] = static_cast<opm>(std::max(ss / cnt - m * m, 0.0));
    }
  }
  std::vector<opm> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto aff = channel_affine<opm>(w, b, var[c], eps, c);
    scale[c] = aff.scale;
    shift[c] = aff.shift;
  }
  const opm* __restrict__ mc = mean;
  const opm* __restrict__ sc = scale.data();
  const opm* __restrict__ sh = shift.data();
  at::parallel_for(0, R, grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ p = x + r * C;
      scalar_t* __restrict__ o = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<scalar_t>(apply_act_ct<ACT>(normalise(static_cast<opm>(p[c]), mc[c], sc[c], sh[c]), alpha));
      }
    }
  });
}

// Returns (y, mean, biased var); in eval mode mean/var are copies of the given statistics.
std::vector<Tensor> batch_norm_act_forward(const Tensor& x, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias, const std::optional<Tensor>& mean_in,
                                           const std::optional<Tensor>& var_in, bool training, double eps,
                                           int64_t act, double alpha) {
  TORCH_CHECK(x.device().is_cpu(), "batch_norm_act: x must be a CPU tensor");
  const Layout L = layout_of(x);
  TORCH_CHECK(!training || L.count() > 1, "batch_norm_act: more than one value per channel needed in training");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t C = L.c;
  Tensor w = channel_vector(weight, acc, C, "weight"), b = channel_vector(bias, acc, C, "bias");
  Tensor mean, var;
  if (training) {
    mean = at::empty({C}, x.options().dtype(acc));
    var = at::empty({C}, x.options().dtype(acc));
  } else {
    TORCH_CHECK(mean_in.has_value() && var_in.has_value(), "batch_norm_act: eval mode needs mean and var");
    mean = channel_vector(mean_in, acc, C, "running_mean").clone();
    var = channel_vector(var_in, acc, C, "running_var").clone();
  }
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return {y, mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_act_forward", [&] {
    using opm = opmath_t<scalar_t>;
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t ACT = decltype(act_c)::value;
      auto run = L.planar ? forward_planar<scalar_t, ACT> : forward_rows<scalar_t, ACT>;
      run(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, training, ptr_or_null<opm>(w), ptr_or_null<opm>(b),
          mean.data_ptr<opm>(), var.data_ptr<opm>(), eps, static_cast<opm>(alpha));
    });
  });
  return {y, mean, var};
}

// ------------------------------------------------------------------------------------------------
// Backward: dz = dy act'(z), z = x scale + shift recomputed (y is not read); db = sum dz; dw = invstd sum dz (x - mean);
// dx = p dz + q x + o with p = w invstd, and in training q = -p invstd^2 sum dz (x - mean) / n,
// o = -p sum dz / n - q mean (eval: q = o = 0, and dx is written in the reduction pass).
// ------------------------------------------------------------------------------------------------

struct ChannelGrad {
  double p, q, o;
};

inline ChannelGrad channel_grad(double sum_dz, double sum_dzx, double mean, double invstd, double w, double cnt,
                                bool training) {
  const double p = w * invstd;
  if (!training) return {p, 0.0, 0.0};
  const double q = -p * invstd * invstd * sum_dzx / cnt;
  return {p, q, -p * sum_dz / cnt - q * mean};
}

// A channel's reductions done (both layouts): its bias and weight gradients, and the (p, q, o) the
// input gradient pass uses.
template <typename opm>
inline void finish_channel(double sum_dz, double sum_dzx, double mean, double invstd, double w, double cnt,
                           bool training, opm& db, opm& dw, opm& p, opm& q, opm& o) {
  db = static_cast<opm>(sum_dz);
  dw = static_cast<opm>(sum_dzx * invstd);
  const ChannelGrad k = channel_grad(sum_dz, sum_dzx, mean, invstd, w, cnt, training);
  p = static_cast<opm>(k.p);
  q = static_cast<opm>(k.q);
  o = static_cast<opm>(k.o);
}

// Adds one plane's sum(dz) and sum(dz (x - m)) into the channel's float lanes A and Q. EVAL: also
// writes dx = dz * p (eval mode needs no reduction for it).
template <bool EVAL, int64_t ACT, typename scalar_t, typename opm>
inline void plane_grad_moments(const scalar_t* __restrict__ g, const scalar_t* __restrict__ xv, scalar_t* __restrict__ o,
                               int64_t HW, opm scale, opm shift, opm m, opm p_eval, opm alpha,
                               opm* __restrict__ A, opm* __restrict__ Q) {
  opm a[kLanes], q[kLanes];
#pragma omp simd
  for (int j = 0; j < kLanes; ++j) {
    a[j] = A[j];
    q[j] = Q[j];
  }
  auto element = [&](int64_t i, int j) {
    const opm xi = static_cast<opm>(xv[i]);
    const opm dz = grad_z<ACT>(static_cast<opm>(g[i]), xi, m, scale, shift, alpha);
    a[j] += dz;
    q[j] += dz * (xi - m);
    if constexpr (EVAL) o[i] = static_cast<scalar_t>(dz * p_eval);
  };
  int64_t i = 0;
  for (; i + kLanes <= HW; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) element(i + j, j);
  }
  for (int j = 0; i + j < HW; ++j) element(i + j, j);
#pragma omp simd
  for (int j = 0; j < kLanes; ++j) {
    A[j] = a[j];
    Q[j] = q[j];
  }
}

template <int64_t ACT, typename scalar_t, typename opm>
inline void plane_input_grad(const scalar_t* __restrict__ g, const scalar_t* __restrict__ xv, scalar_t* __restrict__ o,
                             int64_t HW, opm m, opm scale, opm shift, opm kp, opm kq, opm ko, opm alpha) {
#pragma omp simd
  for (int64_t i = 0; i < HW; ++i) {
    const opm xi = static_cast<opm>(xv[i]);
    const opm dz = grad_z<ACT>(static_cast<opm>(g[i]), xi, m, scale, shift, alpha);
    o[i] = static_cast<scalar_t>(dz * kp + xi * kq + ko);
  }
}

template <typename scalar_t, int64_t ACT>
void backward_planar(const scalar_t* gy, const scalar_t* x, scalar_t* dx, const Layout& L, bool training,
                     const opmath_t<scalar_t>* w, const opmath_t<scalar_t>* b, const opmath_t<scalar_t>* mean,
                     const opmath_t<scalar_t>* var, opmath_t<scalar_t>* dw, opmath_t<scalar_t>* db, double eps,
                     opmath_t<scalar_t> alpha) {
  using opm = opmath_t<scalar_t>;
  const int64_t C = L.c, HW = L.hw, N = L.n;
  // As forward_planar: one group of channels per thread, n outer.
  const int64_t group = channel_group(C), groups = (C + group - 1) / group;
  at::parallel_for(0, groups, 1, [=](int64_t g0, int64_t g1) {
    std::vector<double> lane_s(group * kLanes), lane_q(group * kLanes), invstd(group);
    std::vector<opm> float_s(group * kLanes), float_q(group * kLanes);
    const int64_t flush_every = flush_interval(HW);
    std::vector<opm> scale(group), shift(group), p_eval(group), kp(group), kq(group), ko(group);
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t c0 = gi * group, G = std::min(C, c0 + group) - c0;
      for (int64_t k = 0; k < G; ++k) {
        const auto aff = channel_affine<opm>(w, b, var[c0 + k], eps, c0 + k);
        scale[k] = aff.scale;
        shift[k] = aff.shift;
        invstd[k] = aff.invstd;
        p_eval[k] = static_cast<opm>((w ? double(w[c0 + k]) : 1.0) * aff.invstd);
      }
      std::fill(lane_s.begin(), lane_s.end(), 0.0);
      std::fill(lane_q.begin(), lane_q.end(), 0.0);
      std::fill(float_s.begin(), float_s.end(), opm(0));
      std::fill(float_q.begin(), float_q.end(), opm(0));
      for (int64_t n = 0; n < N; ++n) {
        if (n > 0 && n % flush_every == 0)
          flush_lanes(float_s.data(), float_q.data(), lane_s.data(), lane_q.data(), G * kLanes);
        for (int64_t k = 0; k < G; ++k) {
          const int64_t off = (n * C + c0 + k) * HW;
          opm* A = float_s.data() + k * kLanes;
          opm* Q = float_q.data() + k * kLanes;
          const opm m = mean[c0 + k];
          if (training) {
            plane_grad_moments<false, ACT>(gy + off, x + off, static_cast<scalar_t*>(nullptr), HW, scale[k], shift[k],
                                           m, p_eval[k], alpha, A, Q);
          } else {
            plane_grad_moments<true, ACT>(gy + off, x + off, dx + off, HW, scale[k], shift[k], m, p_eval[k], alpha, A,
                                          Q);
          }
        }
      }
      flush_lanes(float_s.data(), float_q.data(), lane_s.data(), lane_q.data(), G * kLanes);
      for (int64_t k = 0; k < G; ++k) {
        double s_dz = 0, s_dzx = 0;
        for (int j = 0; j < kLanes; ++j) {
          s_dz += lane_s[k * kLanes + j];
          s_dzx += lane_q[k * kLanes + j];
        }
        const int64_t c = c0 + k;
        finish_channel(s_dz, s_dzx, double(mean[c]), invstd[k], w ? double(w[c]) : 1.0, double(L.count()), training,
                       db[c], dw[c], kp[k], kq[k], ko[k]);
      }
      if (!training) continue;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < G; ++k) {
          const int64_t off = (n * C + c0 + k) * HW;
          plane_input_grad<ACT>(gy + off, x + off, dx + off, HW, mean[c0 + k], scale[k], shift[k], kp[k], kq[k], ko[k],
                                alpha);
        }
      }
    }
  });
}

template <typename scalar_t, int64_t ACT>
void backward_rows(const scalar_t* gy, const scalar_t* x, scalar_t* dx, const Layout& L, bool training,
                   const opmath_t<scalar_t>* w, const opmath_t<scalar_t>* b, const opmath_t<scalar_t>* mean,
                   const opmath_t<scalar_t>* var, opmath_t<scalar_t>* dw, opmath_t<scalar_t>* db, double eps,
                   opmath_t<scalar_t> alpha) {
  using opm = opmath_t<scalar_t>;
  const int64_t C = L.c, R = L.rows();
  std::vector<double> invstd(C);
  std::vector<opm> p_eval(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto aff = channel_affine<opm>(w, b, var[c], eps, c);
    invstd[c] = aff.invstd;
    scale[c] = aff.scale;
    shift[c] = aff.shift;
    p_eval[c] = static_cast<opm>((w ? double(w[c]) : 1.0) * aff.invstd);
  }
  const opm* __restrict__ sc = scale.data();
  const opm* __restrict__ sh = shift.data();
  const int64_t rpc = rows_per_chunk(R), chunks = (R + rpc - 1) / rpc;
  std::vector<double> partial(size_t(chunks) * 2 * C);
  at::parallel_for(0, chunks, grain_for(rpc * C), [&](int64_t k0, int64_t k1) {
    std::vector<opm> a(C), q(C);
    const opm* __restrict__ mc = mean;
    const opm* __restrict__ pe = p_eval.data();
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(a.begin(), a.end(), opm(0));
      std::fill(q.begin(), q.end(), opm(0));
      opm* __restrict__ pa = a.data();
      opm* __restrict__ pq = q.data();
      for (int64_t r = k * rpc, r_end = std::min(R, (k + 1) * rpc); r < r_end; ++r) {
        const scalar_t* __restrict__ g = gy + r * C;
        const scalar_t* __restrict__ xv = x + r * C;
        if (training) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const opm xi = static_cast<opm>(xv[c]);
            const opm dz = grad_z<ACT>(static_cast<opm>(g[c]), xi, mc[c], sc[c], sh[c], alpha);
            pa[c] += dz;
            pq[c] += dz * (xi - mc[c]);
          }
        } else {
          scalar_t* __restrict__ o = dx + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const opm xi = static_cast<opm>(xv[c]);
            const opm dz = grad_z<ACT>(static_cast<opm>(g[c]), xi, mc[c], sc[c], sh[c], alpha);
            pa[c] += dz;
            pq[c] += dz * (xi - mc[c]);
            o[c] = static_cast<scalar_t>(dz * pe[c]);
          }
        }
      }
      double* out = partial.data() + size_t(k) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        out[c] = pa[c];
        out[C + c] = pq[c];
      }
    }
  });
  std::vector<opm> kp(C), kq(C), ko(C);
  for (int64_t c = 0; c < C; ++c) {
    double s_dz = 0, s_dzx = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      s_dz += partial[size_t(k) * 2 * C + c];
      s_dzx += partial[size_t(k) * 2 * C + C + c];
    }
    finish_channel(s_dz, s_dzx, double(mean[c]), invstd[c], w ? double(w[c]) : 1.0, double(L.count()), training,
                   db[c], dw[c], kp[c], kq[c], ko[c]);
  }
  if (!training) return;
  const opm* __restrict__ pp = kp.data();
  const opm* __restrict__ pq = kq.data();
  const opm* __restrict__ po = ko.data();
  const opm* __restrict__ mc = mean;
  at::parallel_for(0, R, grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ g = gy + r * C;
      const scalar_t* __restrict__ xv = x + r * C;
      scalar_t* __restrict__ o = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const opm xi = static_cast<opm>(xv[c]);
        const opm dz = grad_z<ACT>(static_cast<opm>(g[c]), xi, mc[c], sc[c], sh[c], alpha);
        o[c] = static_cast<scalar_t>(dz * pp[c] + xi * pq[c] + po[c]);
      }
    }
  });
}

// Returns (dx, dweight, dbias); the parameter gradients in the op-math type (float32 / float64).
std::vector<Tensor> batch_norm_act_backward(const Tensor& grad_out, const Tensor& x,
                                            const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                            const Tensor& mean_t, const Tensor& var_t, bool training, double eps,
                                            int64_t act, double alpha) {
  TORCH_CHECK(x.device().is_cpu(), "batch_norm_act: x must be a CPU tensor");
  const Layout L = layout_of(x);
  check_like_x(grad_out, x, L, "grad_out");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t C = L.c;
  Tensor w = channel_vector(weight, acc, C, "weight"), b = channel_vector(bias, acc, C, "bias");
  Tensor mean = channel_vector(mean_t, acc, C, "mean"), var = channel_vector(var_t, acc, C, "var");
  Tensor dx = at::empty_like(x);
  Tensor dw = at::zeros({C}, x.options().dtype(acc)), db = at::zeros({C}, x.options().dtype(acc));
  if (x.numel() == 0) return {dx, dw, db};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_act_backward", [&] {
    using opm = opmath_t<scalar_t>;
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t ACT = decltype(act_c)::value;
      auto run = L.planar ? backward_planar<scalar_t, ACT> : backward_rows<scalar_t, ACT>;
      run(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), L, training,
          ptr_or_null<opm>(w), ptr_or_null<opm>(b), mean.data_ptr<opm>(), var.data_ptr<opm>(), dw.data_ptr<opm>(),
          db.data_ptr<opm>(), eps, static_cast<opm>(alpha));
    });
  });
  return {dx, dw, db};
}


// nn.BatchNorm's running-statistics update, in place: r = (1 - f) r + f s with the unbiased batch
// variance var * n / (n - 1); f = momentum, or 1 / num_batches_tracked (the cumulative average) when
// that tensor is given. Arithmetic in double, stored in the running statistics' dtype.
void batch_norm_update_running_stats(Tensor running_mean, Tensor running_var, const Tensor& mean, const Tensor& var,
                                     int64_t count, double momentum,
                                     const std::optional<Tensor>& num_batches_tracked) {
  TORCH_CHECK(running_mean.device().is_cpu() && running_var.device().is_cpu(),
              "batch_norm_act: running statistics must be CPU tensors");
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "batch_norm_act: running statistics must be contiguous");
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "batch_norm_act: running_mean and running_var must share a dtype");
  TORCH_CHECK(count > 1, "batch_norm_act: the unbiased variance needs more than one value per channel");
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_var.numel() == C && mean.numel() == C && var.numel() == C,
              "batch_norm_act: statistics must have one value per channel");
  const double f = num_batches_tracked.has_value() ? 1.0 / num_batches_tracked->item<double>() : momentum;
  const double unbias = double(count) / double(count - 1);
  const Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  const double* pm = m.data_ptr<double>();
  const double* pv = v.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "batch_norm_update", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = static_cast<scalar_t>(f * pm[c] + (1.0 - f) * double(rm[c]));
      rv[c] = static_cast<scalar_t>(f * pv[c] * unbias + (1.0 - f) * double(rv[c]));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Eager autograd in C++ (as LinearActFn in layers.cpp): the same kernels and gradient structure as
// the torch.library ops of fastgan/ops/batch_norm_act.py (which torch.compile uses), without the
// per-call cost of Python autograd.Functions. The backward is BatchNormActBackwardFn, whose own
// backward re-derives (dx, dweight, dbias) with the reference formulas in differentiable ATen ops
// and differentiates them (as _backward_backward in Python): R1 / gradient penalties work.
// Absent weight / bias / statistics travel as empty tensors plus a flag (an undefined tensor cannot be
// a Function input; an empty one can also be a real zero-channel tensor).
// ---------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> present(const Tensor& t, bool has) { return has ? std::optional<Tensor>(t) : std::nullopt; }

at::MemoryFormat memory_format_of(const Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

Tensor act_reference(const Tensor& z, int64_t act, double alpha) {
  switch (act) {
    case kActLinear: return z;
    case kActRelu: return at::relu(z);
    case kActLrelu: return at::leaky_relu(z, alpha);
    case kActTanh: return at::tanh(z);
    case kActSigmoid: return at::sigmoid(z);
    default: TORCH_CHECK(false, "unknown activation id ", act);
  }
  return z;
}

// The settings both BatchNorm Functions' backward passes read back.
void save_settings(AutogradContext* ctx, bool training, double eps, int64_t act, double alpha, bool has_w, bool has_b) {
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["act"] = act;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["has_w"] = has_w;
  ctx->saved_data["has_b"] = has_b;
}

struct BatchNormActBackwardFn : public torch::autograd::Function<BatchNormActBackwardFn> {
  static variable_list forward(AutogradContext* ctx, Tensor grad_out, Tensor x, Tensor weight, Tensor bias,
                               Tensor mean, Tensor var, bool training, double eps, int64_t act, double alpha,
                               bool has_w, bool has_b) {
    auto r = batch_norm_act_backward(grad_out, x, present(weight, has_w), present(bias, has_b), mean, var, training,
                                     eps, act, alpha);
    if (has_w && r[1].scalar_type() != weight.scalar_type()) r[1] = r[1].to(weight.scalar_type());
    if (has_b && r[2].scalar_type() != bias.scalar_type()) r[2] = r[2].to(bias.scalar_type());
    ctx->save_for_backward({grad_out, x, weight, bias, mean, var});
    save_settings(ctx, training, eps, act, alpha, has_w, has_b);
    return {r[0], r[1], r[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    const auto saved = ctx->get_saved_variables();
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble(), alpha = ctx->saved_data["alpha"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const bool has_w = ctx->saved_data["has_w"].toBool(), has_b = ctx->saved_data["has_b"].toBool();
    const bool create = at::GradMode::is_enabled();
    at::AutoGradMode enable(true);
    // Partial derivatives need local variables: differentiating with respect to the saved tensors
    // themselves would also follow their own history (grad_out usually depends on this op's output,
    // hence on x), counting those paths twice and running -- and freeing -- the forward's node from
    // inside its own double backward. A fresh view keeps the result connected to the saved tensor
    // (for a further derivative) while no other path reaches it.
    auto leaf = [](const Tensor& t) { return t.requires_grad() ? t.view_as(t) : t.detach().requires_grad_(true); };
    const Tensor go = leaf(saved[0]), x = leaf(saved[1]);
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t C = x.size(1);
    const Tensor w = has_w ? leaf(saved[2]) : at::ones({C}, x.options().dtype(acc)).requires_grad_(true);
    const Tensor b = has_b ? leaf(saved[3]) : at::zeros({C}, x.options().dtype(acc)).requires_grad_(true);
    // the reference (fastgan/ops/batch_norm_act.py: _reference_core), differentiable
    std::vector<int64_t> dims{0}, shape{1, C};
    for (int64_t d = 2; d < x.dim(); ++d) {
      dims.push_back(d);
      shape.push_back(1);
    }
    const Tensor xf = x.to(acc);
    Tensor mean, var;
    if (training) {
      mean = xf.mean(dims);
      var = xf.var(dims, /*unbiased=*/false);
    } else {
      mean = saved[4].to(acc);
      var = saved[5].to(acc);
    }
    Tensor z = (xf - mean.view(shape)) * at::rsqrt(var.view(shape) + eps);
    z = z * w.to(acc).view(shape) + b.to(acc).view(shape);
    const Tensor y = act_reference(z, act, alpha).to(x.scalar_type());
    const auto first = torch::autograd::grad({y}, {x, w, b}, {go}, /*retain_graph=*/true, /*create_graph=*/true);
    std::vector<Tensor> outs, grads;
    for (int i = 0; i < 3; ++i) {
      if (gg[i].defined() && first[i].defined()) {
        outs.push_back(first[i]);
        grads.push_back(gg[i].to(first[i].scalar_type()));
      }
    }
    std::vector<Tensor> wrt{go, x};
    if (has_w) wrt.push_back(w);
    if (has_b) wrt.push_back(b);
    std::vector<Tensor> res(wrt.size());
    if (!outs.empty()) res = torch::autograd::grad(outs, wrt, grads, /*retain_graph=*/create, create, /*allow_unused=*/true);
    size_t k = 0;
    const Tensor g_go = res[k++], g_x = res[k++];
    const Tensor g_w = has_w ? res[k++] : Tensor();
    const Tensor g_b = has_b ? res[k++] : Tensor();
    return {g_go, g_x, g_w, g_b, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct BatchNormActFn : public torch::autograd::Function<BatchNormActFn> {
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias, Tensor mean_in,
                               Tensor var_in, bool training, double eps, int64_t act, double alpha, bool has_w,
                               bool has_b, bool has_stats) {
    auto r = batch_norm_act_forward(x, present(weight, has_w), present(bias, has_b), present(mean_in, has_stats),
                                    present(var_in, has_stats), training, eps, act, alpha);
    ctx->save_for_backward({x, weight, bias, r[1], r[2]});
    save_settings(ctx, training, eps, act, alpha, has_w, has_b);
    ctx->mark_non_differentiable({r[1], r[2]});
    return {r[0], r[1], r[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor grad_y = grads[0].defined() ? grads[0].contiguous(memory_format_of(x))
                                             : at::zeros_like(x, x.options(), memory_format_of(x));
    const bool has_w = ctx->saved_data["has_w"].toBool(), has_b = ctx->saved_data["has_b"].toBool();
    auto r = BatchNormActBackwardFn::apply(grad_y, x, saved[1], saved[2], saved[3], saved[4],
                                           ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                                           ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble(), has_w,
                                           has_b);
    return {r[0], has_w ? r[1] : Tensor(), has_b ? r[2] : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

void register_batch_norm_act(pybind11::module_& m) {
  m.def("batch_norm_act_autograd",
        [](const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
           const std::optional<Tensor>& mean, const std::optional<Tensor>& var, bool training, double eps,
           int64_t act, double alpha) {
          const auto has = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined(); };
          const auto empty = [&](const std::optional<Tensor>& t) { return has(t) ? *t : at::empty({0}, x.options()); };
          auto r = BatchNormActFn::apply(x, empty(weight), empty(bias), empty(mean), empty(var), training, eps, act,
                                         alpha, has(weight), has(bias), has(mean) && has(var));
          return std::make_tuple(r[0], r[1], r[2]);
        },
        "BatchNorm + activation forward with its backward recorded by C++ autograd nodes (eager CPU path): "
        "(y, mean, biased var)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("mean"),
        pybind11::arg("var"), pybind11::arg("training"), pybind11::arg("eps"), pybind11::arg("act"),
        pybind11::arg("alpha"));
  m.def("batch_norm_act_forward", &batch_norm_act_forward,
        "BatchNorm + activation forward (CPU): (y, mean, biased var); batch statistics when training",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("mean"),
        pybind11::arg("var"), pybind11::arg("training"), pybind11::arg("eps"), pybind11::arg("act"),
        pybind11::arg("alpha"));
  m.def("batch_norm_act_backward", &batch_norm_act_backward,
        "BatchNorm + activation backward (CPU): (dx, dweight, dbias) from the saved input and statistics",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("mean"), pybind11::arg("var"), pybind11::arg("training"), pybind11::arg("eps"),
        pybind11::arg("act"), pybind11::arg("alpha"));
  m.def("batch_norm_update_running_stats", &batch_norm_update_running_stats,
        "nn.BatchNorm's running-statistics update, in place (CPU)", pybind11::arg("running_mean"),
        pybind11::arg("running_var"), pybind11::arg("mean"), pybind11::arg("var"), pybind11::arg("count"),
        pybind11::arg("momentum"), pybind11::arg("num_batches_tracked"));
}

}  // namespace fastgan
