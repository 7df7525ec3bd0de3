"""The fused ops and layers under torch.autocast (CPU, bfloat16; float16 where CPU kernels have it)
behave as the torch modules they replace do under the same autocast: linear_act casts like F.linear
(a lower-precision op), Conv*Act / ConvTranspose*Act like torch's convolutions (bias cast with them),
bias_act standalone like ``x + bias`` (type promotion), BatchNormAct like nn.BatchNorm (low-precision
input, float32 parameters and statistics). Outputs, dtypes, gradients (float32 for float32
parameters), running statistics, fuse()d MLP / DCGAN models, eager and torch.compile paths."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan.models import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from fastgan.nn import BiasAct, Conv1dAct, Conv2dAct, ConvTranspose2dAct, FusedLinear
from fastgan.nn.batch_norm_act import BatchNormAct2d
from fastgan.ops import bias_act, linear_act
from fastgan.ops.activations import ACTIVATIONS
from fastgan.ops.batch_norm_act import batch_norm_act

BF16 = torch.bfloat16
IMPLS = ["cpu", "triton", "ref"]
# Triton 3.9's CPU interpreter truncates float32 -> bfloat16 stores (even with
# fp_downcast_rounding="rtne"; GPUs round to nearest even): twice the rounding error of torch's.
TRITON_INTERPRETER_TOL = 2e-2


def tol_of(impl):
    return TRITON_INTERPRETER_TOL if impl == "triton" else 1e-2
TORCH_ACT = {"linear": lambda t: t, "relu": torch.relu, "lrelu": lambda t: F.leaky_relu(t, 0.2),
             "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def autocast(dtype=BF16):
    return torch.autocast("cpu", dtype=dtype)


def check_low(ours, theirs, truth, tol=1e-2, elementwise=True):
    """``ours`` (fastgan under autocast) against ``theirs`` (torch under the same autocast) and the
    float64 ``truth``: the dtype of torch's result, and a relative error to the truth (in norm) of
    at most ``tol``, or 1.5x torch's own where torch's low-precision result is further off (ill-
    conditioned cases: torch computes tanh's 1 - y^2 in bf16, relu kinks flip between roundings).
    ``elementwise``: also no element off the truth by more than 4 tol (|truth| + max |truth|) or
    1.5x torch's error at that element."""
    if theirs is None:  # no gradient path (e.g. the last bias in an R1 penalty): none in ours either
        assert ours is None
        return
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    assert ours.shape == theirs.shape == truth.shape
    a, e, t = ours.double(), theirs.double(), truth.double()
    assert torch.isfinite(a).all()
    norm = t.norm().clamp_min(1e-12)
    err, err_torch = (a - t).norm() / norm, (e - t).norm() / norm
    assert err <= max(tol, 1.5 * err_torch), f"relative error {err:.3g} (torch's: {err_torch:.3g}) > {tol}"
    if elementwise:
        bound = torch.maximum(4 * tol * (t.abs() + t.abs().max()), 1.5 * (e - t).abs())
        bad = (a - t).abs() > bound
        assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off, max {(a - t).abs().max():.3g}"


def run_three(ours_fn, torch_fn, inputs, dtype=BF16, create_graph_penalty=False):
    """[output, input grads...] of ``ours_fn`` and ``torch_fn`` under autocast(dtype) and of
    ``torch_fn`` in float64 without autocast (the truth), for one random upstream gradient.
    ``create_graph_penalty``: instead, the input grads of ``|d sum(out) / d inputs[0]|^2`` (R1-style
    double backward), with that first-order gradient as the "output"."""
    g = None
    results = []
    for fn, low in ((ours_fn, True), (torch_fn, True), (torch_fn, False)):
        xs = [t.detach().clone().double() if not low else t.detach().clone() for t in inputs]
        xs = [t.requires_grad_() for t in xs]
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            y = fn(*xs)
        if create_graph_penalty:
            (gx,) = torch.autograd.grad(y.float().sum() if low else y.sum(), xs[0], create_graph=True)
            gx.pow(2).sum().backward()
            results.append([gx.detach()] + [t.grad for t in xs])
            continue
        if g is None:
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g.to(y.dtype))
        results.append([y.detach()] + [t.grad for t in xs])
    return results


