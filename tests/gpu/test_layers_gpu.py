"""fastgan.ops.linear_act / bias_act and fastgan.fuse on CUDA (the compiled Triton kernels): values
and gradients against float64 formulas at sizes well beyond one tile (GAN layer widths, DCGAN
feature maps), odd sizes, NCHW / channels_last, fp32 (IEEE by default, TF32 when torch allows it) / bf16 / fp16, every
activation; second-order gradients against the reference; fused DCGAN layers; torch.compile.
The ``run_*`` helpers take a device, so they also run on CPU by hand with TRITON_INTERPRET=1."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan.ops import ACTIVATIONS, bias_act, linear_act

ACTS = list(ACTIVATIONS)
ACT_FNS = {"linear": lambda t, a: t, "relu": lambda t, a: torch.relu(t), "lrelu": lambda t, a: F.leaky_relu(t, a),
           "tanh": lambda t, a: torch.tanh(t), "sigmoid": lambda t, a: torch.sigmoid(t)}
# fp32: full float32 products (torch's default matmul precision "highest", which linear_act follows)
RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
RTOL_TF32 = 3e-3  # 10-bit mantissa operands


def close(actual, expected, rtol, what=""):
    actual, expected = actual.detach().double(), expected.detach().double()
    atol = rtol * max(1.0, float(expected.abs().max())) if expected.numel() else rtol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_linear(device, x_shape, out_features, act, dtype, bias=True, gain=1.0, rtol=None):
    k = x_shape[-1]
    x = torch.randn(x_shape, device=device).to(dtype).requires_grad_()
    w = (torch.randn(out_features, k, device=device) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(out_features, device=device).to(dtype).requires_grad_() if bias else None
    y = linear_act(x, w, b, act, None, gain, impl="triton")
    leaves = [t for t in (x, w, b) if t is not None]
    dl = [t.detach().double().requires_grad_() for t in leaves]
    z = dl[0] @ dl[1].t() + (dl[2] if bias else 0)
    y_ref = ACT_FNS.get(act, ACTIVATIONS[act].ref)(z, ACTIVATIONS[act].default_alpha) * gain
    rtol = rtol or RTOL[dtype]
    close(y, y_ref, rtol, "y")
    g = torch.randn_like(y)
    for got, want, name in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, dl, g.double()),
                               ("x", "weight", "bias")):
        # weight/bias gradients sum over the batch: one more rounding per term in bf16
        close(got, want, rtol * (2 if dtype != torch.float32 else 1), name)


def run_bias_act(device, shape, dim, layout, act, dtype, gain=1.0, clamp=None):
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    b = torch.randn(shape[dim], device=device).to(dtype).requires_grad_()
    y = bias_act(x, b, dim, act, None, gain, clamp, impl="triton")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    view = [1] * x.dim()
    view[dim] = -1
    y_ref = ACT_FNS.get(act, ACTIVATIONS[act].ref)(xd + bd.view(view), ACTIVATIONS[act].default_alpha) * gain
    if clamp is not None:
        y_ref = y_ref.clamp(-clamp, clamp)
    close(y, y_ref, RTOL[dtype], "y")
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (xd, bd), g.double())
    if clamp is not None and dtype != torch.float32:
        # rounded outputs next to the clamp cannot tell saturated from not: compare away from it
        keep = (y_ref.detach().abs() - clamp).abs() > 0.02 * clamp
        gx, gx_ref = gx[keep], gx_ref[keep]
    else:
        close(gb, gb_ref, RTOL[dtype] * (4 if dtype != torch.float32 else 1), "bias")
    close(gx, gx_ref, RTOL[dtype], "x")


LINEAR_SHAPES = [((1, 7), 5), ((64, 1024), 1024), ((513, 1000), 257), ((3, 5, 300), 129), ((512, 256), 784)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", range(len(LINEAR_SHAPES)))
def test_linear_act_cuda(cuda_device, shape, act, dtype):
    x_shape, n = LINEAR_SHAPES[shape]
    run_linear(cuda_device, x_shape, n, act, dtype, bias=shape != 2, gain=1.0 if shape % 2 else 0.7)


@pytest.mark.parametrize("act", ["linear", "tanh"])
@pytest.mark.parametrize("shape", [1, 2])
def test_linear_act_cuda_tf32_when_torch_allows_it(cuda_device, shape, act):
    """With torch.backends.cuda.matmul.allow_tf32 the kernel (and torch's backward GEMMs) use TF32: still
    within TF32's rounding of the float64 answer. The default-precision test above fails at TF32's error."""
    x_shape, n = LINEAR_SHAPES[shape]
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        run_linear(cuda_device, x_shape, n, act, torch.float32, bias=shape != 2, rtol=RTOL_TF32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


BIAS_CASES = [((64, 128, 16, 16), 1, "contiguous"), ((64, 128, 16, 16), 1, "channels_last"),
              ((8, 3, 64, 64), 1, "contiguous"), ((512, 1024), 1, "contiguous"), ((7, 33, 5, 5), 1, "channels_last"),
              ((4, 6, 1000), -1, "contiguous")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", range(len(BIAS_CASES)))
def test_bias_act_cuda(cuda_device, case, act, dtype):
    shape, dim, layout = BIAS_CASES[case]
    run_bias_act(cuda_device, shape, dim, layout, act, dtype, gain=1.0 if case % 2 else 1.4,
                 clamp=None if case % 2 else 1.0)


@pytest.mark.parametrize("act", ACTS)
def test_second_order_matches_reference_cuda(cuda_device, act):
    def penalty(impl, x, w1, b1, w2, b2):
        h = linear_act(x, w1, b1, act, None, 1.2, impl=impl)
        d = bias_act(linear_act(h, w2, None, "linear", impl=impl), b2, 1, "tanh", clamp=3.0, impl=impl)
        (gx,) = torch.autograd.grad(d.sum(), x, create_graph=True)
        return (gx * gx).sum()

    params0 = [torch.randn(64, 96, device=cuda_device), torch.randn(128, 96, device=cuda_device) / 10,
               torch.randn(128, device=cuda_device), torch.randn(3, 128, device=cuda_device) / 11,
               torch.randn(3, device=cuda_device)]
    results = {}
    for impl in ("ref", "triton"):
        params = [p.clone().requires_grad_() for p in params0]
        loss = penalty(impl, *params)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results[impl] = [loss, *[torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]]
    for got, want in zip(results["triton"], results["ref"]):
        close(got, want, 1e-3, "second order (tf32 matmuls)")


def _dcgan_d(ndf=64, nc=3):
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())


def test_fused_dcgan_discriminator_cuda(cuda_device):
    torch.backends.cudnn.allow_tf32 = False  # compare the fused tails, not two convolution algorithms
    torch.manual_seed(0)
    ref = _dcgan_d().to(cuda_device)
    fused = fastgan.fuse(copy.deepcopy(ref))
    x = torch.randn(32, 3, 64, 64, device=cuda_device)
    for mode in (True, False):
        ref.train(mode)
        fused.train(mode)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        close(yf, yr, 1e-4, "output")
        yr.sum().backward()
        yf.sum().backward()
        close(xf.grad, xr.grad, 1e-4, "input grad")
        for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
            close(pf.grad, pr.grad, 1e-4, name)
        ref.zero_grad()
        fused.zero_grad()


def test_torch_compile_fullgraph_cuda(cuda_device):
    torch.manual_seed(0)
    model = fastgan.fuse(nn.Sequential(nn.Linear(64, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256), nn.ReLU(),
                                       nn.Linear(256, 1))).to(cuda_device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(128, 64, device=cuda_device)
    close(compiled(x), model(x), 1e-4, "compiled")
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for got, p in zip(grads, model.parameters()):
        close(got, p.grad, 1e-4, "grad")
