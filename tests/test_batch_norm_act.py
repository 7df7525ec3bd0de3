"""fastgan.ops.batch_norm_act and fastgan.nn.BatchNormAct1d/2d: every implementation x activation
against torch's own F.batch_norm + activation in float64 (values, gradients, running statistics),
layouts (NCHW, channels_last, 2-D, 3-D, non-contiguous), dtypes, batch 1, affine=False, no running
stats, first- and second-order gradients, torch.compile, the modules against nn.BatchNorm over
several steps, and the argument checks."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgan.nn import BatchNormAct1d, BatchNormAct2d
from fastgan.ops import ACTIVATIONS, batch_norm_act, resolve_act
from fastgan.ops.batch_norm_act import batch_norm_act_reference

IMPLS = ["ref", "cpu", "triton"]
# The Triton path has two kernel sets: single-pass (one launch each way, for few rows per channel: every
# shape here) and split (row splits, partial sums, finishing kernels), forced by a zero row limit.
IMPL_PATHS = [("ref", None), ("cpu", None), ("triton", "single"), ("triton", "split")]
FAST_IMPL_PATHS = IMPL_PATHS[1:]


@pytest.fixture
def triton_path(monkeypatch):
    """set(path): run the Triton kernels' single-pass or split path for the rest of the test."""
    import fastgan.ops.triton.batch_norm_act as kernels

    def set_path(path):
        if path == "split":
            monkeypatch.setattr(kernels, "SINGLE_PASS_MAX_ELEMENTS", 0)
        elif path == "single":
            monkeypatch.setattr(kernels, "SINGLE_PASS_MAX_ELEMENTS", 1 << 30)
    return set_path
ACTS = list(ACTIVATIONS)
ACT_FNS = {"linear": lambda t, a: t, "relu": lambda t, a: torch.relu(t), "lrelu": lambda t, a: F.leaky_relu(t, a),
           "tanh": lambda t, a: torch.tanh(t), "sigmoid": lambda t, a: torch.sigmoid(t)}
TORCH_ACTS = {"linear": nn.Identity, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh,
              "sigmoid": nn.Sigmoid}


def expected(x, weight, bias, running_mean, running_var, training, momentum, eps, act, alpha):
    """The specification written with torch's own batch_norm, in float64: (y, running_mean, running_var);
    the running statistics are updated copies (None when not given)."""
    rm = running_mean.double().clone() if running_mean is not None else None
    rv = running_var.double().clone() if running_var is not None else None
    use_batch = training or rm is None
    y = F.batch_norm(x.double(), rm, rv, None if weight is None else weight.double(),
                     None if bias is None else bias.double(), use_batch, momentum, eps)
    return ACT_FNS.get(act, ACTIVATIONS[act].ref)(y, alpha), rm, rv  # a row added later: its own ref


