// Fused layer epilogues on CPU: bias + activation * gain (+ clamp) after a GEMM or a convolution,
// and the matching backward (gradient through the activation recomputed from the saved output,
// fused with the bias-gradient reduction). Mirrors fastgan/ops/bias_act.py and linear_act.py
// (the references) and fastgan/ops/triton/{bias_act,linear_act}.py.
//
// Tensors arrive as contiguous 3-D views (outer, C, inner) with the bias along C: (rows, features, 1)
// for linear layers and channels_last maps, (N, C, H*W) for NCHW maps. Python prepares the views.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "cpu/activations.h"

namespace at {
namespace native {
// oneDNN's matmul, which ATen's own mm uses for bf16 / fp16 (declared in ATen/native/mkldnn/Matmul.h,
// not among the installed headers). Weak: null where this libtorch was built without it.
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace fastgan {
namespace {

// Which GEMM the fp32 linear layers use: ATen's mm (MKL here) or oneDNN's matmul. On this project's
// CPU (AMD Zen 4, torch's MKL) oneDNN's fp32 GEMM ran 10-25% faster at 256-1024 features; for tiny
// products its per-call cost is larger, so "auto" keeps ATen there.
enum GemmBackend : int64_t { kGemmAuto = 0, kGemmAten = 1, kGemmOneDnn = 2 };
int64_t g_gemm_backend = kGemmAuto;
constexpr int64_t kOneDnnMinProduct = int64_t(1) << 24;  // M * N * K: 256 x 256 x 256

bool onednn_available() { return &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN(); }

// a @ b (2-D, any strides) as a new contiguous tensor. oneDNN only for float32, outside autograd
// recording (it is not an ATen op: a graph built through it would not be differentiable).
torch::Tensor gemm(const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  bool onednn = g_gemm_backend != kGemmAten && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                M > 0 && N > 0 && K > 0 && onednn_available() &&
                (!at::GradMode::is_enabled() || (!a.requires_grad() && !b.requires_grad()));
  if (onednn && g_gemm_backend == kGemmAuto) onednn = M * N * K >= kOneDnnMinProduct;
  if (!onednn) return at::mm(a, b);
  auto out = at::empty({M, N}, a.options().memory_format(at::MemoryFormat::Contiguous));
  at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
  return out;
}

template <typename T> using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// y = clamp(act(x + b) * gain) over n contiguous elements: with one bias each (BIAS_STRIDE 1, a row
// of features) or one bias for all (BIAS_STRIDE 0, a plane of an NCHW map). Branch-free so that the
// compiler vectorises the float / double loops.
template <int64_t ACT, bool CLAMP, int BIAS_STRIDE, typename scalar_t>
inline void forward_run(const scalar_t* x, const acc_type_t<scalar_t>* bias, scalar_t* y, int64_t n,
                        acc_type_t<scalar_t> alpha, acc_type_t<scalar_t> gain, acc_type_t<scalar_t> clamp) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    acc_t v = apply_act_ct<ACT>(static_cast<acc_t>(x[j]) + bias[j * BIAS_STRIDE], alpha) * gain;
    if constexpr (CLAMP) v = v > clamp ? clamp : (v < -clamp ? -clamp : v);  // NaN stays NaN
    y[j] = static_cast<scalar_t>(v);
  }
}

// gx = gy * gain * f'(x) [* (|y| < clamp)] with f'(x) recomputed from the saved output
// y = clamp(f(x) * gain), so f(x) = y / gain. Saturated (clamped) outputs pass no gradient.
// In torch's order (the reference's autograd): the clamp's mask selects gy first (a non-finite gy at a
// saturated output gives 0), then gain, then the activation's backward (so a NaN output still gives
// NaN through tanh / sigmoid, as 0 * f'(NaN) does there).
template <int64_t ACT, bool CLAMP, typename acc_t>
inline acc_t grad_element(acc_t gy, acc_t out, acc_t alpha, acc_t gain, acc_t inv_gain, acc_t clamp) {
  if constexpr (CLAMP) gy = std::abs(out) < clamp ? gy : acc_t(0);
  return act_backward_ct<ACT>(gy * gain, out * inv_gain, alpha);
}

// A row of C features: writes gx and, when sums is given, adds gx into sums[0..C).
template <int64_t ACT, bool CLAMP, typename scalar_t>
inline void backward_row(const scalar_t* gy, const scalar_t* y, scalar_t* gx, acc_type_t<scalar_t>* sums, int64_t n,
                         acc_type_t<scalar_t> alpha, acc_type_t<scalar_t> gain, acc_type_t<scalar_t> inv_gain,
                         acc_type_t<scalar_t> clamp) {
  using acc_t = acc_type_t<scalar_t>;
  if (sums) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t g = grad_element<ACT, CLAMP>(acc_t(gy[j]), acc_t(y[j]), alpha, gain, inv_gain, clamp);
      gx[j] = static_cast<scalar_t>(g);
      sums[j] += g;
    }
  } else {
    for (int64_t j = 0; j < n; ++j)
      gx[j] = static_cast<scalar_t>(grad_element<ACT, CLAMP>(acc_t(gy[j]), acc_t(y[j]), alpha, gain, inv_gain, clamp));
  }
}

