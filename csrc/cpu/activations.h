// The activation table of fastgan/ops/activations.py for the C++ kernels (header only).
// ids: 0 linear, 1 relu, 2 lrelu (alpha = negative slope), 3 tanh, 4 sigmoid. kActNames names them
// (exported as _C.kernel_activations): Python sends an id here only where the name at that id is the
// row's, and runs any other row unfused (the kernel with linear, then the row's torch reference).
// Fusing a new activation: one enum entry, its name in kActNames, one case in each function below,
// and one line in dispatch_act.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/vec_math.h"

namespace fastgan {

enum ActKind : int64_t { kActLinear = 0, kActRelu = 1, kActLrelu = 2, kActTanh = 3, kActSigmoid = 4 };
inline constexpr const char* kActNames[] = {"linear", "relu", "lrelu", "tanh", "sigmoid"};  // by id
static_assert(sizeof(kActNames) / sizeof(kActNames[0]) == kActSigmoid + 1, "one name per ActKind, in id order");

// Compile-time variants: kernels instantiate their inner loop once per activation so the loop has
// no switch in it and the compiler can vectorise the simple cases.
template <int64_t ACT, typename T>
inline T apply_act_ct(T x, T alpha) {
  if constexpr (ACT == kActRelu) {
    return x < T(0) ? T(0) : x;  // NaN stays NaN, as torch.relu
  } else if constexpr (ACT == kActLrelu) {
    return x > T(0) ? x : x * alpha;
  } else if constexpr (ACT == kActTanh) {
    return tanh_float(x);  // vectorisable (cpu/vec_math.h); std::tanh is a scalar library call
  } else if constexpr (ACT == kActSigmoid) {
    return sigmoid_stable(x);
  } else {
    return x;
  }
}

// f'(x) written in y = f(x): the fused backward needs only the saved output.
template <int64_t ACT, typename T>
inline T act_grad_from_output_ct(T y, T alpha) {
  if constexpr (ACT == kActRelu) {
    return y > T(0) ? T(1) : T(0);
  } else if constexpr (ACT == kActLrelu) {
    return y > T(0) ? T(1) : alpha;  // alpha >= 0, so y > 0 exactly where x > 0
  } else if constexpr (ACT == kActTanh) {
    return T(1) - y * y;
  } else if constexpr (ACT == kActSigmoid) {
    return y * (T(1) - y);
  } else {
    return T(1);
  }
}

// gy * f'(x) from y = f(x), as torch's backward of the row computes it: a product, except for relu,
// whose backward (threshold_backward) selects: 0 where y <= 0 even for a non-finite gy (inf * 0 would
// be NaN), gy where y > 0 or y is NaN. The kernels must call this, not multiply by the rule above.
template <int64_t ACT, typename T>
inline T act_backward_ct(T gy, T y, T alpha) {
  if constexpr (ACT == kActRelu) {
    return y <= T(0) ? T(0) : gy;
  } else {
    return gy * act_grad_from_output_ct<ACT>(y, alpha);
  }
}

// Calls fn(std::integral_constant<int64_t, ACT>{}) for the runtime id act.
template <typename Fn>
inline void dispatch_act(int64_t act, Fn&& fn) {
  switch (act) {
    case kActLinear: fn(std::integral_constant<int64_t, kActLinear>{}); break;
    case kActRelu: fn(std::integral_constant<int64_t, kActRelu>{}); break;
    case kActLrelu: fn(std::integral_constant<int64_t, kActLrelu>{}); break;
    case kActTanh: fn(std::integral_constant<int64_t, kActTanh>{}); break;
    case kActSigmoid: fn(std::integral_constant<int64_t, kActSigmoid>{}); break;
    default: TORCH_CHECK(false, "unknown activation id ", act);
  }
}

// Runtime variants (the contract other kernels code against).
template <typename T>
inline T apply_act(T x, T alpha, int64_t act) {
  switch (act) {
    case kActLinear: return apply_act_ct<kActLinear>(x, alpha);
    case kActRelu: return apply_act_ct<kActRelu>(x, alpha);
    case kActLrelu: return apply_act_ct<kActLrelu>(x, alpha);
    case kActTanh: return apply_act_ct<kActTanh>(x, alpha);
    case kActSigmoid: return apply_act_ct<kActSigmoid>(x, alpha);
    default: TORCH_CHECK(false, "unknown activation id ", act);
  }
  return x;
}

template <typename T>
inline T act_grad_from_output(T y, T alpha, int64_t act) {
  switch (act) {
    case kActLinear: return act_grad_from_output_ct<kActLinear>(y, alpha);
    case kActRelu: return act_grad_from_output_ct<kActRelu>(y, alpha);
    case kActLrelu: return act_grad_from_output_ct<kActLrelu>(y, alpha);
    case kActTanh: return act_grad_from_output_ct<kActTanh>(y, alpha);
    case kActSigmoid: return act_grad_from_output_ct<kActSigmoid>(y, alpha);
    default: TORCH_CHECK(false, "unknown activation id ", act);
  }
  return T(1);
}

// The same rules as differentiable ATen ops on whole tensors (s: the activation's output), for the
// double-backward formulas: act_grad_from_output_aten(s) = f'(x) and act_grad2_from_output_aten(s)
// = d f'(x(s)) / ds, as the grad_from_output / grad2_from_output columns of the Python table.
inline at::Tensor act_grad_from_output_aten(const at::Tensor& s, double alpha, int64_t act) {
  switch (act) {
    case kActLinear: return at::ones_like(s);
    case kActRelu: return (s > 0).to(s.scalar_type());
    case kActLrelu: return (s > 0).to(s.scalar_type()) * (1.0 - alpha) + alpha;
    case kActTanh: return 1.0 - s * s;
    case kActSigmoid: return s * (1.0 - s);
    default: TORCH_CHECK(false, "unknown activation id ", act);
  }
  return s;
}

inline at::Tensor act_grad2_from_output_aten(const at::Tensor& s, double alpha, int64_t act) {
  switch (act) {
    case kActLinear:
    case kActRelu:
    case kActLrelu: return at::zeros_like(s);
    case kActTanh: return -2.0 * s;
    case kActSigmoid: return 1.0 - 2.0 * s;
    default: TORCH_CHECK(false, "unknown activation id ", act);
  }
  return s;
}

}  // namespace fastgan
