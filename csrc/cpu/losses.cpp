// The fused log-D losses on CPU: loss, the game's statistics and d loss / d logits in one pass
// over the logits. Mirrors fastgan/ops/losses.py (the reference) and fastgan/ops/triton/losses.py.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "cpu/vec_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastgan {
namespace {

// Loss kinds, in the order of fastgan.ops.losses.LOSS_KINDS.
enum LossKind : int64_t { kMinimax = 0, kNonSaturating = 1, kHinge = 2, kWasserstein = 3, kLeastSquares = 4 };

// exp_nonpositive / log1p_unit (cpu/vec_math.h): branch-free, so that the loops below vectorise.

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

// Logits per chunk of the parallel loops: each chunk reduces into its own slot (deterministic sums).
constexpr int64_t kGrain = 4096;

// Runs body(c0, c1) over the chunks [0, chunks): inline for one chunk (at GAN batch sizes the
// OpenMP team start-up of at::parallel_for costs more than the whole loop), else in parallel.
template <typename Body>
inline void run_chunks(int64_t chunks, const Body& body) {
  if (chunks <= 1) {
    body(0, chunks);
  } else {
    at::parallel_for(0, chunks, 1, body);
  }
}

// Per-element sums that make up the loss and the statistics of one side (real or fake).
struct SideSums {
  double loss = 0, softplus_term = 0, sigmoid = 0, nonfinite = 0;
};

// A loss term of one logit and its derivative. Returned by value: out-parameters would be
// addressable locals, which OpenMP simd turns into per-lane arrays and the loop stops vectorising.
template <typename T> struct TermGrad {
  T term, grad;
};

// The D loss term of one logit; KIND and REAL are template parameters so the element loop has no
// branch on them.
template <int64_t KIND, bool REAL, typename T>
inline TermGrad<T> d_term(T v, const SoftplusSigmoid<T>& ss) {
  if constexpr (KIND == kMinimax || KIND == kNonSaturating) {  // -log D(x), -log(1 - D(G(z)))
    return REAL ? TermGrad<T>{ss.softplus_neg, -ss.sigmoid_neg} : TermGrad<T>{ss.softplus_pos, ss.sigmoid};
  } else if constexpr (KIND == kHinge) {
    if constexpr (REAL) return {v < T(1) ? T(1) - v : T(0), v < T(1) ? T(-1) : T(0)};
    else return {v > T(-1) ? T(1) + v : T(0), v > T(-1) ? T(1) : T(0)};
  } else if constexpr (KIND == kWasserstein) {
    return REAL ? TermGrad<T>{-v, T(-1)} : TermGrad<T>{v, T(1)};
  } else {  // least squares: targets 1 (real) and 0 (fake)
    const T d = REAL ? v - T(1) : v;
    return {T(0.5) * d * d, d};
  }
}

// One side of the discriminator loss: writes d(mean term)/d(logit) into grad (when WRITE_GRAD) and
// returns the sums. Fixed chunks reduce into their own slots, so results are deterministic.
// The pointers and the scale are copied into (__restrict) locals inside the parallel body: read
// through the lambda's by-reference captures, GCC reloads them every iteration and either
// vectorises the loop with gathers and scatters or not at all (each ~8x slower).
template <int64_t KIND, bool REAL, bool WRITE_GRAD, typename scalar_t, typename acc_t>
SideSums d_side(const scalar_t* x, acc_t* grad, int64_t n) {
  const acc_t inv_n = acc_t(1) / acc_t(n);
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<SideSums> partial(chunks);
  const auto chunk_range = [&](int64_t c0, int64_t c1) {
    const scalar_t* __restrict xs = x;
    acc_t* __restrict gs = grad;
    const acc_t scale = inv_n;  // a local too: a captured float may alias the float stores
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kGrain, hi = std::min(n, lo + kGrain);
      acc_t s_loss = 0, s_sp = 0, s_sig = 0, s_bad = 0;
#pragma omp simd reduction(+ : s_loss, s_sp, s_sig, s_bad)
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t v = static_cast<acc_t>(xs[i]);
        const auto ss = softplus_sigmoid(v);
        const auto [term, g] = d_term<KIND, REAL>(v, ss);
        const bool finite = (v - v) == acc_t(0);  // false for NaN and +-inf
        s_bad += finite ? acc_t(0) : acc_t(1);
        s_loss += term;
        // value term: log D(x) for real = -softplus(-v); log(1 - D(G(z))) for fake = -softplus(v)
        s_sp += REAL ? ss.softplus_neg : ss.softplus_pos;
        s_sig += ss.sigmoid;
        if constexpr (WRITE_GRAD) gs[i] = finite ? g * scale : nan;
      }
      partial[c] = SideSums{double(s_loss), double(s_sp), double(s_sig), double(s_bad)};
    }
  };
  run_chunks(chunks, chunk_range);
  SideSums total;
  for (const auto& p : partial) {
    total.loss += p.loss; total.softplus_term += p.softplus_term; total.sigmoid += p.sigmoid; total.nonfinite += p.nonfinite;
  }
  return total;
}