// A plane of n elements sharing one bias: writes gx and, with SUM, returns their sum (else 0).
// The sum is an OpenMP simd reduction: without it the compiler must add the elements in order, one
// dependent add per element (measured: the whole backward of a 32x16x32x32 LeakyReLU map 3.5x
// slower than eager's); a bias-free layer skips it altogether.
template <int64_t ACT, bool CLAMP, bool SUM, typename scalar_t>
inline acc_type_t<scalar_t> backward_plane(const scalar_t* __restrict gy, const scalar_t* __restrict y,
                                           scalar_t* __restrict gx, int64_t n, acc_type_t<scalar_t> alpha,
                                           acc_type_t<scalar_t> gain, acc_type_t<scalar_t> inv_gain,
                                           acc_type_t<scalar_t> clamp) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t sum = 0;
  if constexpr (SUM) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t g = grad_element<ACT, CLAMP>(acc_t(gy[j]), acc_t(y[j]), alpha, gain, inv_gain, clamp);
      gx[j] = static_cast<scalar_t>(g);
      sum += g;
    }
  } else {
    for (int64_t j = 0; j < n; ++j)
      gx[j] = static_cast<scalar_t>(grad_element<ACT, CLAMP>(acc_t(gy[j]), acc_t(y[j]), alpha, gain, inv_gain, clamp));
  }
  return sum;
}

void check_view3d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpu implementation");
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), name, " must be a contiguous (outer, C, inner) view");
}

// Rows of C features handled per call of the row loops: enough for a few vectors' worth of
// elements when rows are short (C = 3 for an RGB channels_last output), 1 for wide rows.
inline int64_t rows_per_run(int64_t C) { return C >= 256 ? 1 : std::max<int64_t>(1, 256 / std::max<int64_t>(C, 1)); }

// The bias vector repeated k times (for runs of k rows).
template <typename T>
std::vector<T> tiled(const std::vector<T>& b, int64_t k) {
  std::vector<T> out;
  out.reserve(b.size() * k);
  for (int64_t t = 0; t < k; ++t) out.insert(out.end(), b.begin(), b.end());
  return out;
}

// Bias as a float/double vector of length C (zeros when absent): the loops then need no branch.
template <typename scalar_t>
std::vector<acc_type_t<scalar_t>> bias_vector(const std::optional<torch::Tensor>& bias, int64_t C) {
  std::vector<acc_type_t<scalar_t>> out(C, acc_type_t<scalar_t>(0));
  if (bias.has_value() && bias->defined()) {
    const auto b = bias->contiguous();
    TORCH_CHECK(b.numel() == C, "bias must have ", C, " elements, got ", b.numel());
    const scalar_t* p = b.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_type_t<scalar_t>>(p[c]);
  }
  return out;
}

