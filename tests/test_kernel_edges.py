"""Edge cases of the fast kernels against the plain-PyTorch reference (impl="ref", torch autograd):
non-finite values and the kinks of the activations, element for element (NaN where the reference
has NaN, 0 where it has 0). The C++ CPU kernels (csrc/cpu/layers.cpp, batch_norm_act.cpp,
activations.h, vec_math.h) and, where the rule is the activation table's (relu's selecting backward,
the clamp's mask), the Triton kernels through the interpreter. Small shapes: the whole file runs in
seconds. The ``run_*`` helpers take an impl and a device: tests/gpu/test_kernel_edges_gpu.py runs
them on CUDA for the compiled Triton kernels."""
import pytest
import torch

from fastgan._dispatch import extension
from fastgan.ops import batch_norm_act, bias_act, linear_act

CPU = pytest.param("cpu", marks=pytest.mark.skipif(extension() is None, reason="fastgan._C is not built"))
FAST_IMPLS = [CPU, "triton"]

NAN, INF = float("nan"), float("inf")


def same(actual, expected, rtol=1e-5, atol=1e-6):
    """Equal NaN pattern, and close elsewhere (infinities equal)."""
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(grad_out)
    return [y.detach()] + [t.grad for t in leaves]


def both(fn, inputs, grad_out, impl="cpu"):
    """(impl, ref) results of fn(impl, *inputs): output and input gradients."""
    return (grads(lambda *t: fn(impl, *t), inputs, grad_out), grads(lambda *t: fn("ref", *t), inputs, grad_out))


def compare(fn, inputs, grad_out, impl, rtol=1e-5, atol=1e-6, finite=False):
    """fn(impl, ...) against fn("ref", ...): outputs and input gradients, NaN for NaN (finite: none at all)."""
    for a, r in zip(*both(fn, inputs, grad_out, impl)):
        if finite:
            assert torch.isfinite(a).all()
        same(a, r, rtol=rtol, atol=atol)


# x values around the kinks and where tanh / sigmoid saturate or overflow, each met by every grad_out value
SPECIAL_X = [0.0, -0.0, NAN, INF, -INF, 1e-40, -1e-40, 20.0, -20.0, 1.0, -1.0, 3e38, -3e38, 0.3, -0.3]
SPECIAL_GY = [1.0, NAN, INF, -INF, 0.0, -2.0]


def run_bias_act_special_values(impl, act, gain, clamp, device="cpu", subnormals=True):
    # relu's backward in torch selects (0 where the output is <= 0 even for an infinite grad_out; grad_out
    # where the output is NaN); the clamp's mask applies before the activation's backward (a NaN input of
    # tanh / sigmoid keeps a NaN gradient under a clamp). The kernels multiplied, and masked last.
    xs = [v for v in SPECIAL_X if subnormals or v == 0 or abs(v) >= 1e-37]  # a GPU may flush subnormals
    n, m = len(xs), len(SPECIAL_GY)
    x = torch.tensor(xs, device=device).repeat_interleave(m).view(1, 1, -1)
    gy = torch.tensor(SPECIAL_GY, device=device).repeat(n).view(1, 1, -1)
    if clamp is not None:  # |out| == clamp exactly: the fast path (output only) cannot tell it from saturated
        keep = bias_act(x, None, 1, act, gain=gain, impl="ref").abs().ne(clamp).view(-1)
        x, gy = x[..., keep], gy[..., keep]
    compare(lambda impl, x: bias_act(x, None, 1, act, gain=gain, clamp=clamp, impl=impl), (x,), gy, impl)


