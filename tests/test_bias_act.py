"""fastgan.ops.bias_act: every activation x implementation against plain-PyTorch formulas written
here (values and gradients), layouts (NCHW, channels_last, non-contiguous, any dim), dtypes,
gain/clamp, first- and second-order gradients, and the argument checks. Also the activation table."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from fastgan.ops import ACTIVATIONS, bias_act, resolve_act
from fastgan.ops.bias_act import bias_act_grad_reference, _bias_act_grad_op

IMPLS = ["cpu", "triton"]
ACTS = list(ACTIVATIONS)


def expected(x, b, dim, act, alpha, gain, clamp):
    """The specification, written independently of fastgan (float64)."""
    x = x.double()
    if b is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        x = x + b.double().reshape(shape)
    fn = {"linear": lambda t: t, "relu": torch.relu, "lrelu": lambda t: F.leaky_relu(t, alpha),
          "tanh": torch.tanh, "sigmoid": torch.sigmoid}.get(act, lambda t: ACTIVATIONS[act].ref(t, alpha))
    y = fn(x) * gain
    return y.clamp(-clamp, clamp) if clamp is not None else y


def close(actual, expected_, rtol):
    actual, expected_ = actual.double(), expected_.double()
    atol = rtol * max(1.0, float(expected_.abs().max())) if expected_.numel() else rtol
    torch.testing.assert_close(actual, expected_, rtol=rtol, atol=atol)


def away_from_clamp(x, b, dim, act, alpha, gain, clamp):
    """Resample elements whose pre-clamp value lies within 2% of the clamp: there the rounded output
    of a low-precision dtype cannot tell a saturated element from an unsaturated one."""
    if clamp is None:
        return x
    for _ in range(20):
        pre = expected(x.float(), b, dim, act, alpha, gain, None)
        near = ((pre.abs() - clamp).abs() < 0.02 * clamp)
        if not near.any():
            return x
        x = torch.where(near, torch.randn_like(x), x)
    pytest.fail("could not draw inputs away from the clamp")


# (shape, dim, layout): NCHW batch 1, channels_last, 2-D rows, features last (C > one block),
# an NCHW map larger than one block, a 3-D tensor with the bias in the middle, non-contiguous.
CASES = [
    ((1, 3, 5, 5), 1, "contiguous"),
    ((4, 7, 3, 9), 1, "channels_last"),
    ((6, 37), 1, "contiguous"),
    ((3, 5, 130), -1, "contiguous"),
    ((2, 3, 33, 33), 1, "contiguous"),
    ((5, 11, 6), 1, "contiguous"),
    ((4, 9, 6, 5), 1, "noncontiguous"),
]


def make_x(shape, layout, dtype=torch.float32):
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        big = torch.randn(shape[0], shape[1] * 2, *shape[2:], dtype=dtype)
        x = big[:, ::2]
        assert not x.is_contiguous()
        return x
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("gain,clamp", [(1.0, None), (1.7, 0.8)])
def test_values_and_grads_fp32(impl, act, case, gain, clamp):
    shape, dim, layout = CASES[case]
    x = make_x(shape, layout).requires_grad_()
    b = torch.randn(shape[dim]).requires_grad_()
    alpha = 0.2 if act == "lrelu" else None
    y = bias_act(x, b, dim, act, alpha, gain, clamp, impl=impl)
    a = resolve_act(act, alpha)[1]  # the row's default for None
    ref = expected(x.detach(), b.detach(), dim % x.dim(), act, a, gain, clamp)
    close(y, ref, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    # gradients against torch autograd through the float64 formula
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    gxe, gbe = torch.autograd.grad(expected(xd, bd, dim % x.dim(), act, a, gain, clamp), (xd, bd), g.double())
    close(gx, gxe, 1e-5)
    close(gb, gbe, 1e-5)


def test_triton_int64_offsets_path(monkeypatch):
    """Tensors of 2**31 elements or more take int64 offsets (int32 ones would wrap); too big to run here,
    so the int64 path is forced on small tensors and must compute the same as the reference, for
    bias_act and for linear_act's fused matmul kernel."""
    import fastgan.ops.triton.bias_act as bias_kernels
    import fastgan.ops.triton.linear_act as linear_kernels
    from fastgan.ops import linear_act
    assert not bias_kernels._index64(torch.empty(0)) and not bias_kernels._index64(torch.empty(64, 32))
    # the farthest element through the strides decides, not the element count (meta: no memory)
    assert bias_kernels._index64(torch.empty(2 ** 31, device="meta"))
    assert bias_kernels._index64(torch.empty(1, device="meta").as_strided((2, 3), (2 ** 31, 1)))
    monkeypatch.setattr(bias_kernels, "_index64", lambda t: True)
    monkeypatch.setattr(linear_kernels, "_index64", lambda t: True)
    for shape, dim, layout in (((2, 5, 3, 4), 1, "contiguous"), ((3, 6, 2, 5), 1, "channels_last"),
                               ((7, 9), 1, "contiguous")):
        x = make_x(shape, layout).requires_grad_()
        b = torch.randn(shape[dim]).requires_grad_()
        y = bias_act(x, b, dim, "lrelu", 0.2, 1.3, None, impl="triton")
        close(y, expected(x.detach(), b.detach(), dim, "lrelu", 0.2, 1.3, None), 1e-5)
        g = torch.randn_like(y)
        gx, gb = torch.autograd.grad(y, (x, b), g)
        xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        gxe, gbe = torch.autograd.grad(expected(xd, bd, dim, "lrelu", 0.2, 1.3, None), (xd, bd), g.double())
        close(gx, gxe, 1e-5)
        close(gb, gbe, 1e-5)
    x, w, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((37, 19), (23, 19), (23,)))
    torch.testing.assert_close(linear_act(x, w, b, "tanh", impl="triton"), torch.tanh(x @ w.t() + b))


