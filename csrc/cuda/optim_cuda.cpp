// torch glue for csrc/cuda/optim.cu (compiled only when torch has CUDA): validates the tensors, takes
// the current stream and calls the C ABI. Registered from register_optim (csrc/cpu/optim.cpp), whose
// functions forward CUDA tensors here, so Python calls the same names on every device.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>

extern "C" {
int fastgan_optim_nonfinite_check(const void* grad, int dtype, int64_t n, const float* inv_scale, float* found_inf,
                                  cudaStream_t stream);
int fastgan_optim_adam(void* param, const void* grad, int dtype, float* exp_avg, float* exp_avg_sq, int64_t n,
                       float* steps, int64_t steps_count, float* found_inf, int check_nonfinite,
                       const float* inv_scale, const double* lr_ptr, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int decoupled, float* ema_shadow, double ema_beta, cudaStream_t stream);
int fastgan_optim_sgd(void* param, const void* grad, int dtype, float* momentum_buffer, int64_t n, float* steps,
                      int64_t steps_count, float* found_inf, int check_nonfinite, const float* inv_scale,
                      const double* lr_ptr, double lr, double momentum, double dampening, int nesterov,
                      double weight_decay, float* ema_shadow, double ema_beta, cudaStream_t stream);
}

namespace fastgan {
namespace cuda {
namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, name, " must be float32 or bfloat16 on CUDA, got ", t.scalar_type());
  return -1;
}

void check_buffer(const at::Tensor& t, const char* name, const at::Tensor& like, bool fp32_only) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == like.numel(), name, " must have ", like.numel(), " elements, got ", t.numel());
  if (fp32_only) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  }
}

float* device_scalar(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == at::kFloat && t.numel() >= 1 &&
                  t.is_contiguous(),
              name, " must be a contiguous float32 tensor on ", like.device());
  return t.data_ptr<float>();
}

const float* optional_scalar(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& like) {
  return t.has_value() ? device_scalar(*t, name, like) : nullptr;
}

// A tensor lr on the device is read by the kernel (so graph replays see scheduler updates); a CPU
// tensor is read here (no device synchronisation). The device lr is float64, as the float lr of an
// eager step is: a float32 copy of 2e-4 would move lr / bias_correction by an ulp now and then, and
// a replayed step would not repeat the eager one bit for bit.
const double* lr_pointer(const c10::optional<at::Tensor>& lr_tensor, double& lr, const at::Tensor& like) {
  if (!lr_tensor.has_value()) return nullptr;
  if (!lr_tensor->is_cuda()) {
    lr = lr_tensor->item<double>();
    return nullptr;
  }
  const at::Tensor& t = *lr_tensor;
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == at::kDouble && t.numel() == 1 && t.is_contiguous(),
              "lr tensor must be a one-element float64 tensor on ", like.device(), ", got ", t.scalar_type(), " on ",
              t.device(), " (numel ", t.numel(), ")");
  return t.data_ptr<double>();
}

void check_status(int err, const char* what) {
  TORCH_CHECK(err == 0, "fastgan ", what, " CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

void optim_nonfinite_check(const at::Tensor& grad, const c10::optional<at::Tensor>& inv_scale,
                           const at::Tensor& found_inf) {
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous(), "grad must be a contiguous CUDA tensor");
  const int dtype = dtype_code(grad, "grad");
  c10::cuda::CUDAGuard guard(grad.device());
  check_status(fastgan_optim_nonfinite_check(grad.data_ptr(), dtype, grad.numel(),
                                             optional_scalar(inv_scale, "inv_scale", grad),
                                             device_scalar(found_inf, "found_inf", grad),
                                             at::cuda::getCurrentCUDAStream().stream()),
               "optim_nonfinite_check");
}

void optim_adam_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& steps, const at::Tensor& found_inf,
                     const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& lr_tensor,
                     double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                     const c10::optional<at::Tensor>& ema_shadow, double ema_beta, bool check_nonfinite) {
  TORCH_CHECK(param.is_cuda() && param.is_contiguous(), "param must be a contiguous CUDA tensor");
  const int dtype = dtype_code(param, "param");
  check_buffer(grad, "grad", param, false);
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "grad dtype must match param dtype");
  check_buffer(exp_avg, "exp_avg", param, true);
  check_buffer(exp_avg_sq, "exp_avg_sq", param, true);
  if (ema_shadow.has_value()) check_buffer(*ema_shadow, "ema_shadow", param, true);
  c10::cuda::CUDAGuard guard(param.device());
  const double* lr_ptr = lr_pointer(lr_tensor, lr, param);
  check_status(
      fastgan_optim_adam(param.data_ptr(), grad.data_ptr(), dtype, exp_avg.data_ptr<float>(),
                         exp_avg_sq.data_ptr<float>(), param.numel(), device_scalar(steps, "steps", param),
                         steps.numel(), device_scalar(found_inf, "found_inf", param), check_nonfinite ? 1 : 0,
                         optional_scalar(inv_scale, "inv_scale", param), lr_ptr, lr, beta1, beta2, eps, weight_decay,
                         decoupled ? 1 : 0, ema_shadow.has_value() ? ema_shadow->data_ptr<float>() : nullptr, ema_beta,
                         at::cuda::getCurrentCUDAStream().stream()),
      "optim_adam_step");
}

void optim_sgd_step(const at::Tensor& param, const at::Tensor& grad,
                    const c10::optional<at::Tensor>& momentum_buffer, const at::Tensor& steps,
                    const at::Tensor& found_inf, const c10::optional<at::Tensor>& inv_scale,
                    const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                    bool nesterov, double weight_decay, const c10::optional<at::Tensor>& ema_shadow,
                    double ema_beta, bool check_nonfinite) {
  TORCH_CHECK(param.is_cuda() && param.is_contiguous(), "param must be a contiguous CUDA tensor");
  const int dtype = dtype_code(param, "param");
  check_buffer(grad, "grad", param, false);
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "grad dtype must match param dtype");
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "momentum != 0 needs a momentum_buffer");
  if (momentum_buffer.has_value()) check_buffer(*momentum_buffer, "momentum_buffer", param, true);
  if (ema_shadow.has_value()) check_buffer(*ema_shadow, "ema_shadow", param, true);
  c10::cuda::CUDAGuard guard(param.device());
  const double* lr_ptr = lr_pointer(lr_tensor, lr, param);
  check_status(
      fastgan_optim_sgd(param.data_ptr(), grad.data_ptr(), dtype,
                        momentum_buffer.has_value() ? momentum_buffer->data_ptr<float>() : nullptr, param.numel(),
                        device_scalar(steps, "steps", param), steps.numel(),
                        device_scalar(found_inf, "found_inf", param), check_nonfinite ? 1 : 0,
                        optional_scalar(inv_scale, "inv_scale", param), lr_ptr, lr, momentum, dampening,
                        nesterov ? 1 : 0, weight_decay, ema_shadow.has_value() ? ema_shadow->data_ptr<float>() : nullptr,
                        ema_beta, at::cuda::getCurrentCUDAStream().stream()),
      "optim_sgd_step");
}

}  // namespace cuda
}  // namespace fastgan