def check_three(results, tol=1e-2, elementwise=True):
    ours, theirs, truth = results
    for o, t, r in zip(ours, theirs, truth):
        check_low(o, t, r, tol, elementwise)


# --- linear_act -----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(3, 4, 8), (1, 7, 5), (2, 3, 37, 70), (4, 6, 1)])
def test_linear_act_casts_like_f_linear(impl, act, shape):
    *lead, k, n = shape
    # pre-activations of std ~0.7: near saturation tanh' = 1 - y^2 from a bf16 y is mostly rounding
    # (in torch's computation as in ours), which no tolerance could tell from a bug
    x, w, b = torch.randn(*lead, k), 0.5 * torch.randn(n, k) / k ** 0.5, 0.5 * torch.randn(n)
    row = ACTIVATIONS[act]
    torch_act = TORCH_ACT.get(act, lambda t: row.ref(t, row.default_alpha))  # a row added later: its own ref
    results = run_three(lambda x, w, b: linear_act(x, w, b, act, impl=impl),
                        lambda x, w, b: torch_act(F.linear(x, w, b)), (x, w, b))
    assert results[0][0].dtype == BF16
    assert all(gr.dtype == torch.float32 for gr in results[0][1:])  # the casts are differentiable
    check_three(results, tol=tol_of(impl))


@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_linear_act_without_bias_and_low_precision_input(impl):
    # x already bf16 with an fp32 weight: F.linear under autocast casts the weight; so must we
    x, w = torch.randn(5, 9).to(BF16), torch.randn(3, 9) / 3
    results = run_three(lambda x, w: linear_act(x, w, None, "lrelu", impl=impl),
                        lambda x, w: F.leaky_relu(F.linear(x, w), 0.2), (x, w))
    assert results[0][1].dtype == BF16 and results[0][2].dtype == torch.float32
    check_three(results)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_linear_act_fp16_autocast(impl):
    x, w, b = torch.randn(6, 10), 0.5 * torch.randn(7, 10) / 10 ** 0.5, 0.5 * torch.randn(7)
    results = run_three(lambda x, w, b: linear_act(x, w, b, "tanh", impl=impl),
                        lambda x, w, b: torch.tanh(F.linear(x, w, b)), (x, w, b), dtype=torch.float16)
    assert results[0][0].dtype == torch.float16
    check_three(results, tol=2e-3)


def test_linear_act_float64_is_not_cast():
    # autocast leaves float64 alone (as F.linear does): the result of a call without autocast
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in ((4, 5), (3, 5), (3,)))
    with autocast():
        y = linear_act(x, w, b, "relu", impl="cpu")
        assert F.linear(x, w, b).dtype == torch.float64
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.relu(F.linear(x, w, b)))


def test_linear_act_outside_autocast_still_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="weight"):
        linear_act(torch.randn(2, 3).to(BF16), torch.randn(4, 3))


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_linear_act_double_backward_under_autocast(impl):
    x, w, b = torch.randn(6, 5), 0.5 * torch.randn(4, 5) / 5 ** 0.5, 0.5 * torch.randn(4)
    results = run_three(lambda x, w, b: linear_act(x, w, b, "tanh", impl=impl),
                        lambda x, w, b: torch.tanh(F.linear(x, w, b)), (x, w, b), create_graph_penalty=True)
    check_three(results, tol=2e-2)  # more bf16 roundings on the way


# --- bias_act standalone: type promotion as x + bias ------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_dtype,b_dtype", [(BF16, torch.float32), (torch.float32, BF16), (BF16, BF16)])
@pytest.mark.parametrize("shape,dim", [((2, 5, 3, 3), 1), ((7, 33), 1), ((1, 4, 5), -1)])
def test_bias_act_promotes_like_x_plus_bias(impl, x_dtype, b_dtype, shape, dim):
    x, b = torch.randn(shape).to(x_dtype), torch.randn(shape[dim]).to(b_dtype)
    view = [1] * len(shape)
    view[dim] = -1
    results = run_three(lambda x, b: bias_act(x, b, dim, "lrelu", gain=1.5, impl=impl),
                        lambda x, b: F.leaky_relu(x + b.view(view), 0.2) * 1.5, (x, b))
    y, grad_x, grad_b = results[0]
    assert y.dtype == torch.promote_types(x_dtype, b_dtype)
    assert grad_x.dtype == x_dtype and grad_b.dtype == b_dtype
    check_three(results, tol=tol_of(impl))


