"""fastgan.ops.batch_norm_act on CUDA (the compiled Triton kernels): values, gradients and running
statistics against torch's own F.batch_norm + activation in float64, at sizes well beyond one tile
(DCGAN feature maps), NCHW / channels_last / 2-D, fp32 / bf16 / fp16; the modules against
nn.BatchNorm2d over several steps; second-order gradients against the reference; torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgan.nn import BatchNormAct1d, BatchNormAct2d
from fastgan.ops import ACTIVATIONS, batch_norm_act

ACT_FNS = {"linear": lambda t, a: t, "relu": lambda t, a: torch.relu(t), "lrelu": lambda t, a: F.leaky_relu(t, a),
           "tanh": lambda t, a: torch.tanh(t), "sigmoid": lambda t, a: torch.sigmoid(t)}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def close(actual, expected, rtol, what=""):
    actual, expected = actual.double(), expected.detach().double()
    atol = rtol * max(1.0, float(expected.abs().max())) if expected.numel() else rtol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_case(device, shape, layout, dtype, training, act):
    """One comparison of impl='triton' with torch in float64 (also used on CPU by hand, interpreter on)."""
    c = shape[1]
    x = (torch.randn(shape, device=device) * 1.5 + 0.7).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(True)
    b = torch.randn(c, device=device).requires_grad_(True)
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = batch_norm_act(x, w, b, rm_t, rv_t, training, 0.1, 1e-5, act, None, impl="triton")
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    rm64, rv64 = rm.double(), rv.double()
    z64 = F.batch_norm(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5)
    y64 = ACT_FNS.get(act, ACTIVATIONS[act].ref)(z64, ACTIVATIONS[act].default_alpha)  # a row added later: its own ref
    what = f"{act} {shape} {layout} {dtype} training={training}"
    rtol = RTOL[dtype]
    close(y, y64, rtol, what + " y")
    close(rm_t, rm64, 1e-5, what + " running_mean")
    close(rv_t, rv64, 1e-5, what + " running_var")
    g = torch.randn(shape, device=device).to(dtype)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    if act in ("relu", "lrelu"):
        # Where z rounds to the other sign of 0 than in float64 the slope differs: such elements are left
        # out of dx and allowed for (|g| each) in the per-channel sums (millions of elements here).
        kink = z64.detach().abs() < 1e-4 * max(1.0, float(z64.detach().abs().max()))
        dims = [0] + list(range(2, x.dim()))
        allowance = kink.sum(dim=dims).double() * float(g.abs().max())
        dx, dx64 = dx[~kink], dx64[~kink]
        for got, want, name in ((dw, dw64, "dweight"), (db, db64, "dbias")):
            tol = rtol * max(1.0, float(want.abs().max())) + allowance + rtol * want.abs()
            assert bool(((got.double() - want).abs() <= tol).all()), f"{what} {name}"
    else:
        close(dw, dw64, rtol, what + " dweight")
        close(db, db64, rtol, what + " dbias")
    close(dx, dx64, rtol, what + " dx")


@pytest.mark.parametrize("shape,layout", [
    ((64, 64, 32, 32), "contiguous"),
    ((64, 512, 4, 4), "contiguous"),
    ((64, 128, 16, 16), "channels_last"),
    ((7, 3, 65, 67), "contiguous"),
    ((1, 37, 9, 11), "channels_last"),
    ((513, 300), "contiguous"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_triton_matches_torch(cuda_device, shape, layout, dtype, training):
    for act in ACTIVATIONS:
        run_case(cuda_device, shape, layout, dtype, training, act)


@pytest.mark.parametrize("shape,layout", [
    ((64, 64, 32, 32), "contiguous"),
    ((64, 512, 4, 4), "contiguous"),
    ((64, 128, 16, 16), "channels_last"),
    ((7, 3, 65, 67), "contiguous"),
    ((513, 300), "contiguous"),
])
@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("training", [True, False])
def test_triton_paths_match_torch(cuda_device, monkeypatch, shape, layout, path, training):
    """Both kernel sets at every shape, whichever the row limit would pick: the single-pass kernels (one
    launch each way) and the split ones (row splits, partial sums, finishing kernels)."""
    import fastgan.ops.triton.batch_norm_act as kernels
    monkeypatch.setattr(kernels, "SINGLE_PASS_MAX_ELEMENTS", 1 << 30 if path == "single" else 0)
    for act in ACTIVATIONS:
        run_case(cuda_device, shape, layout, torch.float32, training, act)


def test_auto_picks_triton_on_cuda(cuda_device):
    from fastgan._dispatch import resolve_impl
    assert resolve_impl("batch_norm_act", "auto", cuda_device) == "triton"


@pytest.mark.parametrize("module_cls,shape", [(BatchNormAct2d, (16, 24, 8, 8)), (BatchNormAct1d, (32, 40))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_torch_over_steps(cuda_device, module_cls, shape, momentum):
    torch_cls = nn.BatchNorm2d if module_cls is BatchNormAct2d else nn.BatchNorm1d
    ref = torch_cls(shape[1], momentum=momentum).to(cuda_device)
    ours = module_cls(shape[1], momentum=momentum, act="lrelu").to(cuda_device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(shape, device=cuda_device) * 2 + step
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = F.leaky_relu(ref(x1), 0.2), ours(x2)
        close(y2, y1, 1e-5, "y")
        g = torch.randn(shape, device=cuda_device)
        y1.backward(g)
        y2.backward(g)
        close(x2.grad, x1.grad, 1e-5, "dx")
        close(ours.weight.grad, ref.weight.grad, 1e-5, "dweight")
    for key, value in ref.state_dict().items():
        close(ours.state_dict()[key], value, 1e-5, key)
    ref.eval()
    ours.eval()
    x = torch.randn(shape, device=cuda_device)
    close(ours(x), F.leaky_relu(ref(x), 0.2), 1e-5, "eval")


@pytest.mark.parametrize("act", ["lrelu", "tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_second_order_matches_reference(cuda_device, act, training):
    x0 = torch.randn(8, 16, 6, 6, device=cuda_device)
    w0, b0 = torch.rand(16, device=cuda_device) + 0.5, torch.randn(16, device=cuda_device)
    results = []
    for impl in ("triton", "ref"):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        rm, rv = torch.zeros(16, device=cuda_device), torch.ones(16, device=cuda_device)
        y = batch_norm_act(x, w, b, rm, rv, training, act=act, impl=impl)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y) * 0.5, create_graph=True)
        results.append(torch.autograd.grad((dx * dx).sum(), (x, w, b)))
    for got, want in zip(*results):
        close(got, want, 1e-4, "second order")


def test_torch_compile_fullgraph(cuda_device):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct2d(16, act="lrelu")).to(cuda_device)
    eager = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct2d(16, act="lrelu")).to(cuda_device)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 12, 12, device=cuda_device)
    y1, y2 = eager(x), compiled(x)
    close(y2, y1, 1e-4, "compiled y")
    y1.square().sum().backward()
    y2.square().sum().backward()
    close(model[0].weight.grad, eager[0].weight.grad, 1e-4, "compiled conv grad")
    close(model[1].running_var, eager[1].running_var, 1e-5, "compiled running_var")


def _split_step(x, w, b, g):
    y = batch_norm_act(x, w, b, None, None, True, act="lrelu", alpha=0.2, impl="triton")
    return (y,) + torch.autograd.grad(y, (x, w, b), g)


@pytest.mark.parametrize("shape,layout", [((64, 64, 32, 32), "contiguous"), ((64, 128, 16, 16), "channels_last")])
def test_split_path_is_deterministic_across_calls_and_streams(cuda_device, monkeypatch, shape, layout):
    """The split kernels' last program per block of channels finishes the statistics once every split has
    stored its partial sums (a counter per block, re-armed by that program). A missed ordering or a
    counter left armed would show as a call whose results differ: every call, also with two streams
    running the kernels at once, must give the first call's results bit for bit."""
    import fastgan.ops.triton.batch_norm_act as kernels
    monkeypatch.setattr(kernels, "SINGLE_PASS_MAX_ELEMENTS", 0)
    gen = torch.Generator(device=cuda_device).manual_seed(0)
    inputs = []
    for _ in range(2):
        x = torch.randn(shape, device=cuda_device, generator=gen) * 1.5 + 0.7
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        w = torch.rand(shape[1], device=cuda_device, generator=gen) + 0.5
        b = torch.randn(shape[1], device=cuda_device, generator=gen)
        g = torch.randn(x.shape, device=cuda_device, generator=gen).to(memory_format=torch.channels_last
                                                                      if layout == "channels_last" else
                                                                      torch.contiguous_format)
        inputs.append((x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), g))
    first = [_split_step(*args) for args in inputs]
    for _ in range(20):
        for args, want in zip(inputs, first):
            for got, ref in zip(_split_step(*args), want):
                assert torch.equal(got, ref)
    streams = [torch.cuda.Stream(cuda_device) for _ in inputs]
    torch.cuda.synchronize(cuda_device)
    results = [[] for _ in inputs]
    for _ in range(10):
        for stream, args, out in zip(streams, inputs, results):
            with torch.cuda.stream(stream):
                out.append(_split_step(*args))
    torch.cuda.synchronize(cuda_device)
    for out, want in zip(results, first):
        for step in out:
            for got, ref in zip(step, want):
                assert torch.equal(got, ref)