template <bool REAL, typename scalar_t, typename acc_t, int64_t KIND>
SideSums d_side_grad_or_not(const scalar_t* x, acc_t* grad, int64_t n) {
  return grad ? d_side<KIND, REAL, true, scalar_t, acc_t>(x, grad, n)
              : d_side<KIND, REAL, false, scalar_t, acc_t>(x, grad, n);
}

template <bool REAL, typename scalar_t, typename acc_t>
SideSums d_side_of_kind(const scalar_t* x, acc_t* grad, int64_t n, int64_t kind) {
  switch (kind) {
    case kMinimax: return d_side_grad_or_not<REAL, scalar_t, acc_t, kMinimax>(x, grad, n);
    case kNonSaturating: return d_side_grad_or_not<REAL, scalar_t, acc_t, kNonSaturating>(x, grad, n);
    case kHinge: return d_side_grad_or_not<REAL, scalar_t, acc_t, kHinge>(x, grad, n);
    case kWasserstein: return d_side_grad_or_not<REAL, scalar_t, acc_t, kWasserstein>(x, grad, n);
    default: return d_side_grad_or_not<REAL, scalar_t, acc_t, kLeastSquares>(x, grad, n);
  }
}

// The generator's loss term of one logit and its derivative.
template <int64_t KIND, typename T>
inline TermGrad<T> g_term(T v, const SoftplusSigmoid<T>& ss) {
  if constexpr (KIND == kMinimax) return {-ss.softplus_pos, -ss.sigmoid};                 // minimise log(1 - D)
  else if constexpr (KIND == kNonSaturating) return {ss.softplus_neg, -ss.sigmoid_neg};  // maximise log D
  else if constexpr (KIND == kHinge || KIND == kWasserstein) return {-v, T(-1)};
  else { const T d = v - T(1); return {T(0.5) * d * d, d}; }
}

struct GSums {
  double loss = 0, nonfinite = 0;
};

template <int64_t KIND, bool WRITE_GRAD, typename scalar_t, typename acc_t>
GSums g_side(const scalar_t* x, acc_t* grad, int64_t n) {
  const acc_t inv_n = acc_t(1) / acc_t(n);
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<GSums> partial(chunks);
  const auto chunk_range = [&](int64_t c0, int64_t c1) {
    const scalar_t* __restrict xs = x;  // see d_side: locals, not captures, so the loop vectorises
    acc_t* __restrict gs = grad;
    const acc_t scale = inv_n;
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kGrain, hi = std::min(n, lo + kGrain);
      acc_t s = 0, bad = 0;
#pragma omp simd reduction(+ : s, bad)
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t v = static_cast<acc_t>(xs[i]);
        // Only the log-D kinds need exp / log1p.
        const auto ss = (KIND == kMinimax || KIND == kNonSaturating) ? softplus_sigmoid(v) : SoftplusSigmoid<acc_t>{};
        const auto [term, g] = g_term<KIND>(v, ss);
        const bool finite = (v - v) == acc_t(0);
        bad += finite ? acc_t(0) : acc_t(1);
        s += term;
        if constexpr (WRITE_GRAD) gs[i] = finite ? g * scale : nan;
      }
      partial[c] = GSums{double(s), double(bad)};
    }
  };
  run_chunks(chunks, chunk_range);
  GSums total;
  for (const auto& p : partial) { total.loss += p.loss; total.nonfinite += p.nonfinite; }
  return total;
}