def test_bias_act_outside_autocast_still_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="bias"):
        bias_act(torch.randn(2, 3).to(BF16), torch.randn(3))


def test_bias_act_module_promotes_under_autocast():
    m = BiasAct(4, act="relu")
    nn.init.normal_(m.bias)
    x = torch.randn(3, 4, 2).to(BF16)
    with autocast():
        y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.relu(x.float() + m.bias.detach().view(1, -1, 1)))


# --- layers ---------------------------------------------------------------------------------------

def run_models(fused, plain, x, dtype=BF16, penalty=False, call=None):
    """[output, input grad, parameter grads...] of ``fused`` and ``plain`` (sharing no tensors)
    under autocast(dtype) and of a float64 copy of ``plain`` without autocast (the truth), for one
    random upstream gradient; ``penalty``: of an R1 penalty |d sum(out) / d x|^2 instead.
    ``call``: what runs ``fused`` (e.g. a torch.compile of it)."""
    truth_model = copy.deepcopy(plain).double()
    g = None
    results = []
    for model, low in ((fused, True), (plain, True), (truth_model, False)):
        xx = (x.detach().clone() if low else x.detach().double()).requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            y = call(xx) if call is not None and model is fused else model(xx)
        if penalty:
            (y,) = torch.autograd.grad(y.float().sum(), xx, create_graph=True)
            y.pow(2).sum().backward()
        else:
            if g is None:
                g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            y.backward(g.to(y.dtype))
        results.append([y.detach(), None if penalty else xx.grad] + [p.grad for p in model.parameters()])
    return results


@pytest.mark.parametrize("act,torch_act", [("relu", nn.ReLU()), ("lrelu", nn.LeakyReLU(0.2)), ("tanh", nn.Tanh())])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear(act, torch_act, bias):
    plain = nn.Sequential(nn.Linear(13, 9, bias=bias), torch_act)
    fused = FusedLinear.from_linear(copy.deepcopy(plain[0]), act)
    results = run_models(fused, plain, torch.randn(5, 13))
    assert results[0][0].dtype == BF16
    check_three(results)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_act(channels_last, bias):
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.LeakyReLU(0.2))
    fused = Conv2dAct.from_conv(copy.deepcopy(plain[0]), "lrelu", 0.2)
    x = torch.randn(2, 3, 7, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    results = run_models(fused, plain, x)
    assert results[0][0].dtype == BF16
    check_three(results)


def test_conv_transpose2d_act_and_conv1d_act():
    plain = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.Tanh())
    fused = ConvTranspose2dAct.from_conv(copy.deepcopy(plain[0]), "tanh")
    check_three(run_models(fused, plain, torch.randn(2, 4, 3, 3)))
    plain = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU())
    fused = Conv1dAct.from_conv(copy.deepcopy(plain[0]), "relu")
    check_three(run_models(fused, plain, torch.randn(2, 3, 11)))


def test_conv2d_act_fp16_autocast():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    fused = Conv2dAct.from_conv(copy.deepcopy(plain[0]), "relu")
    results = run_models(fused, plain, torch.randn(2, 3, 6, 6), dtype=torch.float16)
    assert results[0][0].dtype == torch.float16
    check_three(results, tol=2e-3)


# --- batch_norm_act / BatchNormAct2d --------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_act_module_like_batchnorm(x_dtype, channels_last):
    plain = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU())
    with torch.no_grad():
        plain[0].weight.uniform_(0.5, 1.5)
        plain[0].bias.uniform_(-0.5, 0.5)
    fused = BatchNormAct2d.from_batchnorm(copy.deepcopy(plain[0]), "relu", None)
    x = torch.randn(3, 5, 4, 6).to(x_dtype) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for train in (True, False):
        plain.train(train)
        fused.train(train)
        for m in (plain, fused):
            m.zero_grad()
        results = run_models(fused, plain, x)
        assert results[0][0].dtype == x_dtype  # torch's BatchNorm keeps the input's dtype under autocast
        check_three(results)
        for name in ("running_mean", "running_var"):
            ours, theirs = getattr(fused, name), getattr(plain[0], name)
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-3)