def close(actual, expected_, rtol, what=""):
    actual, expected_ = actual.double(), expected_.double()
    atol = rtol * max(1.0, float(expected_.detach().abs().max())) if expected_.numel() else rtol
    torch.testing.assert_close(actual, expected_, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def make_x(shape, layout, dtype):
    if layout == "noncontiguous":  # every other column of a wider tensor
        wide = list(shape)
        wide[-1] *= 2
        x = torch.randn(wide)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(shape)
    x = (x * 1.5 + 0.7).to(dtype)  # non-zero mean: the statistics must not cancel
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


# (shape, layout): 2-D, batch-1 maps, channels_last, odd channel counts, sizes beyond one tile,
# a (N, C, L) input, non-contiguous, H*W == 1, channels_last with H == 1 or W == 1 (free strides).
CASES = [
    ((6, 5), "contiguous"),
    ((1, 3, 5, 5), "contiguous"),
    ((1, 5, 3, 3), "channels_last"),
    ((4, 7, 3, 9), "channels_last"),
    ((3, 3, 30, 31), "contiguous"),
    ((4, 67, 5, 3), "channels_last"),
    ((5, 11, 6), "contiguous"),
    ((4, 9, 6, 5), "noncontiguous"),
    ((7, 6, 1, 1), "contiguous"),
    ((5, 4, 1, 7), "channels_last"),
    ((5, 4, 6, 1), "channels_last"),
]
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("shape,layout,dtype", [case + (torch.float32,) for case in CASES] +
                         [case + (low,) for low in (torch.bfloat16, torch.float16)
                          for case in (CASES[1], CASES[5], CASES[7])])
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_batch_norm(impl, path, shape, layout, dtype, training, triton_path):
    triton_path(path)
    rtol = DTYPES[dtype]
    c = shape[1]
    for act in ACTS:
        x = make_x(shape, layout, dtype).requires_grad_(True)
        weight = (torch.rand(c) + 0.5).requires_grad_(True)
        bias = torch.randn(c).requires_grad_(True)
        rm, rv = torch.randn(c), torch.rand(c) + 0.5
        rm_fast, rv_fast = rm.clone(), rv.clone()
        y = batch_norm_act(x, weight, bias, rm_fast, rv_fast, training, 0.1, 1e-5, act, None, impl)
        assert y.dtype == dtype and y.shape == x.shape
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        x64 = x.detach().double().requires_grad_(True)
        w64, b64 = weight.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
        y_exp, rm_exp, rv_exp = expected(x64, w64, b64, rm, rv, training, 0.1, 1e-5, act, resolve_act(act, None)[1])
        what = f"{impl} {act} {shape} {layout} {dtype} training={training}"
        close(y, y_exp, rtol, what + " y")
        close(rm_fast, rm_exp, 1e-5, what + " running_mean")
        close(rv_fast, rv_exp, 1e-5, what + " running_var")
        grad_y = torch.randn(shape, dtype=dtype)
        dx, dw, db = torch.autograd.grad(y, (x, weight, bias), grad_y)
        dx_exp, dw_exp, db_exp = torch.autograd.grad(y_exp, (x64, w64, b64), grad_y.double())
        close(dx, dx_exp, rtol, what + " dx")
        close(dw, dw_exp, rtol, what + " dweight")
        close(db, db_exp, rtol, what + " dbias")


def test_cpu_statistics_with_an_outlying_first_value_and_large_planes():
    """The C++ statistics sum values shifted by a reference per channel, in float lanes moved to double:
    the reference was the channel's first value, so one 100-sigma first value cancelled 4 digits of the
    variance (1e-3 errors in y), and a 2048 x 2048 plane summed in float lost 1e-4 of it."""
    torch.manual_seed(0)
    for shape in ((32768, 4), (64, 4, 16, 16), (8, 3, 64, 64)):
        x = torch.randn(shape)
        x.view(-1)[0] = 100.0  # channel 0's first value, in memory order
        y = batch_norm_act(x, None, None, None, None, True, impl="cpu")
        y_exp = F.batch_norm(x.double(), None, None, training=True)
        torch.testing.assert_close(y.double(), y_exp, rtol=2e-5, atol=2e-5)  # was off by 1.5e-3 at (32768, 4)
    x = torch.randn(1, 2, 2048, 2048)
    rm, rv = torch.zeros(2), torch.ones(2)
    batch_norm_act(x, None, None, rm, rv, True, momentum=1.0, impl="cpu")
    torch.testing.assert_close(rv.double(), x.double().var(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(rm.double(), x.double().mean(dim=(0, 2, 3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["split", "single"])
def test_triton_statistics_with_an_outlying_first_value(path, triton_path):
    """The Triton statistics shift their float32 sums by the mean of each channel's first 64 rows, as the
    C++ ones do: shifted by the channel's first value, a 300-sigma first sample cost 0.4 % of the
    running variance and 0.2 in y."""
    triton_path(path)
    torch.manual_seed(0)
    for shape in ((8192, 2), (32, 2, 16, 16)):
        x = torch.randn(shape)
        x[0] += 300.0  # the batch's first sample, in every channel
        rm, rv = torch.zeros(2), torch.ones(2)
        y = batch_norm_act(x, None, None, rm, rv, True, momentum=1.0, impl="triton")
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        torch.testing.assert_close(rv.double(), x.double().var(dim=dims), rtol=2e-5, atol=0)
        y_exp = F.batch_norm(x.double(), None, None, training=True)
        torch.testing.assert_close(y.double(), y_exp, rtol=5e-4, atol=5e-4)


def test_triton_grid_of_large_maps_fits_cuda_limits():
    """The element-wise passes put row blocks on grid axis 0 (up to 2**31 - 1); axis 1 (channel blocks) must
    stay within CUDA's 65535 also for maps whose rows alone need more blocks than that."""
    kernels = pytest.importorskip("fastgan.ops.triton.batch_norm_act")
    for shape, layout in (((32, 64, 256, 256), torch.channels_last), ((64, 32, 1024, 1024), torch.contiguous_format),
                          ((4096, 65536), torch.contiguous_format)):
        x = torch.empty(shape, device="meta", memory_format=layout)  # shapes and strides only, no memory
        r, c, _, _, _ = kernels._geometry(x)
        grid = kernels._apply_grid(r, c, *kernels._blocks(x, c))
        assert grid[1] <= 65535 and grid[0] <= 2 ** 31 - 1, (shape, grid)
        assert grid[0] * kernels._blocks(x, c)[0] >= r


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
def test_backward_of_inputs_whose_strides_two_layouts_share(impl, path, triton_path):
    """A (N, C, 1, 1) map in channels_last, or a C == 1 map, is "contiguous" in both layouts with strides
    that differ from what .contiguous() gives its gradient; the backward must take the gradient in
    the input's own strides (it refused: "grad_out and x must share strides")."""
    triton_path(path)
    for base in (torch.randn(4, 1, 1, 8).permute(0, 3, 1, 2), torch.randn(4, 3, 3, 1).permute(0, 3, 1, 2)):
        x = (base * 1.5 + 0.7).requires_grad_(True)
        y = batch_norm_act(x, None, None, None, None, True, act="lrelu", impl=impl)
        grad_y = torch.randn(x.shape)
        x64 = x.detach().double().requires_grad_(True)
        y_exp, _, _ = expected(x64, None, None, None, None, True, 0.1, 1e-5, "lrelu", 0.2)
        close(torch.autograd.grad(y, x, grad_y)[0], torch.autograd.grad(y_exp, x64, grad_y.double())[0], 1e-5,
              f"{impl} {tuple(x.shape)} strides {x.stride()} dx")


@pytest.mark.parametrize("impl,path", IMPL_PATHS)
@pytest.mark.parametrize("shape", [(4, 5, 3, 3), (6, 3)])
def test_affine_false_and_no_running_stats(impl, path, shape, triton_path):
    """weight/bias None and running stats None (batch statistics also for training=False)."""
    triton_path(path)
    x = make_x(shape, "contiguous", torch.float32).requires_grad_(True)
    for training in (True, False):
        y = batch_norm_act(x, None, None, None, None, training, act="lrelu", impl=impl)
        x64 = x.detach().double().requires_grad_(True)
        y_exp, _, _ = expected(x64, None, None, None, None, True, 0.1, 1e-5, "lrelu", 0.2)
        close(y, y_exp, 1e-5, f"{impl} y")
        g = torch.randn(shape)
        close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_exp, x64, g.double())[0], 1e-5, f"{impl} dx")


@pytest.mark.parametrize("impl,path", FAST_IMPL_PATHS)
def test_running_stats_in_another_dtype(impl, path, triton_path):
    """float64 running statistics with float32 x: eager Triton calls update the running statistics inside
    the statistics kernel only where they share the statistics' dtype; here the update takes the general
    route, and must still equal nn.BatchNorm's."""
    triton_path(path)
    x = make_x((5, 4, 3, 3), "contiguous", torch.float32)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    rm_fast, rv_fast = rm.clone(), rv.clone()
    batch_norm_act(x, None, None, rm_fast, rv_fast, True, 0.1, 1e-5, "relu", None, impl)
    _, rm_exp, rv_exp = expected(x.double(), None, None, rm, rv, True, 0.1, 1e-5, "relu", 0.0)
    close(rm_fast, rm_exp, 1e-6, "running_mean")
    close(rv_fast, rv_exp, 1e-6, "running_var")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(4, 0, 3, 3), (0, 5, 3, 3), (0, 5)])
def test_empty_input_in_eval_mode(impl, shape):
    """No samples or no channels (eval mode; training needs values): an empty output, zero gradients."""
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w, b = (torch.rand(c) + 0.5).requires_grad_(True), torch.randn(c).requires_grad_(True)
    y = batch_norm_act(x, w, b, torch.zeros(c), torch.ones(c), False, act="lrelu", impl=impl)
    assert y.shape == x.shape
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(c)) and torch.equal(db, torch.zeros(c))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 5, 3, 3), (0, 5), (2, 5, 0, 3)])
def test_empty_batch_in_training_mode(impl, shape):
    """No values per channel in training: as nn.BatchNorm, an empty output, zero gradients, the running
    statistics untouched (batch statistics of nothing are 0 / 0) and num_batches_tracked counted."""
    x = torch.randn(shape, requires_grad=True)
    fused = (BatchNormAct2d if len(shape) == 4 else BatchNormAct1d)(5, act="lrelu", impl=impl)
    plain = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(5)
    with torch.no_grad():
        for m in (fused, plain):
            m.weight.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-1, 1)
    plain.load_state_dict(fused.state_dict())
    y, expected = fused(x), F.leaky_relu(plain(x.detach()), 0.2)
    assert y.shape == expected.shape == shape
    dx, dw, db = torch.autograd.grad(y.sum(), (x, fused.weight, fused.bias))
    assert dx.shape == shape and torch.equal(dw, torch.zeros(5)) and torch.equal(db, torch.zeros(5))
    for name, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], value), name
    assert int(fused.num_batches_tracked) == 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_split_finishing_and_counters(layout, triton_path, monkeypatch):
    """The split path's last program per block of channels sums every split's partial rows (here more
    splits than one chunk of the finishing loads in channels_last) and re-arms its counters: repeated
    calls stay right, and every ring slot is zero again. A ring that wraps reuses its slots."""
    import fastgan.ops.triton.batch_norm_act as kernels
    triton_path("split")
    monkeypatch.setattr(kernels._CounterRing, "SLOTS", 40)
    monkeypatch.setattr(kernels, "_COUNTER_RINGS", {})
    shape = (8, 64, 12, 12)
    if layout == "channels_last":
        grid, _, _, _, chunk, _, _ = kernels._split_launch(make_x(shape, layout, torch.float32), 8 * 144, 64)
        assert grid[1] > chunk  # the finishing loop takes more than one chunk
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    for step in range(3):  # 32 (NCHW) or 1 (channels_last) counters a call: the 40-slot ring wraps
        x = make_x(shape, layout, torch.float32).requires_grad_(True)
        rm, rv = torch.zeros(64), torch.ones(64)
        y = batch_norm_act(x, w, b, rm, rv, True, act="tanh", impl="triton")  # smooth: no kink to round across
        g = torch.randn(shape)
        dx, = torch.autograd.grad(y, x, g)
        x_ref = x.detach().double().requires_grad_(True)
        rm_ref, rv_ref = torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
        y_ref = torch.tanh(F.batch_norm(x_ref, rm_ref, rv_ref, w.double(), b.double(), True, 0.1, 1e-5))
        dx_ref, = torch.autograd.grad(y_ref, x_ref, g.double())
        close(y, y_ref, 1e-5, f"y, call {step}")
        close(dx, dx_ref, 1e-4, f"dx, call {step}")
        close(rm, rm_ref, 1e-5, f"running_mean, call {step}")
        ring = kernels._COUNTER_RINGS[torch.device("cpu")]
        assert int(ring.buf.abs().sum()) == 0, "counters left armed"