// y3 = clamp(act(x3 + bias) * gain); x3 and y3 may alias (in-place epilogue after a GEMM).
void epilogue(const torch::Tensor& x3, const std::optional<torch::Tensor>& bias, torch::Tensor& y3, int64_t act,
              double alpha, double gain, double clamp) {
  const int64_t outer = x3.size(0), C = x3.size(1), inner = x3.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "fastgan_bias_act_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto b = bias_vector<scalar_t>(bias, C);
    const scalar_t* x = x3.data_ptr<scalar_t>();
    scalar_t* y = y3.data_ptr<scalar_t>();
    const acc_t a = acc_t(alpha), g = acc_t(gain), cl = acc_t(clamp);
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t ACT = decltype(act_c)::value;
      auto run = [&](auto clamp_c) {
        constexpr bool CLAMP = decltype(clamp_c)::value;
        if (inner == 1) {  // rows of C features: one bias per column
          // Runs of k whole rows against the bias tiled k times: a channels_last map with 3
          // channels (G's RGB output) would otherwise be a 3-element loop per pixel (no vectors).
          const int64_t k = rows_per_run(C);
          const auto bk = tiled(b, k);
          const int64_t runs = (outer + k - 1) / k;
          at::parallel_for(0, runs, std::max<int64_t>(1, 16384 / (k * std::max<int64_t>(C, 1))), [&](int64_t q0, int64_t q1) {
            const scalar_t* __restrict xs = x;
            scalar_t* __restrict ys = y;
            for (int64_t q = q0; q < q1; ++q) {
              const int64_t r = q * k, rows = std::min(k, outer - r);
              forward_run<ACT, CLAMP, 1>(xs + r * C, bk.data(), ys + r * C, rows * C, a, g, cl);
            }
          });
        } else {  // planes of `inner` elements sharing one bias
          at::parallel_for(0, outer * C, std::max<int64_t>(1, 16384 / inner), [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p)
              forward_run<ACT, CLAMP, 0>(x + p * inner, b.data() + p % C, y + p * inner, inner, a, g, cl);
          });
        }
      };
      if (clamp >= 0) run(std::true_type{}); else run(std::false_type{});
    });
  });
}

// bias_act forward: writes y3 (a view of the output Python allocated with x's layout).
void bias_act_forward(const torch::Tensor& x3, const std::optional<torch::Tensor>& bias, torch::Tensor y3,
                      int64_t act, double alpha, double gain, double clamp) {
  check_view3d(x3, "x");
  check_view3d(y3, "out");
  TORCH_CHECK(x3.sizes() == y3.sizes() && x3.scalar_type() == y3.scalar_type(), "x and out must match");
  epilogue(x3, bias, y3, act, alpha, gain, clamp);
}