def test_batch_norm_act_functional_bf16_input_fp32_params():
    x = torch.randn(4, 3, 5).to(BF16)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    results = run_three(lambda x, w, b: batch_norm_act(x, w, b, rm, rv, True, act="lrelu"),
                        lambda x, w, b: F.leaky_relu(F.batch_norm(x, rm2 if x.dtype != torch.float64 else None,
                                                                  rv2 if x.dtype != torch.float64 else None,
                                                                  w, b, True), 0.2), (x, w, b))
    assert results[0][0].dtype == results[1][0].dtype == BF16
    assert results[0][2].dtype == results[0][3].dtype == torch.float32
    check_three(results)
    torch.testing.assert_close(rm, rm2, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(rv, rv2, rtol=1e-2, atol=1e-3)


# --- fuse()d models -------------------------------------------------------------------------------

def test_fused_mlp_models():
    for plain in (MLPGenerator(8, (6,), hidden=(32, 16)), MLPDiscriminator((6,), hidden=(32, 16))):
        fused = fastgan.fuse(copy.deepcopy(plain))
        assert any(isinstance(m, FusedLinear) for m in fused.modules())
        x = torch.randn(32, 8 if isinstance(plain, MLPGenerator) else 6)
        # three bf16 layers: 2e-2 in norm (each layer's two roundings differ; kinks may flip)
        check_three(run_models(fused, plain, x), tol=2e-2, elementwise=False)


def test_fused_dcgan_models():
    g, d = DCGANGenerator(8, 3, 16, width=4), DCGANDiscriminator(3, 16, width=4)
    for plain, x in ((g, torch.randn(4, 8)), (d, torch.randn(4, 3, 16, 16))):
        fused = fastgan.fuse(copy.deepcopy(plain))
        kinds = {type(m).__name__ for m in fused.modules()}
        assert kinds & {"ConvTranspose2dAct", "Conv2dAct"} and "BatchNormAct2d" in kinds
        # a loose tolerance: several bf16 layers with BatchNorm in between, relu kinks can flip
        check_three(run_models(fused, plain, x), tol=3e-2, elementwise=False)


def test_fused_models_r1_penalty_under_autocast():
    d = MLPDiscriminator((6,), hidden=(16, 16))
    fused = fastgan.fuse(copy.deepcopy(d))
    # double backward through three bf16 layers (d x, then d params of |d x|^2)
    check_three(run_models(fused, d, torch.randn(16, 6), penalty=True), tol=3e-2, elementwise=False)


# --- torch.compile --------------------------------------------------------------------------------

class _GraphRecorder:
    """A torch.compile backend that keeps the graphs it gets and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.parametrize("autocast_inside", [False, True])
def test_compile_fullgraph_of_fused_model_under_autocast(autocast_inside):
    plain = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 8), nn.Tanh(),
                          nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 4, 1), nn.ReLU())
    fused = fastgan.fuse(copy.deepcopy(plain))
    recorder = _GraphRecorder()

    def run(x):
        if autocast_inside:
            with autocast():
                return fused(x)
        return fused(x)

    compiled = torch.compile(run, fullgraph=True, backend=recorder)
    results = run_models(fused, plain, torch.randn(5, 6), call=compiled)
    assert results[0][0].dtype == BF16
    check_three(results)
    # the compiled graph holds the fused custom ops (not a fallback to the reference)
    targets = {str(n.target) for gm in recorder.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("fastgan.linear_act" in t for t in targets) and any("fastgan.bias_act" in t for t in targets), targets


def test_compile_inductor_fused_mlp_under_autocast():
    plain = MLPGenerator(8, (6,), hidden=(32, 16))
    fused = fastgan.fuse(copy.deepcopy(plain))
    compiled = torch.compile(fused, fullgraph=True)
    results = run_models(fused, plain, torch.randn(16, 8), call=compiled)
    assert results[0][0].dtype == BF16 and all(gr.dtype == torch.float32 for gr in results[0][1:])
    check_three(results, tol=2e-2, elementwise=False)