template <typename scalar_t, typename acc_t, int64_t KIND>
GSums g_side_grad_or_not(const scalar_t* x, acc_t* grad, int64_t n) {
  return grad ? g_side<KIND, true, scalar_t, acc_t>(x, grad, n) : g_side<KIND, false, scalar_t, acc_t>(x, grad, n);
}

template <typename scalar_t, typename acc_t>
GSums g_side_of_kind(const scalar_t* x, acc_t* grad, int64_t n, int64_t kind) {
  switch (kind) {
    case kMinimax: return g_side_grad_or_not<scalar_t, acc_t, kMinimax>(x, grad, n);
    case kNonSaturating: return g_side_grad_or_not<scalar_t, acc_t, kNonSaturating>(x, grad, n);
    case kHinge: return g_side_grad_or_not<scalar_t, acc_t, kHinge>(x, grad, n);
    case kWasserstein: return g_side_grad_or_not<scalar_t, acc_t, kWasserstein>(x, grad, n);
    default: return g_side_grad_or_not<scalar_t, acc_t, kLeastSquares>(x, grad, n);
  }
}

void check_logits(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpu implementation");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.numel() > 0, name, " must be a non-empty contiguous 1-D tensor");
}

void check_kind(int64_t kind) { TORCH_CHECK(kind >= 0 && kind <= 4, "unknown loss kind ", kind); }

at::ScalarType acc_type_of(const torch::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The D loss, the four statistics (as doubles) and, when asked, the gradients -- in the accumulation
// dtype (float32, float64 for float64 logits): bf16 / fp16 would round d loss / d logit (~1/n) into
// their subnormals for large n, and a loss scale (GradScaler's 65536) multiplied in fp16 overflows.
// The backward scales them in that dtype and casts the result to the logits' dtype.
struct DLossResult {
  double loss, value, jsd, d_real, d_fake;
  torch::Tensor grad_real, grad_fake;
};

DLossResult d_loss_compute(const torch::Tensor& real, const torch::Tensor& fake, int64_t kind, bool need_grad) {
  check_logits(real, "real_logits");
  check_logits(fake, "fake_logits");
  TORCH_CHECK(real.scalar_type() == fake.scalar_type(), "real_logits and fake_logits must share a dtype");
  check_kind(kind);
  DLossResult out{};
  const auto acc = real.options().dtype(acc_type_of(real));
  out.grad_real = torch::empty({need_grad ? real.numel() : 0}, acc);
  out.grad_fake = torch::empty({need_grad ? fake.numel() : 0}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real.scalar_type(), "d_loss_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const SideSums r = d_side_of_kind<true, scalar_t, acc_t>(
        real.data_ptr<scalar_t>(), need_grad ? out.grad_real.data_ptr<acc_t>() : nullptr, real.numel(), kind);
    const SideSums f = d_side_of_kind<false, scalar_t, acc_t>(
        fake.data_ptr<scalar_t>(), need_grad ? out.grad_fake.data_ptr<acc_t>() : nullptr, fake.numel(), kind);
    const double nr = double(real.numel()), nf = double(fake.numel());
    out.loss = r.loss / nr + f.loss / nf;
    out.value = -(r.softplus_term / nr + f.softplus_term / nf);
    out.jsd = 0.5 * (out.value + std::log(4.0));
    out.d_real = r.sigmoid / nr;
    out.d_fake = f.sigmoid / nf;
    if (r.nonfinite + f.nonfinite > 0) {  // never hide a NaN/inf logit behind a finite mean
      out.loss = out.value = out.jsd = out.d_real = out.d_fake = std::numeric_limits<double>::quiet_NaN();
    }
  });
  return out;
}