def test_counter_ring_rounds_and_kept_slots(monkeypatch):
    """Slots come in consecutive runs and a new round starts at the bottom; slots taken during a graph
    capture (keep=True) are never handed out again; a request that no round can fit gets None (the
    caller then allocates zeroed counters of its own)."""
    import fastgan.ops.triton.batch_norm_act as kernels
    monkeypatch.setattr(kernels._CounterRing, "SLOTS", 40)
    ring = kernels._CounterRing(torch.device("cpu"))
    first = ring.take(25, keep=False)
    assert first.data_ptr() == ring.buf.data_ptr() and first.numel() == 25
    kept = ring.take(10, keep=True)  # slots 25..34, kept
    assert kept.data_ptr() == ring.buf[25:].data_ptr()
    again = ring.take(5, keep=False)  # 35..39
    assert again.data_ptr() == ring.buf[35:].data_ptr()
    wrapped = ring.take(5, keep=False)  # a new round starts above the kept slots
    assert wrapped.data_ptr() == ring.buf[35:].data_ptr()
    assert ring.take(6, keep=False) is None  # only 5 slots lie above the kept ones
    monkeypatch.setattr(kernels, "_COUNTER_RINGS", {})
    assert torch.equal(kernels._counters(torch.device("cpu"), 64), torch.zeros(64, dtype=torch.int32))


