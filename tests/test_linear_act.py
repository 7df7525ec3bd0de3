"""fastgan.ops.linear_act: every activation x implementation against formulas written here (values
and gradients of x, weight, bias), shapes (batch 1, odd sizes, sizes that are no multiple of any
block, extra leading dims, non-contiguous x), dtypes, gain, double backward, torch.compile, errors."""
import pytest
import torch
import torch.nn.functional as F

from fastgan.ops import ACTIVATIONS, bias_act, linear_act, resolve_act

IMPLS = ["cpu", "triton"]
ACTS = list(ACTIVATIONS)
ACT_FNS = {"linear": lambda t, a: t, "relu": lambda t, a: torch.relu(t), "lrelu": lambda t, a: F.leaky_relu(t, a),
           "tanh": lambda t, a: torch.tanh(t), "sigmoid": lambda t, a: torch.sigmoid(t)}


def expected(x, w, b, act, alpha, gain):
    z = x.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    return ACT_FNS.get(act, ACTIVATIONS[act].ref)(z, alpha) * gain  # a row added later: its own ref


def close(actual, expected_, rtol):
    actual, expected_ = actual.detach().double(), expected_.detach().double()
    atol = rtol * max(1.0, float(expected_.abs().max()))
    torch.testing.assert_close(actual, expected_, rtol=rtol, atol=atol)


# (x shape, out_features): batch 1, odd sizes, sizes past one block (Triton interpreter: 64), extra dims
SHAPES = [((1, 7), 5), ((6, 37), 19), ((70, 33), 67), ((2, 3, 20), 9)]