@pytest.mark.parametrize("act", ["lrelu", "tanh"])
@pytest.mark.parametrize("shape,layout", [((5, 3, 67, 71), "channels_last"), ((1001, 1), "contiguous"),
                                          ((3, 2, 7, 5), "channels_last")])
def test_short_rows_in_runs_of_rows(act, shape, layout):
    """The C++ path takes rows of few features (an RGB channels_last map: 3; a 1-unit linear output)
    in runs of many rows against a tiled bias: many runs, several fixed chunks of the bias-gradient
    sum and a last, shorter run must all match the formula."""
    x = make_x(shape, layout).requires_grad_()
    b = torch.randn(shape[1]).requires_grad_()
    y = bias_act(x, b, 1, act, impl="cpu")
    close(y, expected(x.detach(), b.detach(), 1, act, 0.2, 1.0, None), 1e-5)
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    gxe, gbe = torch.autograd.grad(expected(xd, bd, 1, act, 0.2, 1.0, None), (xd, bd), g.double())
    close(gx, gxe, 1e-5)
    close(gb, gbe, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, act, dtype):
    shape, dim, clamp, gain = (3, 6, 7, 5), 1, 0.9, 1.3
    a = resolve_act(act, None)[1]  # the row's default alpha (lrelu: 0.2)
    b = torch.randn(shape[dim]).to(dtype)
    x = away_from_clamp(torch.randn(shape), b.float(), dim, act, a, gain, clamp).to(dtype)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    b.requires_grad_()
    y = bias_act(x, b, dim, act, None, gain, clamp, impl=impl)
    assert y.dtype == dtype
    ref = expected(x.detach().float(), b.detach().float(), dim, act, a, gain, clamp)
    close(y, ref, 1e-2)
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    gxe, gbe = torch.autograd.grad(expected(xd, bd, dim, act, a, gain, clamp), (xd, bd), g.double())
    close(gx, gxe, 1e-2)
    close(gb, gbe, 2e-2)  # a sum of ~100 bf16 products


