// fastgan._C: small functions over tensors and scalars. Each op family lives in its own
// csrc/cpu/<family>.cpp (and csrc/cuda/ where it has a CUDA path) and registers itself here.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

namespace fastgan {
void register_losses(pybind11::module_& m);
void register_layers(pybind11::module_& m);
void register_optim(pybind11::module_& m);
void register_batch_norm_act(pybind11::module_& m);
}  // namespace fastgan

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgan native kernels (CPU: OpenMP + SIMD; CUDA where built)";
  // A Python exception raised inside a call into torch from here (a saved-tensor hook run by an autograd
  // node's save_for_backward, e.g. torch.utils.checkpoint's _StopRecomputationError) reaches us as a
  // C++ python_error; hand the original exception back to Python instead of pybind11's empty
  // RuntimeError, so callers (checkpoint's early stop included) see what was raised.
  pybind11::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (python_error& e) {
      e.restore();
    }
  });
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