def run_bias_act_relu_inactive(impl, layout, device="cpu"):
    # As torch.relu: an inf / NaN gradient (e.g. an overflowed loss scale) at inactive units gives 0 there,
    # not NaN in grad_x and in the bias gradient summed over them.
    x = torch.randn(2, 4, 3, 3, device=device) if layout != "rows" else torch.randn(6, 4, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    b = torch.zeros(4, device=device)
    gy = torch.where(x < 0, torch.full_like(x, INF), torch.randn_like(x))
    gy[0, 0] = NAN
    x[0, 0] = -1.0
    x[-1, -1] = NAN  # a NaN input passes its gradient (torch: NaN <= 0 is false)
    compare(lambda impl, x, b: bias_act(x, b, 1, "relu", impl=impl), (x, b), gy, impl)


def run_linear_act_relu_inactive(impl, device="cpu"):
    x, w, b = (torch.randn(shape, device=device) for shape in ((6, 5), (3, 5), (3,)))
    z = torch.nn.functional.linear(x, w, b)
    gy = torch.where(z < -1e-3, torch.full_like(z, INF), torch.randn_like(z))
    compare(lambda impl, x, w, b: linear_act(x, w, b, "relu", impl=impl), (x, w, b), gy, impl, 1e-5, 1e-5,
            finite=True)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("act", ["linear", "relu", "lrelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("gain", [1.0, -2.0])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_bias_act_non_finite_values_and_gradients(act, gain, clamp, impl):
    run_bias_act_special_values(impl, act, gain, clamp)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_bias_act_relu_blocks_non_finite_grad_where_inactive(layout, impl):
    run_bias_act_relu_inactive(impl, layout)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_linear_act_relu_blocks_non_finite_grad_where_inactive(impl):
    run_linear_act_relu_inactive(impl)


def test_sigmoid_below_minus_87():
    # torch's sigmoid is subnormal down to -ln(float max) = -88.72 and 0 below (exp(-x) overflows there);
    # the kernel flushed to 0 from -87 on (its gradient times an infinite grad_out: NaN, torch: inf).
    x = torch.tensor([-87.0, -87.5, -88.0, -88.5, -88.72283172607422, -88.72283935546875, -89.0, -100.0, -104.5, -INF])
    for gy in (torch.ones_like(x), torch.full_like(x, INF)):
        cpu, ref = both(lambda impl, x: bias_act(x, None, 0, "sigmoid", impl=impl), (x,), gy)
        for a, r in zip(cpu, ref):
            same(a, r, rtol=1e-5, atol=0.0)
    assert bias_act(x, None, 0, "sigmoid", impl="cpu")[:5].gt(0).all()
    x64 = torch.tensor([-709.0, -709.7827128933840, -709.7827128933841, -720.0], dtype=torch.float64)
    torch.testing.assert_close(bias_act(x64, None, 0, "sigmoid", impl="cpu"), torch.sigmoid(x64), rtol=1e-12, atol=0.0)


def _bn(impl, x, w, b, rm, rv, training, act):
    return batch_norm_act(x, w, b, rm.clone(), rv.clone(), training, act=act, impl=impl)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "rows":
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x


@pytest.mark.parametrize("act", ["relu", "lrelu"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_batch_norm_kink_where_x_equals_the_mean(act, training, layout):
    # Where x == mean (and bias 0) the reference's pre-activation is exactly 0: relu's gradient there is
    # 0, lrelu's alpha. The kernels computed x * scale + (b - mean * scale), whose contracted FMA left the
    # rounding error of mean * scale: a tiny z of either sign, so relu passed the gradient (in training,
    # with a constant channel, var = 0 and 1 / sqrt(eps) = 316 made that gx off by hundreds).
    c = 4
    x = torch.randn(2, c, 2, 4)
    values = torch.tensor([0.3, 1.5, -2.75, 0.625])
    # training: constant channels of dyadic values (their batch mean is exact in both paths), one random
    const = [1, 2, 3] if training else [0, 1, 2, 3]
    for k in const:
        x[:, k] = values[k]
    if not training:  # other elements of the channels exactly at the running mean too
        x[0, :, 0, :] = values.view(c, 1)
    x = _layout(x, layout)
    w = torch.tensor([1.7, 0.9, 1.3, 2.1])
    b = torch.zeros(c)
    rm, rv = values.clone(), torch.tensor([0.5, 2.0, 1.1, 0.7])
    gy = torch.randn_like(x)
    cpu, ref = both(lambda impl, x, w, b: _bn(impl, x, w, b, rm, rv, training, act), (x, w, b), gy)
    for a, r in zip(cpu, ref):
        same(a, r, rtol=1e-4, atol=1e-4)


def run_batch_norm_relu_inactive(impl, training, layout, device="cpu"):
    # As torch.relu after the normalisation: inf / NaN gradients at inactive units give 0 there (the
    # kernel's product made them NaN, and the channel sums NaN the whole channel's gradients); a NaN input
    # (eval: its own z only) passes its gradient.
    c = 3
    x = _layout(torch.randn(2, c, 3, 3, device=device), layout)
    w, b = torch.rand(c, device=device) + 0.5, torch.zeros(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    center = x.mean(dim=[d for d in range(x.dim()) if d != 1], keepdim=True) if training else 0.0
    gy = torch.where(x < center - 0.1, torch.full_like(x, INF), torch.randn_like(x))
    gy[(x < center - 0.1) & (torch.rand_like(x) < 0.3)] = NAN
    if not training:
        x = x.clone()
        x[0, 1] = NAN
    compare(lambda impl, x, w, b: _bn(impl, x, w, b, rm, rv, training, "relu"), (x, w, b), gy, impl, 1e-4, 1e-4,
            finite=training)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_batch_norm_relu_blocks_non_finite_grad_where_inactive(training, layout, impl):
    run_batch_norm_relu_inactive(impl, training, layout)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_fused_conv_inplace_path_non_finite(fmt):
    # bias_act_fresh_ (the fused convolution modules' in-place path): the same backward rules.
    from fastgan.ops.bias_act import bias_act_fresh_
    x0 = torch.randn(2, 3, 4, 4)
    x0.view(-1)[3] = NAN
    if fmt is not None:
        x0 = x0.contiguous(memory_format=fmt)
    b0 = torch.randn(3)
    gy = torch.where(x0 + b0.view(1, 3, 1, 1) < 0, torch.full_like(x0, INF), torch.randn_like(x0))
    out = []
    for fresh in (True, False):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        y0 = x * 1.0  # a fresh map, as a convolution's output
        y = bias_act_fresh_(y0, b, "relu", impl="cpu") if fresh else bias_act(y0, b, 1, "relu", impl="ref")
        y.backward(gy)
        out.append([y.detach(), x.grad, b.grad])
    for a, r in zip(*out):
        same(a, r)


def _special_grid():
    n, m = len(SPECIAL_X), len(SPECIAL_GY)
    return torch.tensor(SPECIAL_X).repeat_interleave(m).view(1, 1, -1), torch.tensor(SPECIAL_GY).repeat(n).view(1, 1, -1)


@pytest.mark.parametrize("act", ["linear", "relu", "lrelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("gain", [1.0, -2.0])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_bias_act_grad_reference_non_finite(act, gain, clamp):
    # The Python rule from the saved output (the table's Activation.backward, the clamp's select first) is
    # what the kernels are held to, and what the double backward differentiates: it must equal torch's
    # autograd through the plain ops, NaN for NaN, 0 for 0.
    from fastgan.ops.bias_act import bias_act_grad_reference
    x, gy = _special_grid()
    out = bias_act(x, None, 1, act, gain=gain, clamp=clamp, impl="ref")
    if clamp is not None:
        keep = out.abs().ne(clamp).view(-1)
        x, gy, out = x[..., keep], gy[..., keep], out[..., keep]
    _, expected_gx = grads(lambda x: bias_act(x, None, 1, act, gain=gain, clamp=clamp, impl="ref"), (x,), gy)
    gx, gb = bias_act_grad_reference(gy, out, 1, act, gain=gain, clamp=clamp)
    same(gx, expected_gx)
    same(gb, expected_gx.sum(dim=(0, 2)))


def run_relu_double_backward_infinite_grad_out(impl, clamp, device="cpu"):
    # R1 under fp16 loss scaling can meet an inf grad_out. torch's relu: d(grad_x)/d(grad_out) selects
    # (0 at inactive units) and d(grad_x)/d(x) is 0 everywhere, with no inf * 0 = NaN.
    x = torch.randn(3, 4, 5, device=device)
    gy = torch.where(x < 0, torch.full_like(x, INF), torch.randn_like(x))
    v = torch.randn_like(x)
    results = []
    for path in (impl, "torch"):
        xl, gyl = x.clone().requires_grad_(), gy.clone().requires_grad_()
        y = (torch.relu(xl).clamp(-clamp, clamp) if clamp else torch.relu(xl)) if path == "torch" else \
            bias_act(xl, None, 1, "relu", clamp=clamp, impl=path)
        (gx,) = torch.autograd.grad(y, xl, gyl, create_graph=True)
        d_gy, d_x = torch.autograd.grad(gx, (gyl, xl), v, allow_unused=True)
        results.append((gx.detach(), d_gy, torch.zeros_like(x) if d_x is None else d_x))
    for a, r in zip(*results):
        same(a, r)


@pytest.mark.parametrize("impl", FAST_IMPLS + ["ref"])
@pytest.mark.parametrize("clamp", [None, 3.0])
def test_relu_double_backward_with_infinite_grad_out(impl, clamp):
    run_relu_double_backward_infinite_grad_out(impl, clamp)