// bias_act backward: writes gx3 and returns d loss / d bias (length C, empty when not needed).
// The bias sums use a fixed chunking (independent of the thread count): results are deterministic.
torch::Tensor bias_act_backward(const torch::Tensor& gy3, const torch::Tensor& y3, torch::Tensor gx3,
                                bool need_bias_grad, int64_t act, double alpha, double gain, double clamp) {
  check_view3d(gy3, "grad_out");
  check_view3d(y3, "out");
  check_view3d(gx3, "grad_x");
  TORCH_CHECK(gy3.sizes() == y3.sizes() && gx3.sizes() == y3.sizes(), "grad_out, out and grad_x must match");
  TORCH_CHECK(gy3.scalar_type() == y3.scalar_type() && gx3.scalar_type() == y3.scalar_type(),
              "grad_out, out and grad_x must share a dtype");
  TORCH_CHECK(gain != 0.0, "gain must be non-zero");
  const int64_t outer = y3.size(0), C = y3.size(1), inner = y3.size(2);
  torch::Tensor grad_bias = need_bias_grad ? torch::empty({C}, y3.options()) : torch::empty({0}, y3.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y3.scalar_type(), "fastgan_bias_act_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* gy = gy3.data_ptr<scalar_t>();
    const scalar_t* y = y3.data_ptr<scalar_t>();
    scalar_t* gx = gx3.data_ptr<scalar_t>();
    const acc_t a = acc_t(alpha), g = acc_t(gain), ig = acc_t(1.0 / gain), cl = acc_t(clamp);
    dispatch_act(act, [&](auto act_c) {
      constexpr int64_t ACT = decltype(act_c)::value;
      auto run = [&](auto clamp_c) {
        constexpr bool CLAMP = decltype(clamp_c)::value;
        if (inner == 1) {
          // Rows in fixed chunks (a multiple of k rows); each chunk sums runs of k rows into its
          // own slot of k * C sums (see the forward: vectors even for 3 channels), folded at the end.
          const int64_t k = rows_per_run(C), width = k * C;
          const int64_t grain = k * std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
          const int64_t chunks = (outer + grain - 1) / grain;
          std::vector<acc_t> partial(need_bias_grad ? chunks * width : 0, acc_t(0));
          at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t chunk = c0; chunk < c1; ++chunk) {
              acc_t* sums = need_bias_grad ? partial.data() + chunk * width : nullptr;
              const int64_t end = std::min(outer, (chunk + 1) * grain);
              for (int64_t r = chunk * grain; r < end; r += k) {
                const int64_t n = std::min(k, end - r) * C;
                backward_row<ACT, CLAMP>(gy + r * C, y + r * C, gx + r * C, sums, n, a, g, ig, cl);
              }
            }
          });
          if (need_bias_grad) {
            scalar_t* gb = grad_bias.data_ptr<scalar_t>();
            for (int64_t c = 0; c < C; ++c) {
              acc_t s = 0;
              for (int64_t chunk = 0; chunk < chunks; ++chunk)
                for (int64_t t = 0; t < k; ++t) s += partial[chunk * width + t * C + c];
              gb[c] = static_cast<scalar_t>(s);
            }
          }
        } else {
          // One sum per (n, c) plane, then over n in order.
          std::vector<acc_t> partial(need_bias_grad ? outer * C : 0, acc_t(0));
          at::parallel_for(0, outer * C, std::max<int64_t>(1, 16384 / inner), [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) {
              if (need_bias_grad) {
                partial[p] = backward_plane<ACT, CLAMP, true>(gy + p * inner, y + p * inner, gx + p * inner, inner,
                                                              a, g, ig, cl);
              } else {
                backward_plane<ACT, CLAMP, false>(gy + p * inner, y + p * inner, gx + p * inner, inner, a, g, ig, cl);
              }
            }
          });
          if (need_bias_grad) {
            scalar_t* gb = grad_bias.data_ptr<scalar_t>();
            for (int64_t c = 0; c < C; ++c) {
              acc_t s = 0;
              for (int64_t n = 0; n < outer; ++n) s += partial[n * C + c];
              gb[c] = static_cast<scalar_t>(s);
            }
          }
        }
      };
      if (clamp >= 0) run(std::true_type{}); else run(std::false_type{});
    });
  });
  return grad_bias;
}

// linear_act forward: y = act(x @ weight.T + bias) * gain with ATen's GEMM (beta = 0, so no copy of
// the bias into the output first) and the bias, activation and gain in one in-place pass after it.
// bf16 / fp16: the bias goes into the GEMM instead (addmm, as F.linear): it is added to the float32
// accumulator before the one rounding to the output dtype. Added after the GEMM it would meet an
// already rounded product: a second rounding, which flips relu kinks of pre-activations near 0 and
// loses the bits that cancel when bias ~ -x @ weight.T (what torch under autocast does not do).
torch::Tensor linear_act_forward(const torch::Tensor& x, const torch::Tensor& weight,
                                 const std::optional<torch::Tensor>& bias, int64_t act, double alpha, double gain) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x must be (M, K) and weight (N, K)");
  const bool has_bias = bias.has_value() && bias->defined();
  const bool low_precision = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool bias_in_gemm = has_bias && low_precision;
  torch::Tensor y = bias_in_gemm ? at::addmm(*bias, x, weight.t()) : gemm(x, weight.t());
  const std::optional<torch::Tensor> epilogue_bias = bias_in_gemm ? std::nullopt : bias;
  if (!(has_bias && !bias_in_gemm) && act == kActLinear && gain == 1.0) return y;
  if (!y.is_contiguous()) y = y.contiguous();
  auto y3 = y.view({y.size(0), y.size(1), 1});
  epilogue(y3, epilogue_bias, y3, act, alpha, gain, -1.0);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Eager autograd in C++: the same kernels as the custom ops of fastgan/ops/{bias_act,linear_act}.py