def check(impl, act, x, w, b, gain, alpha, rtol):
    y = linear_act(x, w, b, act, alpha, gain, impl=impl)
    a = resolve_act(act, alpha)[1]  # the row's default alpha for None (lrelu: 0.2)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    close(y, expected(x, w, b, act, a, gain), rtol)
    g = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, leaves, g)
    dl = [t.detach().double().requires_grad_() for t in leaves]
    xd, wd = dl[0], dl[1]
    bd = dl[2] if b is not None else None
    want = torch.autograd.grad(expected(xd, wd, bd, act, a, gain), dl, g.double())
    for got_t, want_t, leaf in zip(got, want, leaves):
        assert got_t.shape == leaf.shape
        close(got_t, want_t, rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_fp32(impl, act, shape):
    xs, n = SHAPES[shape]
    x = torch.randn(xs, requires_grad=True)
    w = (torch.randn(n, xs[-1]) / xs[-1] ** 0.5).requires_grad_()
    b = torch.randn(n, requires_grad=True)
    # Triton's tl.dot is exact under the interpreter; on a GPU it may use tf32 (see tests/gpu)
    check(impl, act, x, w, b, 1.0 if shape % 2 else 0.6, None, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bias_custom_alpha_noncontiguous(impl):
    x = torch.randn(40, 9).t().requires_grad_()  # (9, 40), non-contiguous
    w = torch.randn(11, 40, requires_grad=True)
    check(impl, "lrelu", x, w, None, 2.0, 0.01, 1e-5)
    wt = torch.randn(40, 11).t().requires_grad_()  # non-contiguous weight
    check(impl, "tanh", x, wt, torch.randn(11, requires_grad=True), 1.0, None, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, act, dtype):
    x = torch.randn(5, 24).to(dtype).requires_grad_()
    w = (torch.randn(13, 24) / 5).to(dtype).requires_grad_()
    b = torch.randn(13).to(dtype).requires_grad_()
    check(impl, act, x, w, b, 1.0, None, 2e-2)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_gradgradcheck_float64(impl, act):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    z = (x @ w.t() + b).detach()
    assert (z.abs() > 1e-3).all()  # away from relu's kink

    def fn(x_, w_, b_):
        return linear_act(x_, w_, b_, act, None, 1.3, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("act", ACTS)
def test_triton_second_order_matches_reference(act):
    # gradient penalty of a two-layer D: || d D(x) / d x ||^2, then its gradient w.r.t. all parameters
    def penalty(impl, x, w1, b1, w2):
        h = linear_act(x, w1, b1, act, None, 1.2, impl=impl)
        d = linear_act(h, w2, None, "linear", impl=impl)
        (gx,) = torch.autograd.grad(d.sum(), x, create_graph=True)
        return (gx * gx).sum()

    params0 = [torch.randn(6, 10), torch.randn(17, 10) / 3, torch.randn(17), torch.randn(1, 17) / 4]
    results = {}
    for impl in ("ref", "cpu", "triton"):
        params = [p.clone().requires_grad_() for p in params0]
        loss = penalty(impl, *params)
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # linear: x plays no part
        results[impl] = (loss, *[torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    for impl in ("cpu", "triton"):
        for got, want in zip(results[impl], results["ref"]):
            close(got, want, 1e-5)
    assert results["ref"][2].abs().sum() > 0  # the penalty does reach the first layer's weight


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_torch_compile_fullgraph(impl):
    torch.manual_seed(1)
    w1, b1 = torch.randn(16, 8) / 3, torch.randn(16)
    w2, b2 = torch.randn(3, 16) / 4, torch.randn(3)

    def model(x, w1, b1, w2, b2):
        h = linear_act(x, w1, b1, "lrelu", impl=impl)
        return bias_act(linear_act(h, w2, None, "linear", impl=impl), b2, dim=1, act="tanh", clamp=0.9, impl=impl)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if impl == "triton" else "inductor")
    x = torch.randn(5, 8)
    ps = [t.clone().requires_grad_() for t in (w1, b1, w2, b2)]
    ps_ref = [t.clone().requires_grad_() for t in (w1, b1, w2, b2)]
    y = compiled(x, *ps)
    y_ref = model(x, *ps_ref)
    close(y, y_ref, 1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, q in zip(ps, ps_ref):
        close(p.grad, q.grad, 1e-5)


def test_empty_batch():
    for impl in IMPLS:
        x = torch.randn(0, 4, requires_grad=True)
        w = torch.randn(3, 4, requires_grad=True)
        y = linear_act(x, w, torch.zeros(3), "relu", impl=impl)
        assert y.shape == (0, 3)
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.randn(2, 3), torch.randn(4, 5)), {}, ValueError, "x must have shape"),
    ((torch.randn(2, 3), torch.randn(4, 3, 1)), {}, ValueError, "weight"),
    ((torch.randn(2, 3), torch.randn(4, 3).double()), {}, ValueError, "weight"),
    ((torch.randn(2, 3), torch.randn(4, 3), torch.randn(5)), {}, ValueError, "bias"),
    ((torch.randn(2, 3), torch.randn(4, 3)), {"act": "swish"}, ValueError, "act"),
    ((torch.randn(2, 3), torch.randn(4, 3)), {"act": "lrelu", "alpha": -1}, ValueError, "alpha"),
    ((torch.randn(2, 3), torch.randn(4, 3)), {"gain": float("inf")}, ValueError, "gain"),
    ((torch.randn(2, 3), torch.randn(4, 3)), {"impl": "gpu"}, ValueError, "impl"),
    ((torch.randn(2, 3), "w"), {}, TypeError, "weight"),
])
def test_argument_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        linear_act(*args, **kwargs)


def test_a_bool_alpha_is_refused_after_an_equal_number_was_cached():
    """The eager CPU path caches resolved (act, alpha) pairs; True == 1 must not reach that cache entry."""
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    linear_act(x, w, None, "lrelu", 1)
    with pytest.raises(ValueError, match="alpha"):
        linear_act(x, w, None, "lrelu", True)


@pytest.mark.parametrize("act", ["lrelu", "tanh"])
def test_registered_custom_op_is_twice_differentiable(act):
    # what torch.compile runs (eager calls use a C++ autograd node on the same kernels)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    index = ACTIVATIONS[act].index

    def fn(x_, w_, b_):
        return torch.ops.fastgan.linear_act(x_, w_, b_, index, 0.2, 1.3, "cpu")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.fixture
def gemm_backend():
    """Sets the float32 GEMM of the C++ linear_act for one test, then restores it."""
    from fastgan._dispatch import extension
    ext = extension()
    previous = ext.linear_gemm_backend("")
    yield ext.linear_gemm_backend
    ext.linear_gemm_backend(previous)


@pytest.mark.parametrize("backend", ["aten", "onednn"])
@pytest.mark.parametrize("act", ["lrelu", "tanh"])
def test_cpu_gemm_backends(gemm_backend, backend, act):
    """The C++ path's float32 GEMMs run through torch.mm or oneDNN's matmul (forward and both backward
    products, contiguous and transposed operands); both match the specification, and a double
    backward through the oneDNN setting still builds its graph from differentiable torch ops."""
    from fastgan._dispatch import extension
    if backend == "onednn" and not extension().linear_onednn_available():
        pytest.skip("this torch has no oneDNN matmul")
    gemm_backend(backend)
    x = torch.randn(33, 70, requires_grad=True)
    w = (torch.randn(45, 70) / 8).requires_grad_()
    check("cpu", act, x, w, torch.randn(45, requires_grad=True), 1.0, None, 1e-5)
    xt = torch.randn(70, 33).t().requires_grad_()  # non-contiguous x and weight
    wt = (torch.randn(70, 45) / 8).t().requires_grad_()
    check("cpu", act, xt, wt, None, 1.0, 0.1, 1e-5)
    # gradient penalty through the op: d/dparams || d y / d x ||^2 against the float64 formula
    b = torch.randn(45, requires_grad=True)
    (gx,) = torch.autograd.grad(linear_act(x, w, b, act, impl="cpu").sum(), x, create_graph=True)
    got = torch.autograd.grad((gx * gx).sum(), (w, b))
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    (gxd,) = torch.autograd.grad(expected(xd, wd, bd, act, 0.2, 1.0).sum(), xd, create_graph=True)
    want = torch.autograd.grad((gxd * gxd).sum(), (wd, bd))
    for got_t, want_t in zip(got, want):
        close(got_t, want_t, 1e-5)


def test_gemm_backend_argument(gemm_backend):
    with pytest.raises(ValueError, match="linear_gemm_backend"):
        gemm_backend("mkl")


def test_cpu_eager_fast_path_admits_only_plain_calls():
    """The eager shortcut (straight to the C++ autograd node) takes plain 2-D float32 CPU calls and
    declines everything the general path must see (which then validates, casts, reshapes or raises);
    both give the specification's values and gradients."""
    from fastgan.ops.linear_act import _cpu_eager_fast
    x = torch.randn(6, 9, requires_grad=True)
    w = torch.randn(4, 9, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = _cpu_eager_fast(x, w, b, "lrelu", None, "auto")
    assert y is not None and y.grad_fn is not None
    close(y, expected(x, w, b, "lrelu", 0.2, 1.0), 1e-5)
    check("cpu", "lrelu", x, w, b, 1.0, None, 1e-5)  # through linear_act, which takes the shortcut
    declined = [
        ((x.unsqueeze(0), w, b, "lrelu", None, "auto"), "3-D x"),
        ((x.bfloat16(), w.bfloat16(), b.bfloat16(), "lrelu", None, "auto"), "bfloat16"),
        ((x, w.double(), b, "lrelu", None, "auto"), "mixed dtypes"),
        ((x, w, torch.randn(8)[::2], "lrelu", None, "auto"), "strided bias"),
        ((x, w, torch.randn(5), "lrelu", None, "auto"), "wrong bias size"),
        ((x, w[:, :5], b, "lrelu", None, "auto"), "mismatched features"),
        ((x, w, b, "swish", None, "auto"), "unknown act"),
        ((x, w, b, "lrelu", -1.0, "auto"), "negative alpha"),
        ((x, w, b, "lrelu", None, "ref"), "impl=ref"),
    ]
    for args, what in declined:
        assert _cpu_eager_fast(*args) is None, what
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cpu_eager_fast(x, w, b, "lrelu", None, "auto") is None
        assert linear_act(x, w, b, "lrelu").dtype == torch.bfloat16  # the general path casts as F.linear


def test_triton_dot_precision_follows_torchs_float32_matmul_setting():
    """The kernel's float32 products round like torch's own: IEEE unless torch allows TF32 (an H100 run
    with Triton's TF32 default put 1e-3 errors into float32 layers)."""
    from fastgan.ops.triton.linear_act import dot_precision
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) is None and dot_precision(torch.float64) is None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    # torch >= 2.9's API (after which reading allow_tf32 raises): followed too.
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            assert dot_precision(torch.float32) == "tf32"
            matmul.fp32_precision = "ieee"
            assert dot_precision(torch.float32) == "ieee"
        finally:
            matmul.fp32_precision = before