@pytest.mark.parametrize("impl,path", FAST_IMPL_PATHS)
def test_float64_and_large_mean(impl, path, triton_path):
    """float64 keeps float64 accuracy; a large common offset does not destroy the variance."""
    triton_path(path)
    x = (torch.randn(4, 5, 6, 7, dtype=torch.float64) + 1e4).requires_grad_(True)
    w, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    y = batch_norm_act(x, w, b, None, None, True, act="tanh", impl=impl)
    y_exp, _, _ = expected(x, w, b, None, None, True, 0.1, 1e-5, "tanh", 0.0)
    close(y, y_exp, 1e-10, "float64")
    x32 = x.detach().float()
    y32 = batch_norm_act(x32, w.float(), b.float(), None, None, True, act="tanh", impl=impl)
    close(y32, y_exp, 2e-3, "float32 with offset 1e4")  # limited by x's own rounding at 1e4 (~5e-4)


@pytest.mark.parametrize("impl,path", FAST_IMPL_PATHS)
@pytest.mark.parametrize("training", [True, False])
def test_float64_with_variance_near_eps(impl, path, training, triton_path):
    """eps enters the float64 statistics at full precision (a kernel scalar is float32 unless passed
    otherwise: 1e-5 rounded to float32 moves invstd by ~1e-8 where var is near eps)."""
    triton_path(path)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3e-3).requires_grad_(True)  # var ~1e-5
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64) * 1e-3, torch.rand(3, dtype=torch.float64) * 1e-5
    y = batch_norm_act(x, w, b, rm.clone(), rv.clone(), training, act="tanh", impl=impl)
    y_exp, _, _ = expected(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, "tanh", 0.0)
    close(y, y_exp, 1e-11, "float64 y")
    g = torch.randn_like(x)
    for got, want, name in zip(torch.autograd.grad(y, (x,), g), torch.autograd.grad(y_exp, (x,), g), ("dx",)):
        close(got, want, 1e-10, name)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _pair(kind, c, act, alpha, **kw):
    """(torch BatchNorm + activation, fastgan module with identical parameters)."""
    torch_bn = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind](c, **kw)
    ours = {"1d": BatchNormAct1d, "2d": BatchNormAct2d}[kind](c, act=act, alpha=alpha, **kw)
    if torch_bn.affine:
        with torch.no_grad():
            torch_bn.weight.uniform_(0.5, 1.5)
            torch_bn.bias.normal_()
    ours.load_state_dict(torch_bn.state_dict())
    if act not in TORCH_ACTS:  # a row added to the table later: its own torch function
        row, a = resolve_act(act, alpha)
        return nn.Sequential(torch_bn, _Lambda(lambda t: row.ref(t, a))), ours
    act_module = TORCH_ACTS[act]() if act != "lrelu" or alpha is None else nn.LeakyReLU(alpha)
    return nn.Sequential(torch_bn, act_module), ours


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,shape,kw", [
    ("2d", (4, 6, 5, 5), {}),
    ("2d", (1, 5, 4, 3), {"momentum": None}),
    ("2d", (3, 4, 3, 3), {"affine": False}),
    ("2d", (3, 4, 3, 3), {"track_running_stats": False}),
    ("1d", (8, 7), {}),
    ("1d", (4, 3, 9), {"momentum": 0.3}),
])
def test_module_matches_torch_over_steps(impl, kind, shape, kw):
    torch_model, ours = _pair(kind, shape[1], "lrelu", None, **kw)
    ours.impl = impl
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = torch_model(x1), ours(x2)
        close(y2, y1, 1e-5, f"step {step} y")
        g = torch.randn(shape)
        y1.backward(g)
        y2.backward(g)
        close(x2.grad, x1.grad, 1e-5, f"step {step} dx")
        if ours.affine:
            close(ours.weight.grad, torch_model[0].weight.grad, 1e-5, "dweight")
            close(ours.bias.grad, torch_model[0].bias.grad, 1e-5, "dbias")
    torch_sd, our_sd = torch_model[0].state_dict(), ours.state_dict()
    assert list(torch_sd) == list(our_sd)
    for key in torch_sd:
        close(our_sd[key], torch_sd[key], 1e-6, key)  # running stats and num_batches_tracked
    torch_model.eval()
    ours.eval()
    x = torch.randn(shape)
    close(ours(x), torch_model(x), 1e-5, "eval y")