// with the same backward structure (the backward is BiasActGradFn, a fused kernel whose own backward
// is differentiable ATen ops), without the per-call cost of Python autograd.Functions, which at GAN
// layer sizes is as large as the fused element-wise work. Python uses these for impl="cpu" in eager
// mode and the torch.library custom ops under torch.compile.
// ---------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (grad_x3, grad_bias) of bias_act from the saved output; differentiable again through ATen ops.
struct BiasActGradFn : public torch::autograd::Function<BiasActGradFn> {
  static variable_list forward(AutogradContext* ctx, torch::Tensor gy3, torch::Tensor y3, bool need_bias_grad,
                               int64_t act, double alpha, double gain, double clamp) {
    auto gx3 = torch::empty_like(y3);
    auto gb = bias_act_backward(gy3.contiguous(), y3, gx3, need_bias_grad, act, alpha, gain, clamp);
    ctx->save_for_backward({gy3, y3});
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["gain"] = gain;
    ctx->saved_data["clamp"] = clamp;
    return {gx3, gb};
  }

  // grad_x = gy * gain * f'(s) * mask with s = y / gain: d/d gy = u * gain * f'(s) * mask and
  // d/d y = u * gy * f''(s) * mask, u = incoming grad of grad_x + that of grad_bias broadcast over C.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& gy3 = saved[0];
    const auto& y3 = saved[1];
    const int64_t act = ctx->saved_data["act"].toInt();
    const double alpha = ctx->saved_data["alpha"].toDouble(), gain = ctx->saved_data["gain"].toDouble();
    const double clamp = ctx->saved_data["clamp"].toDouble();
    torch::Tensor u = grads[0].defined() ? grads[0] : torch::zeros_like(y3);
    if (grads[1].defined() && grads[1].numel() > 0) u = u + grads[1].view({1, -1, 1});
    const auto s = y3 / gain;
    auto d_gy = u * gain * act_grad_from_output_aten(s, alpha, act);
    auto d_y = u * gy3 * act_grad2_from_output_aten(s, alpha, act);
    if (clamp >= 0) {
      const auto unsaturated = (y3.abs() < clamp).to(y3.scalar_type());
      d_gy = d_gy * unsaturated;
      d_y = d_y * unsaturated;
    }
    return {d_gy, d_y, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// What BiasActFn and BiasActInplaceFn share: the fused pass x3 -> y3 (y3 may be x3: each output
// element depends on its own input only) with the settings their backward reads, and that backward
// ((grad_x3, grad_bias or undefined) from the saved output y3).
void bias_act_forward_recorded(AutogradContext* ctx, const torch::Tensor& x3, const torch::Tensor& bias,
                               torch::Tensor& y3, int64_t act, double alpha, double gain, double clamp,
                               double clamp_threshold) {
  const bool has_bias = bias.numel() > 0;  // x3 is never empty here (Python checks)
  std::optional<torch::Tensor> b;
  if (has_bias) b = bias;
  epilogue(x3, b, y3, act, alpha, gain, clamp);
  ctx->saved_data["act"] = act;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["gain"] = gain;
  ctx->saved_data["clamp"] = clamp_threshold;
  ctx->saved_data["has_bias"] = has_bias;
}

variable_list bias_act_backward_recorded(AutogradContext* ctx, const torch::Tensor& gy3, const torch::Tensor& y3) {
  const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(1);
  auto r = BiasActGradFn::apply(gy3, y3, need_bias, ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble(),
                                ctx->saved_data["gain"].toDouble(), ctx->saved_data["clamp"].toDouble());
  return {r[0], need_bias ? r[1] : torch::Tensor()};
}

// bias_act on an (outer, C, inner) view; saves only the output.
struct BiasActFn : public torch::autograd::Function<BiasActFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x3, torch::Tensor bias, int64_t act,
                               double alpha, double gain, double clamp, double clamp_threshold) {
    auto y3 = torch::empty_like(x3);
    bias_act_forward_recorded(ctx, x3, bias, y3, act, alpha, gain, clamp, clamp_threshold);
    ctx->save_for_backward({y3});
    return y3;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = bias_act_backward_recorded(ctx, grads[0], ctx->get_saved_variables()[0]);
    return {g[0], g[1], torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// The (outer, C, inner) view of a dense N-d map with channels at dim 1, NC... or channels_last(_3d):
// what the kernels read. Undefined for other layouts (the caller then takes the out-of-place path).
torch::Tensor channel_view3d(const torch::Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1), inner = t.numel() / std::max<int64_t>(1, n * c);
  if (t.is_contiguous()) return t.view({n, c, inner});
  const auto layout = t.dim() == 4 ? at::MemoryFormat::ChannelsLast
                      : t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  if (layout == at::MemoryFormat::Contiguous || !t.is_contiguous(layout)) return torch::Tensor();
  return t.as_strided({n * inner, c, 1}, {c, 1, 1});
}

// ``t`` (dense, in some layout) in the layout of ``like`` (a copy only when they differ).
torch::Tensor in_layout_of(const torch::Tensor& t, const torch::Tensor& like) {
  if (like.is_contiguous()) return t.contiguous();
  return t.contiguous(like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

// bias_act in place on a convolution's fresh output (the fused Conv*dAct modules): the activation
// pass writes where the convolution wrote, as eager's LeakyReLU(inplace=True) does, instead of into
// a new map (on this VM a fresh 2 MB output costs more in first-touch page faults than the pass
// itself). Safe because the convolution's backward needs its input and weight, not its output, and
// this backward needs only the activated output. Saves that output; backward as BiasActFn's.
struct BiasActInplaceFn : public torch::autograd::Function<BiasActInplaceFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor y, torch::Tensor bias, int64_t act, double alpha,
                               double gain, double clamp, double clamp_threshold) {
    auto y3 = channel_view3d(y);
    TORCH_CHECK(y3.defined(), "bias_act_: the map must be contiguous or channels_last");
    bias_act_forward_recorded(ctx, y3, bias, y3, act, alpha, gain, clamp, clamp_threshold);
    ctx->mark_dirty({y});
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto y = ctx->get_saved_variables()[0];
    auto g = bias_act_backward_recorded(ctx, channel_view3d(in_layout_of(grads[0], y)), channel_view3d(y));
    // g[0] is a contiguous (outer, C, inner) tensor: back to y's shape and layout, as a view.
    auto gx = y.is_contiguous() ? g[0].view(y.sizes()) : g[0].as_strided(y.sizes(), y.strides());
    return {gx, g[1], torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// linear_act; saves x, weight and the output. Backward: BiasActGradFn, then ATen's GEMM twice.
struct LinearActFn : public torch::autograd::Function<LinearActFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                               int64_t act, double alpha, double gain) {
    const bool has_bias = bias.numel() > 0 || weight.size(0) == 0;  // an empty bias: none (or no features)
    std::optional<torch::Tensor> b;
    if (bias.numel() > 0) b = bias;
    auto y = linear_act_forward(x, weight, b, act, alpha, gain);
    ctx->save_for_backward({x, weight, y});
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["gain"] = gain;
    ctx->saved_data["has_bias"] = has_bias;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1], &y = saved[2];
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const int64_t M = y.size(0), N = y.size(1);
    auto r = BiasActGradFn::apply(grads[0].reshape({M, N, 1}), y.view({M, N, 1}), need_b,
                                  ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble(),
                                  ctx->saved_data["gain"].toDouble(), -1.0);
    const auto grad_z = r[0].view({M, N});
    // gemm: oneDNN or ATen; ATen's (differentiable) mm whenever create_graph records these products.
    return {need_x ? gemm(grad_z, weight) : torch::Tensor(), need_w ? gemm(grad_z.t(), x) : torch::Tensor(),
            need_b ? r[1] : torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

void register_layers(pybind11::module_& m) {
  m.def("kernel_activations",
        [] { return std::vector<std::string>(std::begin(kActNames), std::end(kActNames)); },
        "The activations the C++ kernels compute, by id (csrc/cpu/activations.h); Python fuses only these.");
  m.def("linear_gemm_backend",
        [](const std::string& backend) {
          const std::string previous = g_gemm_backend == kGemmAten ? "aten" : g_gemm_backend == kGemmOneDnn ? "onednn" : "auto";
          if (backend == "auto") g_gemm_backend = kGemmAuto;
          else if (backend == "aten") g_gemm_backend = kGemmAten;
          else if (backend == "onednn") {
            if (!onednn_available()) throw pybind11::value_error("linear_gemm_backend: this torch has no oneDNN matmul");
            g_gemm_backend = kGemmOneDnn;
          } else if (!backend.empty()) {
            throw pybind11::value_error("linear_gemm_backend: expected 'auto', 'aten' or 'onednn', got '" + backend + "'");
          }
          return previous;
        },
        "Sets which GEMM the CPU linear_act uses for float32 ('auto', 'aten' = torch.mm, 'onednn'); returns the "
        "previous setting ('' only reads it)", pybind11::arg("backend") = std::string());
  m.def("linear_onednn_available", &onednn_available, "whether oneDNN's matmul can serve linear_act (CPU)");
  m.def("bias_act_forward", &bias_act_forward, "out = clamp(act(x + bias) * gain) on (outer, C, inner) views (CPU)",
        pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("out"), pybind11::arg("act"), pybind11::arg("alpha"),
        pybind11::arg("gain"), pybind11::arg("clamp"));
  m.def("bias_act_backward", &bias_act_backward,
        "grad_x (written) and grad_bias (returned) of bias_act from the saved output (CPU)",
        pybind11::arg("grad_out"), pybind11::arg("out"), pybind11::arg("grad_x"), pybind11::arg("need_bias_grad"),
        pybind11::arg("act"), pybind11::arg("alpha"), pybind11::arg("gain"), pybind11::arg("clamp"));
  m.def("linear_act_forward", &linear_act_forward, "act(x @ weight.T + bias) * gain: ATen GEMM + one fused pass (CPU)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("act"),
        pybind11::arg("alpha"), pybind11::arg("gain"));
  m.def("linear_act_autograd",
        [](const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias, int64_t act,
           double alpha, double gain) {
          // no bias: an empty tensor (an undefined one cannot be an autograd Function input)
          return LinearActFn::apply(x, weight, bias.value_or(torch::empty({0}, x.options())), act, alpha, gain);
        },
        "linear_act with its backward recorded by a C++ autograd node (eager CPU path)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("act"), pybind11::arg("alpha"),
        pybind11::arg("gain"));
  m.def("bias_act_inplace_autograd",
        [](const torch::Tensor& y, const std::optional<torch::Tensor>& bias, int64_t act, double alpha, double gain,
           double clamp, double clamp_threshold) {
          TORCH_CHECK(y.device().is_cpu() && y.dim() >= 3, "y must be a CPU map of at least 3 dims");
          return BiasActInplaceFn::apply(y, bias.value_or(torch::empty({0}, y.options())), act, alpha, gain, clamp,
                                         clamp_threshold);
        },
        "bias_act in place on a fresh convolution output (channels at dim 1; contiguous or channels_last), "
        "backward recorded by a C++ autograd node (eager CPU path of the fused convolution modules)",
        pybind11::arg("y"), pybind11::arg("bias"), pybind11::arg("act"), pybind11::arg("alpha"), pybind11::arg("gain"),
        pybind11::arg("clamp"), pybind11::arg("clamp_threshold"));
  m.def("bias_act_autograd",
        [](const torch::Tensor& x3, const std::optional<torch::Tensor>& bias, int64_t act, double alpha, double gain,
           double clamp, double clamp_threshold) {
          check_view3d(x3, "x");
          return BiasActFn::apply(x3, bias.value_or(torch::empty({0}, x3.options())), act, alpha, gain, clamp,
                                  clamp_threshold);
        },
        "bias_act on an (outer, C, inner) view with its backward recorded by a C++ autograd node (eager CPU path)",
        pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("act"), pybind11::arg("alpha"), pybind11::arg("gain"),
        pybind11::arg("clamp"), pybind11::arg("clamp_threshold"));
}

}  // namespace fastgan
