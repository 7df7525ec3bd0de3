// fastgan._C: small functions over tensors and scalars. Each op family lives in its own
// csrc/cpu/<family>.cpp (and csrc/cuda/ where it has a CUDA path) and registers itself here.
#include <torch/extension.h>

namespace fastgan {
void register_losses(pybind11::module_& m);
void register_layers(pybind11::module_& m);
void register_optim(pybind11::module_& m);
void register_batch_norm_act(pybind11::module_& m);
}  // namespace fastgan

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgan native kernels (CPU: OpenMP + SIMD; CUDA where built)";
#ifdef FASTGAN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  fastgan::register_losses(m);
  fastgan::register_layers(m);
  fastgan::register_optim(m);
  fastgan::register_batch_norm_act(m);
}