def test_module_state_dict_both_ways_and_from_batchnorm():
    bn = nn.BatchNorm2d(6)
    bn(torch.randn(4, 6, 3, 3))  # non-trivial running stats
    ours = BatchNormAct2d(6, act="relu")
    ours.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)

    fused = BatchNormAct2d.from_batchnorm(bn, act="lrelu", alpha=0.1)
    assert fused.weight is bn.weight and fused.bias is bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert getattr(fused, name) is getattr(bn, name)
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert [p for p in fused.parameters()] == [p for p in bn.parameters()]
    reference = nn.BatchNorm2d(6)
    reference.load_state_dict(bn.state_dict())
    x = torch.randn(3, 6, 4, 4)
    close(fused(x), F.leaky_relu(reference(x), 0.1), 1e-5, "from_batchnorm train")
    close(bn.running_mean, reference.running_mean, 1e-6, "shared running_mean updated")
    assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked) == 2
    fused.eval()
    reference.eval()
    close(fused(x), F.leaky_relu(reference(x), 0.1), 1e-5, "from_batchnorm eval")

    plain = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    fused1 = BatchNormAct1d.from_batchnorm(plain, act="tanh")
    assert fused1.weight is None and fused1.running_mean is None
    x = torch.randn(5, 3)
    close(fused1(x), torch.tanh(plain(x)), 1e-5, "1d affine=False")
    with pytest.raises(TypeError, match="BatchNorm2d"):
        BatchNormAct2d.from_batchnorm(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="act"):
        BatchNormAct2d(3, act="swish")


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout,act", [
    ((3, 2, 2, 3), "contiguous", "tanh"),
    ((2, 3, 2, 2), "channels_last", "sigmoid"),
    ((5, 3), "contiguous", "lrelu"),
])
def test_gradcheck_and_gradgradcheck(impl, training, shape, layout, act):
    x = make_x(shape, layout, torch.float64).requires_grad_(True)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64).requires_grad_(True)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x, w, b):  # fresh copies: the running statistics must not drift between evaluations
        return batch_norm_act(x, w, b, rm.clone(), rv.clone(), training, act=act, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def _second_order(impl, x, w, b, act, training):
    """R1-style: d/d(x, w, b) of sum(dy/dx * v), with the first gradient taken with create_graph."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    y = batch_norm_act(x, w, b, rm, rv, training, act=act, impl=impl)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
    v = torch.cos(torch.arange(dx.numel(), dtype=torch.float32)).reshape(dx.shape)
    return torch.autograd.grad((dx * v).sum(), (x, w, b))


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("act", ["lrelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_second_order_matches_reference(act, training, layout, path, triton_path):
    triton_path(path)
    x = make_x((3, 4, 3, 5), layout, torch.float32)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    for got, want in zip(_second_order("triton", x, w, b, act, training), _second_order("ref", x, w, b, act, training)):
        close(got, want, 1e-5, "second order")


def test_triton_gradgradcheck_float64():
    x = make_x((2, 2, 1, 3), "channels_last", torch.float64).requires_grad_(True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, dtype=torch.float64).requires_grad_(True)

    def fn(x, w, b):
        return batch_norm_act(x, w, b, None, None, True, act="tanh", impl="triton")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_triton_row_layouts():
    """The kernels walk rows without division where they are evenly strided (channels_last, (N, C), one
    image), with one division by H*W for NCHW, and refuse other strides (the public op copies those)."""
    import fastgan.ops.triton.batch_norm_act as kernels
    layout = lambda t: kernels._geometry(t)[-1]  # noqa: E731
    assert layout(torch.empty(6, 5)) == 2
    assert layout(torch.empty(4, 3, 5, 6)) == 1
    assert layout(torch.empty(4, 3, 5, 6).to(memory_format=torch.channels_last)) == 2
    assert layout(torch.empty(1, 3, 5, 6)) == 2
    assert layout(torch.empty(4, 3, 1, 6).to(memory_format=torch.channels_last)) == 2
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        kernels._geometry(torch.empty(4, 3, 6, 5).transpose(2, 3))


def test_reference_matches_torch_and_updates_stats():
    x = torch.randn(4, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    nbt = torch.tensor(2)
    y = batch_norm_act_reference(x, None, None, rm, rv, True, None, 1e-5, "relu", num_batches_tracked=nbt)
    y_exp, rm_exp, rv_exp = expected(x, None, None, torch.zeros(3), torch.ones(3), True, 0.5, 1e-5, "relu", 0.0)
    close(y, y_exp, 1e-5, "y")
    close(rm, rm_exp, 1e-6, "cumulative running_mean")
    close(rv, rv_exp, 1e-6, "cumulative running_var")


class _ConvBNAct(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(8, act="lrelu", impl=impl)
        self.bn1d = BatchNormAct1d(8, act="tanh", momentum=None, impl=impl)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return self.bn1d(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("impl", ["cpu"])
def test_torch_compile_fullgraph(impl):
    torch._dynamo.reset()
    eager = _ConvBNAct(impl)
    compiled_model = _ConvBNAct(impl)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = eager(x1), compiled(x2)
        close(y2, y1, 1e-5, "compiled y")
        y1.sum().backward()
        y2.sum().backward()
        close(x2.grad, x1.grad, 1e-5, "compiled dx")
        # dweight comes back through a BatchNorm over 4 samples, which amplifies rounding: a 1e-7 relative
        # change of x moves it by ~1e-5 (measured), so compiled and eager (inductor's conv rounds otherwise)
        # agree to that, not to 1e-5 of its scale.
        close(compiled_model.bn.weight.grad, eager.bn.weight.grad, 5e-5, "compiled dweight")
    for key, value in eager.state_dict().items():
        close(compiled_model.state_dict()[key], value, 1e-5, f"compiled {key}")
    assert int(compiled_model.bn.num_batches_tracked) == 2
    compiled_model.eval()
    eager.eval()
    x = torch.randn(2, 3, 6, 6)
    close(compiled(x), eager(x), 1e-5, "compiled eval")


@pytest.mark.parametrize("impl", IMPLS)
def test_argument_errors(impl):
    x = torch.randn(4, 3, 5, 5)
    ok = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3), running_var=torch.ones(3))

    def call(x=x, **over):
        args = {**ok, **over}
        return batch_norm_act(x, args["weight"], args["bias"], args["running_mean"], args["running_var"],
                              args.get("training", True), impl=impl, **{k: v for k, v in over.items()
                                                                       if k in ("momentum", "eps", "act", "alpha")})

    with pytest.raises(ValueError, match="x must have shape"):
        call(x=torch.randn(4, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        call(x=torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must have dtype"):
        call(x=torch.ones(4, 3).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(x=[[1.0]])
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        call(weight=torch.ones(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=torch.ones(3, 1))
    with pytest.raises(ValueError, match="running_var must have shape"):
        call(running_var=torch.ones(2))
    with pytest.raises(ValueError, match="running_mean and running_var"):
        call(running_var=None)
    with pytest.raises(ValueError, match="weight is on meta"):
        call(weight=torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="act must be one of"):
        call(act="swish")
    with pytest.raises(ValueError, match="alpha"):
        call(act="lrelu", alpha=-1.0)
    with pytest.raises(ValueError, match="eps"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite"):
        call(eps=float("inf"))
    with pytest.raises(ValueError, match="momentum must be a finite number or None"):
        call(momentum=float("nan"))
    with pytest.raises(ValueError, match="num_batches_tracked must be a one-element tensor"):
        batch_norm_act(x, None, None, torch.zeros(3), torch.ones(3), True, momentum=None, impl=impl,
                       num_batches_tracked=torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="training must be a Python bool, got numpy.bool"):
        import numpy as np
        call(training=np.bool_(True))
    with pytest.raises(ValueError, match="momentum=None"):
        call(momentum=None)
    with pytest.raises(ValueError, match="impl must be one of"):
        batch_norm_act(x, None, None, None, None, True, impl="cuda")
    # Batch statistics need more than one value per channel, as torch says.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(x=torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNormAct1d(3)(torch.randn(1, 3))
    # ... but eval mode normalises a single sample with the running statistics.
    y = call(x=torch.randn(1, 3), training=False)
    assert y.shape == (1, 3)
    # weight and bias in x's dtype, or float32 beside bf16 / fp16 x (as torch's BatchNorm); any other
    # pairing is refused, naming the argument, rather than computed at some other precision.
    with pytest.raises(ValueError, match="weight has dtype torch.float64 but x has torch.float32"):
        call(weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias has dtype torch.float64 .* expected float32 or torch.bfloat16"):
        call(x=x.bfloat16(), bias=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight has dtype torch.bfloat16 but x has torch.float32"):
        call(weight=torch.ones(3, dtype=torch.bfloat16))
    mixed = call(x=x.bfloat16())  # float32 weight, bias and statistics beside bf16 x
    assert mixed.dtype == torch.bfloat16 and torch.isfinite(mixed.float()).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_no_channels_gives_an_empty_result(impl, training):
    """C = 0: an empty result and empty gradients, as F.batch_norm gives, not a complaint about the
    batch size (training too: there are 4 * 5 * 5 values per channel)."""
    x = torch.randn(4, 0, 5, 5, requires_grad=True)
    w, b = torch.ones(0, requires_grad=True), torch.zeros(0, requires_grad=True)
    expected = F.batch_norm(x.detach(), None, None, training=training)  # (torch's own fails given empty weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a warning from the reference's statistics
        y = batch_norm_act(x, w, b, torch.zeros(0), torch.ones(0), training, act="lrelu", impl=impl)
    assert y.shape == expected.shape == (4, 0, 5, 5)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == x.shape and dw.shape == db.shape == (0,)


@pytest.mark.parametrize("impl", ["cpu"])
@pytest.mark.parametrize("training", [True, False])
def test_custom_ops_opcheck_and_second_order(impl, training):
    """The torch.library ops (what torch.compile traces; eager calls their autograd.Function twins):
    opcheck (schema, fake tensors, autograd registration), and gradgradcheck through them."""
    from fastgan.ops.batch_norm_act import _backward_op, _forward_op, _update_running_stats_op
    x = make_x((3, 4, 2, 3), "channels_last", torch.float64).requires_grad_(True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64).requires_grad_(True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    stats = (None, None) if training else (rm, rv)
    act = ACTIVATIONS["tanh"].index
    torch.library.opcheck(_forward_op, (x, w, b, *stats, training, 1e-5, act, 0.0, impl))
    y, mean, var = _forward_op(x, w, b, *stats, training, 1e-5, act, 0.0, impl)
    g = torch.randn_like(y)
    torch.library.opcheck(_backward_op, (g, x.detach(), w.detach(), b.detach(), mean, var, training, 1e-5, act, 0.0,
                                         impl))
    torch.library.opcheck(_update_running_stats_op, (rm.clone(), rv.clone(), mean, var, 18, 0.1, None))

    def fn(x, w, b):
        return _forward_op(x, w, b, *stats, training, 1e-5, act, 0.0, impl)[0]

    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
def test_cpu_large_planes(training):
    """Large planes in the C++ planar kernels (2 x 230 x 230 per channel, 413 KiB: many lane vectors,
    a tail, one float->double move of the lane sums per plane)."""
    x = make_x((2, 2, 230, 230), "contiguous", torch.float32).requires_grad_(True)
    w, b = (torch.rand(2) + 0.5).requires_grad_(True), torch.randn(2).requires_grad_(True)
    rm, rv = torch.randn(2), torch.rand(2) + 0.5
    y = batch_norm_act(x, w, b, rm.clone(), rv.clone(), training, act="lrelu", impl="cpu")
    x64 = x.detach().double().requires_grad_(True)
    y_exp, _, _ = expected(x64, w.detach(), b.detach(), rm, rv, training, 0.1, 1e-5, "lrelu", 0.2)
    close(y, y_exp, 1e-5, "y")
    g = torch.randn_like(x)
    close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_exp, x64, g.double())[0], 1e-5, "dx")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 37, 4, 4), (2, 130, 3, 5), (4, 9, 17), (64, 40, 2, 8)])
def test_cpu_planar_channel_groups(training, shape):
    """The C++ planar kernels reduce groups of channels (n outer, channels inner, lane sums per plane):
    group sizes that do not divide C, planes shorter than / not a multiple of the 16 lanes. Results
    match the float64 specification and are bit-identical whatever the thread count (a channel's sums
    never depend on how channels are grouped or split among threads)."""
    c = shape[1]
    x = make_x(shape, "contiguous", torch.float32)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    g = torch.randn(shape)

    def run():
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        rms, rvs = rm.clone(), rv.clone()
        y = batch_norm_act(xs, ws, bs, rms, rvs, training, act="lrelu", impl="cpu")
        return (y, *torch.autograd.grad(y, (xs, ws, bs), g), rms, rvs)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        multi = run()
    finally:
        torch.set_num_threads(threads)
    for a, m, what in zip(single, multi, ("y", "dx", "dw", "db", "running_mean", "running_var")):
        assert torch.equal(a, m), f"{what} depends on the thread count"
    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
    y_exp, rm_exp, rv_exp = expected(x64, w64, b64, rm, rv, training, 0.1, 1e-5, "lrelu", 0.2)
    grads_exp = torch.autograd.grad(y_exp, (x64, w64, b64), g.double())
    close(single[0], y_exp, 1e-5, "y")
    for got, want, what in zip(single[1:4], grads_exp, ("dx", "dw", "db")):
        close(got, want, 1e-5, what)
    close(single[4], rm_exp, 1e-5, "running_mean")
    close(single[5], rv_exp, 1e-5, "running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_eager_autograd_nodes_without_affine(training, layout):
    """Eager impl="cpu" calls record C++ autograd nodes (BatchNormActFn; its backward node re-derives
    second-order terms with ATen ops): first and second derivatives without weight and bias, against
    gradcheck / gradgradcheck in float64, and the node really is the C++ one."""
    x = make_x((3, 4, 2, 3), layout, torch.float64).requires_grad_(True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    y = batch_norm_act(x, None, None, rm.clone(), rv.clone(), training, act="tanh", impl="cpu")
    assert "BatchNormActFn" in y.grad_fn.name()

    def fn(x_):
        return batch_norm_act(x_, None, None, rm.clone(), rv.clone(), training, act="tanh", impl="cpu")

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_r1_penalty_through_a_nonlinear_use_matches_the_reference(impl, training):
    """R1 as the Trainer computes it: grad of D's output w.r.t. its input with create_graph=True, then
    one backward of output + penalty. Downstream of the op the output is used non-linearly (a
    convolution then a square), so the incoming gradient depends on the op's own output: the double
    backward must take partial derivatives (not follow that history again, which double counted or
    freed the forward's saved tensors: 'backward through the graph a second time')."""
    torch.manual_seed(0)
    x0, w0, b0 = torch.randn(4, 6, 5, 5), torch.rand(6) + 0.5, torch.randn(6)
    conv_w0 = torch.randn(2, 6, 3, 3)
    results = {}
    for name in ("ref", impl):
        x = x0.clone().requires_grad_()
        w, b, conv_w = w0.clone().requires_grad_(), b0.clone().requires_grad_(), conv_w0.clone().requires_grad_()
        rm, rv = torch.zeros(6), torch.ones(6)
        y = batch_norm_act(x, w, b, rm, rv, training, act="lrelu", impl=name)
        out = F.conv2d(y, conv_w).pow(2).sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        (out + 0.1 * g.pow(2).sum()).backward()
        results[name] = [t.grad.clone() for t in (x, w, b, conv_w)]
    for actual, expected in zip(results[impl], results["ref"]):
        torch.testing.assert_close(actual, expected, rtol=2e-4, atol=1e-4)
