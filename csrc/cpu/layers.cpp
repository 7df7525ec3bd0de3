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
#include <optional>
#include <vector>

#include "cpu/activations.h"

namespace fastgan {
namespace {

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
    if constexpr (CLAMP) v = std::min(std::max(v, -clamp), clamp);
    y[j] = static_cast<scalar_t>(v);
  }
}

// gx = gy * gain * f'(x) [* (|y| < clamp)] with f'(x) recomputed from the saved output
// y = clamp(f(x) * gain), so f(x) = y / gain. Saturated (clamped) outputs pass no gradient.
template <int64_t ACT, bool CLAMP, typename acc_t>
inline acc_t grad_element(acc_t gy, acc_t out, acc_t alpha, acc_t gain, acc_t inv_gain, acc_t clamp) {
  acc_t g = gy * gain * act_grad_from_output_ct<ACT>(out * inv_gain, alpha);
  if constexpr (CLAMP) g = std::abs(out) < clamp ? g : acc_t(0);
  return g;
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

// A plane of n elements sharing one bias: writes gx, returns their sum.
template <int64_t ACT, bool CLAMP, typename scalar_t>
inline acc_type_t<scalar_t> backward_plane(const scalar_t* gy, const scalar_t* y, scalar_t* gx, int64_t n,
                                           acc_type_t<scalar_t> alpha, acc_type_t<scalar_t> gain,
                                           acc_type_t<scalar_t> inv_gain, acc_type_t<scalar_t> clamp) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t g = grad_element<ACT, CLAMP>(acc_t(gy[j]), acc_t(y[j]), alpha, gain, inv_gain, clamp);
    gx[j] = static_cast<scalar_t>(g);
    sum += g;
  }
  return sum;
}

void check_view3d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpu implementation");
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), name, " must be a contiguous (outer, C, inner) view");
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
          at::parallel_for(0, outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) forward_run<ACT, CLAMP, 1>(x + r * C, b.data(), y + r * C, C, a, g, cl);
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
          // Rows in fixed chunks; each chunk sums its rows into its own length-C slot.
          const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
          const int64_t chunks = (outer + grain - 1) / grain;
          std::vector<acc_t> partial(need_bias_grad ? chunks * C : 0, acc_t(0));
          at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t k = c0; k < c1; ++k) {
              acc_t* sums = need_bias_grad ? partial.data() + k * C : nullptr;
              for (int64_t r = k * grain; r < std::min(outer, (k + 1) * grain); ++r)
                backward_row<ACT, CLAMP>(gy + r * C, y + r * C, gx + r * C, sums, C, a, g, ig, cl);
            }
          });
          if (need_bias_grad) {
            scalar_t* gb = grad_bias.data_ptr<scalar_t>();
            for (int64_t c = 0; c < C; ++c) {
              acc_t s = 0;
              for (int64_t k = 0; k < chunks; ++k) s += partial[k * C + c];
              gb[c] = static_cast<scalar_t>(s);
            }
          }
        } else {
          // One sum per (n, c) plane, then over n in order.
          std::vector<acc_t> partial(need_bias_grad ? outer * C : 0, acc_t(0));
          at::parallel_for(0, outer * C, std::max<int64_t>(1, 16384 / inner), [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) {
              const acc_t s = backward_plane<ACT, CLAMP>(gy + p * inner, y + p * inner, gx + p * inner, inner, a, g, ig, cl);
              if (need_bias_grad) partial[p] = s;
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
torch::Tensor linear_act_forward(const torch::Tensor& x, const torch::Tensor& weight,
                                 const std::optional<torch::Tensor>& bias, int64_t act, double alpha, double gain) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x must be (M, K) and weight (N, K)");
  torch::Tensor y = at::mm(x, weight.t());
  const bool has_bias = bias.has_value() && bias->defined();
  if (!has_bias && act == kActLinear && gain == 1.0) return y;
  if (!y.is_contiguous()) y = y.contiguous();
  auto y3 = y.view({y.size(0), y.size(1), 1});
  epilogue(y3, bias, y3, act, alpha, gain, -1.0);
  return y;
}

}  // namespace

void register_layers(pybind11::module_& m) {
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
}

}  // namespace fastgan