@pytest.mark.parametrize("ring_first", [True, False])
def test_split_path_in_a_cuda_graph(cuda_device, monkeypatch, ring_first):
    """Captured in a CUDA graph, the split kernels replay with the eager results: with the counter ring
    made by an eager call first (its slots then kept for the graph), and with a capture before any eager
    call (counters of its own, zeroed in the graph); eager calls between replays do not disturb them."""
    import fastgan.ops.triton.batch_norm_act as kernels
    monkeypatch.setattr(kernels, "SINGLE_PASS_MAX_ELEMENTS", 0)
    gen = torch.Generator(device=cuda_device).manual_seed(1)
    x = (torch.randn(64, 64, 32, 32, device=cuda_device, generator=gen) + 0.5).requires_grad_(True)
    w = (torch.rand(64, device=cuda_device, generator=gen) + 0.5).requires_grad_(True)
    b = torch.randn(64, device=cuda_device, generator=gen).requires_grad_(True)
    g = torch.randn(x.shape, device=cuda_device, generator=gen)
    # The expected results from copies of the leaves (compiling the kernels outside any capture): the
    # captured leaves are first used on the warm-up stream, as in benchmarks/common.graphed (an H200 run
    # whose leaves had gone through a backward on the default stream first failed its capture: "operation
    # would make the legacy stream depend on a capturing blocking stream").
    want = _split_step(*(t.detach().clone().requires_grad_(True) for t in (x, w, b)), g)
    # Warm-up on a side stream, as torch.cuda.graph's documentation prescribes for a captured backward.
    side = torch.cuda.Stream(cuda_device)
    side.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(side):
        for _ in range(2):
            _split_step(x, w, b, g)
        monkeypatch.setattr(kernels, "_COUNTER_RINGS", {})
        if ring_first:
            _split_step(x, w, b, g)
    torch.cuda.current_stream(cuda_device).wait_stream(side)
    torch.cuda.synchronize(cuda_device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _split_step(x, w, b, g)
    torch.cuda.synchronize(cuda_device)
    assert (torch.device(cuda_device) in kernels._COUNTER_RINGS) == ring_first
    for _ in range(3):
        graph.replay()
        for _ in range(3):
            _split_step(x, w, b, g)  # eager calls take further slots of the ring
        torch.cuda.synchronize(cuda_device)
        for got, ref in zip(out, want):
            assert torch.equal(got, ref)