// A 0-d tensor of the accumulation dtype holding value (no dispatcher round trip for a fill).
torch::Tensor scalar_of(double value, const torch::TensorOptions& options) {
  auto t = torch::empty({}, options);
  if (options.dtype() == caffe2::TypeMeta::Make<double>()) {
    *t.data_ptr<double>() = value;
  } else {
    *t.data_ptr<float>() = static_cast<float>(value);
  }
  return t;
}

// For torch.library (fastgan::d_loss): (stats, grad_real, grad_fake); stats = [loss, value, jsd,
// d_real, d_fake] in the accumulation dtype (float64 for float64 logits, float32 otherwise).
std::vector<torch::Tensor> d_loss_forward(const torch::Tensor& real, const torch::Tensor& fake, int64_t kind,
                                          bool need_grad) {
  auto r = d_loss_compute(real, fake, kind, need_grad);
  auto stats = torch::empty({5}, real.options().dtype(acc_type_of(real)));
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "d_loss_stats", [&] {
    auto* s = stats.data_ptr<scalar_t>();
    s[0] = scalar_t(r.loss); s[1] = scalar_t(r.value); s[2] = scalar_t(r.jsd); s[3] = scalar_t(r.d_real);
    s[4] = scalar_t(r.d_fake);
  });
  return {stats, r.grad_real, r.grad_fake};
}

// For torch.library (fastgan::g_loss): (loss, grad_fake).
std::vector<torch::Tensor> g_loss_forward(const torch::Tensor& fake, int64_t kind, bool need_grad) {
  check_logits(fake, "fake_logits");
  check_kind(kind);
  auto grad = torch::empty({need_grad ? fake.numel() : 0}, fake.options().dtype(acc_type_of(fake)));  // see DLossResult
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "g_loss_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const GSums s = g_side_of_kind<scalar_t, acc_t>(fake.data_ptr<scalar_t>(),
                                                    need_grad ? grad.data_ptr<acc_t>() : nullptr, fake.numel(), kind);
    loss = s.nonfinite > 0 ? std::numeric_limits<double>::quiet_NaN() : s.loss / double(fake.numel());
  });
  return {scalar_of(loss, fake.options().dtype(acc_type_of(fake))), grad};
}

// ---------------------------------------------------------------------------------------------
// Eager autograd in C++ (used by fastgan.ops.d_loss / g_loss for impl="cpu" outside torch.compile):
// the same kernels, without the Python autograd.Function, whose forward and backward calls cost
// ~10x the whole op at GAN batch sizes. The backward scales the gradient computed in the forward
// pass. Under create_graph (double backward, e.g. a penalty on the loss's input gradient) it
// recomputes that gradient from the logits with differentiable ATen ops instead, so the second
// derivative is right rather than silently zero.
// ---------------------------------------------------------------------------------------------

using torch::autograd::variable_list;

// d (mean term) / d logits for one side, differentiable; +-inf and NaN logits give NaN, as in the
// fused kernels ((x - x) is 0 for finite x and NaN otherwise, with a zero derivative).
torch::Tensor side_grad_aten(const torch::Tensor& x, int64_t kind, bool real, bool generator) {
  const double inv_n = 1.0 / double(x.numel());
  torch::Tensor g;
  if (generator) {
    switch (kind) {
      case kMinimax: g = -torch::sigmoid(x); break;
      case kNonSaturating: g = -torch::sigmoid(-x); break;
      case kHinge:
      case kWasserstein: g = torch::full_like(x, -1.0); break;
      default: g = x - 1.0;
    }
  } else {
    switch (kind) {
      case kMinimax:
      case kNonSaturating: g = real ? -torch::sigmoid(-x) : torch::sigmoid(x); break;
      case kHinge: g = real ? -(x < 1.0).to(x.scalar_type()) : (x > -1.0).to(x.scalar_type()); break;
      case kWasserstein: g = torch::full_like(x, real ? -1.0 : 1.0); break;
      default: g = real ? x - 1.0 : x;
    }
  }
  return (g + (x - x)) * inv_n;
}