@pytest.mark.parametrize("impl", ["ref"] + IMPLS)
def test_no_bias_and_alpha(impl):
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    y = bias_act(x, None, 1, "lrelu", 0.05, impl=impl)
    close(y, expected(x.detach(), None, 1, "lrelu", 0.05, 1.0, None), 1e-6)
    (gx,) = torch.autograd.grad(y.sum(), x)
    close(gx, torch.where(x > 0, 1.0, 0.05), 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_and_strided_grad_out(impl):
    # grad_out from .sum() is an expanded scalar; from a permute it has another layout
    x = torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    y = bias_act(x, b, 1, "tanh", impl=impl)
    (y.permute(0, 2, 3, 1).contiguous() * torch.arange(4.0)).sum().backward()
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (torch.tanh(xr + br.view(1, -1, 1, 1)).permute(0, 2, 3, 1) * torch.arange(4.0)).sum().backward()
    close(x.grad, xr.grad, 1e-5)
    close(b.grad, br.grad, 1e-5)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_gradgradcheck_float64(impl, act, layout):
    x = make_x((2, 3, 4, 3), layout, torch.float64)
    # keep relu/lrelu inputs away from the kink at 0, where finite differences are meaningless
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_()
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    clamp = 1.1 if act in ("linear", "lrelu") else None

    def fn(x_, b_):
        return bias_act(x_, b_, 1, act, None, 1.3, clamp, impl=impl)

    if clamp is not None:  # no pre-clamp value within finite-difference reach of the clamp
        pre = expected(x.detach(), b.detach(), 1, act, 0.2, 1.3, None)
        assert ((pre.abs() - clamp).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("act", ACTS)
def test_triton_second_order_matches_reference(act):
    # an R1-style penalty: || d sum(w * y) / d x ||^2, differentiated w.r.t. x and the bias
    def penalty(impl, x, b, w):
        y = bias_act(x, b, 1, act, None, 1.4, 2.0, impl=impl)
        (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        return (gx * gx).sum() + (gx * y).sum()

    x0 = torch.randn(3, 4, 5, 5)
    b0, w = torch.randn(4), torch.randn(3, 4, 5, 5)
    results = {}
    for impl in ("ref", "cpu", "triton"):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        results[impl] = (penalty(impl, x, b, w), *torch.autograd.grad(penalty(impl, x, b, w), (x, b)))
    for impl in ("cpu", "triton"):
        for got, want in zip(results[impl], results["ref"]):
            close(got, want, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_op_matches_its_reference(impl):
    y = torch.tanh(torch.randn(4, 6, 3)) * 1.5
    g = torch.randn_like(y)
    gx, gb = _bias_act_grad_op(g, y, True, 1, ACTIVATIONS["tanh"].index, 0.0, 1.5, 1.2, impl)
    gxe, gbe = bias_act_grad_reference(g, y, 1, "tanh", None, 1.5, 1.2)
    close(gx, gxe, 1e-5)
    close(gb, gbe, 1e-5)


def test_empty_input():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    for impl in IMPLS:
        b = torch.randn(3, requires_grad=True)
        y = bias_act(x, b, act="relu", impl=impl)
        assert y.shape == x.shape
        gx, gb = torch.autograd.grad(y.sum(), (x, b))
        assert gx.shape == x.shape and torch.equal(gb, torch.zeros(3))  # no rows: the bias gets no gradient


@pytest.mark.parametrize("kwargs,match", [
    (dict(act="gelu"), "act"),
    (dict(act="lrelu", alpha=-0.1), "alpha"),
    (dict(act="lrelu", alpha=float("nan")), "alpha"),
    (dict(dim=4), "dim"),
    (dict(gain=0.0), "gain"),
    (dict(gain=1e-39), "gain must be a finite non-zero number of float32's normal range"),
    (dict(clamp=-1.0), "clamp"),
    (dict(impl="cuda"), "impl"),
    (dict(bias=torch.zeros(4)), "bias"),
    (dict(bias=torch.zeros(3, dtype=torch.float64)), "bias"),
])
def test_argument_errors(kwargs, match):
    x = torch.randn(2, 3, 4, 4)
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)
    with pytest.raises(ValueError, match=match):
        bias_act(x, bias, **kwargs)


@pytest.mark.parametrize("impl", ["ref"] + IMPLS)
@pytest.mark.parametrize("dtype,clamp", [(torch.float16, 1e5), (torch.bfloat16, 1e39), (torch.float32, 1e39)])
def test_clamp_beyond_the_dtype_is_a_clear_error(impl, dtype, clamp):
    x = torch.randn(2, 3, 4, dtype=dtype)
    with pytest.raises(ValueError, match=re.escape(f"clamp={clamp!r} is beyond the largest finite {dtype}")):
        bias_act(x, None, 1, "lrelu", clamp=clamp, impl=impl)


def test_x_must_be_a_float_tensor():
    with pytest.raises(TypeError, match="x"):
        bias_act([1.0, 2.0])
    with pytest.raises(ValueError, match="x"):
        bias_act(torch.ones(2, 3, dtype=torch.int64))


def test_activation_table():
    ids = [a.index for a in ACTIVATIONS.values()]
    assert sorted(ids) == list(range(len(ids)))
    assert resolve_act("lrelu", None)[1] == 0.2 and resolve_act("lrelu", 0.1)[1] == 0.1
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    for name, a in ACTIVATIONS.items():
        xr = x.clone().requires_grad_()
        y = a.ref(xr, 0.3)
        (d,) = torch.autograd.grad(y.sum(), xr, create_graph=True)
        # derivative from the output agrees with autograd's derivative of the function
        torch.testing.assert_close(a.grad_from_output(y.detach(), 0.3), d.detach())
        # the second-derivative rule: d/dx f'(x) = grad2(y) * f'(x)
        if d.requires_grad:
            (dd,) = torch.autograd.grad(d.sum(), xr)
        else:
            dd = torch.zeros_like(x)
        torch.testing.assert_close(a.grad2_from_output(y.detach(), 0.3) * d.detach(), dd, atol=1e-12, rtol=1e-9)
    assert math.isclose(float(ACTIVATIONS["sigmoid"].ref(torch.tensor(0.0), 0.0)), 0.5)


@pytest.mark.parametrize("act", ["lrelu", "tanh", "sigmoid"])
def test_registered_custom_ops_are_twice_differentiable(act):
    # torch.compile runs the torch.library ops (eager calls take autograd.Functions / C++ nodes):
    # check the registered autograd of fastgan::bias_act and fastgan::bias_act_grad directly.
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_()
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    index = ACTIVATIONS[act].index

    def fn(x_, b_):
        return torch.ops.fastgan.bias_act(x_, b_, 1, index, 0.2, 1.3, -1.0, "cpu")

    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