// (The 1-D case skips the dispatcher round trips: they cost as much as the loop at GAN batch sizes.)
torch::Tensor flat_contiguous(const torch::Tensor& x) {
  return x.dim() == 1 ? x.contiguous() : x.reshape({-1}).contiguous();
}
torch::Tensor shaped_like(const torch::Tensor& flat, const torch::Tensor& like) {
  return like.dim() == 1 ? flat : flat.view(like.sizes());
}

// The losses' autograd node, written against torch::autograd::Node directly (as torch's generated
// backward nodes are) instead of through torch::autograd::Function, whose apply() bookkeeping
// (saved-variable packing, the IValue map, output wrapping) cost as much as the fused kernel at
// GAN batch sizes. The four statistics stay plain tensors outside autograd.
//
// The forward pass already computed d loss / d logits. The first backward hands those tensors to
// autograd, scaled in place by the incoming gradient unless it is exactly 1 (loss.backward()), so
// AccumulateGrad takes them over as .grad without an allocation or a copy. A second backward
// through a retained graph recomputes them with the same kernel; under create_graph (double
// backward: a penalty on the loss's input gradient) they are recomputed from the logits with
// differentiable ATen ops, so the second derivative is right rather than silently zero.
struct LossBackward : public torch::autograd::Node {
  LossBackward(int64_t kind, bool generator, const std::vector<torch::Tensor>& inputs,
               std::vector<torch::Tensor> grads_from_forward)
      : kind(kind), generator(generator), grads(std::move(grads_from_forward)) {
    set_next_edges(torch::autograd::collect_next_edges(inputs));
    for (const auto& x : inputs) logits.emplace_back(x, /*is_output=*/false);
  }

  int64_t kind;
  bool generator;                                    // G's loss (one input: fake) or D's (real, fake)
  std::vector<torch::autograd::SavedVariable> logits;
  std::vector<torch::Tensor> grads;                  // from the forward; empty once handed over

  std::string name() const override { return generator ? "GLossBackward" : "DLossBackward"; }

  void release_variables() override {
    for (auto& saved : logits) saved.reset_data();
    grads.clear();
  }

  variable_list apply(variable_list&& incoming) override {
    const torch::Tensor& g = incoming[0];
    if (!g.defined()) return variable_list(logits.size());  // a zero incoming gradient: none out
    std::vector<torch::Tensor> xs;
    for (auto& saved : logits) xs.push_back(saved.unpack());
    variable_list out(xs.size());
    if (torch::GradMode::is_enabled()) {  // create_graph: differentiable recomputation
      for (size_t i = 0; i < xs.size(); ++i) {
        const bool real = !generator && i == 0;
        // In the accumulation dtype, as the fused kernels keep it (see DLossResult): with fp16 logits
        // type promotion would cast the 0-d g to fp16 (a loss scale of 65536 is inf there), and ~1/n
        // would round into fp16's subnormals.
        const auto grad = side_grad_aten(xs[i].to(acc_type_of(xs[i])), kind, real, generator);
        out[i] = (g * grad).to(xs[i].scalar_type());
      }
      return out;
    }
    std::vector<torch::Tensor> d = std::move(grads);
    grads.clear();
    if (d.empty()) d = recompute(xs);
    const bool unit = g.numel() == 1 && g.device().is_cpu() && scalar_value(g) == 1.0;
    for (size_t i = 0; i < xs.size(); ++i) {
      // d is in the accumulation dtype: scaled there, then cast (no copy for float32 / float64 logits).
      out[i] = (unit ? std::move(d[i]) : d[i].mul_(g)).to(xs[i].scalar_type());
    }
    return out;
  }

 private:
  std::vector<torch::Tensor> recompute(const std::vector<torch::Tensor>& xs) const {
    if (generator) return {shaped_like(g_loss_forward(flat_contiguous(xs[0]), kind, true)[1], xs[0])};
    auto r = d_loss_compute(flat_contiguous(xs[0]), flat_contiguous(xs[1]), kind, true);
    return {shaped_like(r.grad_real, xs[0]), shaped_like(r.grad_fake, xs[1])};
  }

  static double scalar_value(const torch::Tensor& t) {
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) return *t.const_data_ptr<float>();
    if (t.scalar_type() == at::kDouble && t.is_contiguous()) return *t.const_data_ptr<double>();
    return t.item<double>();
  }
};

// The pointer type autograd holds nodes by: std::shared_ptr<Node> up to torch 2.12,
// c10::intrusive_ptr<Node> from 2.13 on (the GPU image runs 2.11, CI 2.13).
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// Attach a LossBackward to loss: the logits saved, their gradients handed over at backward.
void attach_loss_node(torch::Tensor& loss, int64_t kind, bool generator, const std::vector<torch::Tensor>& inputs,
                      std::vector<torch::Tensor> grads) {
  NodePtr node = make_node<LossBackward>(kind, generator, inputs, std::move(grads));
  torch::autograd::set_history(loss, node);
}

bool needs_grad(std::initializer_list<const torch::Tensor*> inputs) {
  if (!torch::GradMode::is_enabled()) return false;
  for (const auto* t : inputs) {
    if (t->requires_grad()) return true;
  }
  return false;
}

// (loss, value, jsd, d_real, d_fake): only loss carries a gradient.
std::vector<torch::Tensor> d_loss_autograd(const torch::Tensor& real, const torch::Tensor& fake, int64_t kind) {
  const bool need_grad = needs_grad({&real, &fake});
  auto r = d_loss_compute(flat_contiguous(real), flat_contiguous(fake), kind, need_grad);
  const auto opts = real.options().dtype(acc_type_of(real));
  auto loss = scalar_of(r.loss, opts);
  if (need_grad) {
    attach_loss_node(loss, kind, /*generator=*/false, {real, fake},
                     {shaped_like(r.grad_real, real), shaped_like(r.grad_fake, fake)});
  }
  return {loss, scalar_of(r.value, opts), scalar_of(r.jsd, opts), scalar_of(r.d_real, opts), scalar_of(r.d_fake, opts)};
}

torch::Tensor g_loss_autograd(const torch::Tensor& fake, int64_t kind) {
  const bool need_grad = needs_grad({&fake});
  auto r = g_loss_forward(flat_contiguous(fake), kind, need_grad);
  if (need_grad) attach_loss_node(r[0], kind, /*generator=*/true, {fake}, {shaped_like(r[1], fake)});
  return r[0];
}

}  // namespace

void register_losses(pybind11::module_& m) {
  m.def("d_loss_forward", &d_loss_forward, "D loss, statistics and gradients in one pass (CPU)",
        pybind11::arg("real"), pybind11::arg("fake"), pybind11::arg("kind"), pybind11::arg("need_grad"));
  m.def("g_loss_forward", &g_loss_forward, "G loss and gradient in one pass (CPU)",
        pybind11::arg("fake"), pybind11::arg("kind"), pybind11::arg("need_grad"));
  m.def("d_loss_autograd", &d_loss_autograd, "d_loss with a C++ autograd node: (loss, value, jsd, d_real, d_fake)",
        pybind11::arg("real"), pybind11::arg("fake"), pybind11::arg("kind"));
  m.def("g_loss_autograd", &g_loss_autograd, "g_loss with a C++ autograd node",
        pybind11::arg("fake"), pybind11::arg("kind"));
}

}  // namespace fastgan
