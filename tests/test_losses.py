"""fastgan.ops.d_loss / g_loss: every kind x every implementation against formulas written here,
independently of fastgan.ops.losses (values, the four statistics, gradients)."""
import math

import pytest
import torch

from fastgan.ops import d_loss, g_loss, LOSS_KINDS

IMPLS = ["ref", "cpu", "triton"]
KINDS = list(LOSS_KINDS)
DLOSS_FIELDS = ("loss", "value", "jsd", "d_real", "d_fake")  # the order of expected_d's stats
# 1, 7, 1000 and one larger than any block size of the kernels (Triton: 4096 per program).
SIZES = [1, 7, 1000, 4096 * 2 + 5]


def softplus(x):  # log(1 + e^x), written in float64 for the expected values
    return torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)


def expected_d(r, f, kind):
    """(loss, value, jsd, d_real, d_fake), d loss/d r, d loss/d f, in float64."""
    r, f = r.double().reshape(-1), f.double().reshape(-1)
    nr, nf = r.numel(), f.numel()
    if kind in ("minimax", "nonsaturating"):
        loss = softplus(-r).mean() + softplus(f).mean()
        gr, gf = -torch.sigmoid(-r) / nr, torch.sigmoid(f) / nf
    elif kind == "hinge":
        loss = (1 - r).clamp(min=0).mean() + (1 + f).clamp(min=0).mean()
        gr, gf = -(r < 1).double() / nr, (f > -1).double() / nf
    elif kind == "wasserstein":
        loss = f.mean() - r.mean()
        gr, gf = -torch.ones_like(r) / nr, torch.ones_like(f) / nf
    else:
        loss = 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean()
        gr, gf = (r - 1) / nr, f / nf
    value = -softplus(-r).mean() - softplus(f).mean()
    stats = torch.stack([loss, value, (value + math.log(4)) / 2, torch.sigmoid(r).mean(), torch.sigmoid(f).mean()])
    return stats, gr, gf


def expected_g(f, kind):
    f = f.double().reshape(-1)
    n = f.numel()
    if kind == "minimax":
        return -softplus(f).mean(), -torch.sigmoid(f) / n
    if kind == "nonsaturating":
        return softplus(-f).mean(), -torch.sigmoid(-f) / n
    if kind in ("hinge", "wasserstein"):
        return -f.mean(), -torch.ones_like(f) / n
    return 0.5 * ((f - 1) ** 2).mean(), (f - 1) / n


def tol(dtype):
    return {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]


def close(actual, expected, rtol, atol_scale=1.0):
    actual, expected = actual.double(), expected.double()
    # atol relative to the tensor's scale: a mean of terms of size ~1 is accurate to rtol of that.
    atol = rtol * max(1.0, float(expected.abs().max())) * atol_scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def logits(n, dtype, shape_2d=False, scale=3.0):
    x = (torch.randn(n, dtype=torch.float64) * scale).to(dtype)
    return x.reshape(n, 1) if shape_2d else x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_d_loss_matches_formulas(impl, kind, n):
    r = logits(n, torch.float32).requires_grad_()
    f = logits(n + 3, torch.float32, shape_2d=True).requires_grad_()  # batch sizes may differ
    out = d_loss(r, f, kind, impl=impl)
    stats, gr, gf = expected_d(r.detach(), f.detach(), kind)
    close(torch.stack(list(out)), stats, 1e-5)
    assert all(t.dim() == 0 and t.device == r.device for t in out)
    assert out.loss.requires_grad and not any(t.requires_grad for t in out[1:])
    got_r, got_f = torch.autograd.grad(out.loss, (r, f))
    assert got_r.shape == r.shape and got_f.shape == f.shape
    close(got_r, gr, 1e-5, atol_scale=1.0 / n)
    close(got_f.reshape(-1), gf, 1e-5, atol_scale=1.0 / n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_g_loss_matches_formulas(impl, kind, n):
    f = logits(n, torch.float32, shape_2d=n % 2 == 1).requires_grad_()
    loss = g_loss(f, kind, impl=impl)
    exp_loss, exp_grad = expected_g(f.detach(), kind)
    close(loss, exp_loss, 1e-5)
    (grad,) = torch.autograd.grad(loss, f)
    close(grad.reshape(-1), exp_grad, 1e-5, atol_scale=1.0 / n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_fake", [1029, 3000])  # Triton: 2048- and 4096-wide single programs
def test_dtypes_accumulate_in_float32_and_return_input_dtype_grads(impl, dtype, kind, n_fake):
    r = logits(37, dtype).requires_grad_()
    f = logits(n_fake, dtype).requires_grad_()
    out = d_loss(r, f, kind, impl=impl)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    stats, gr, gf = expected_d(r.detach(), f.detach(), kind)  # exact on the rounded inputs
    close(torch.stack(list(out)), stats, tol(dtype))
    got_r, got_f = torch.autograd.grad(out.loss * 2.0, (r, f))  # a non-unit upstream gradient
    assert got_r.dtype == dtype and got_f.dtype == dtype
    close(got_r, 2 * gr, tol(dtype), atol_scale=1.0 / 37)
    close(got_f, 2 * gf, tol(dtype), atol_scale=1.0 / n_fake)
    loss = g_loss(f, kind, impl=impl)
    exp_loss, exp_grad = expected_g(f.detach(), kind)
    close(loss, exp_loss, tol(dtype))
    (grad,) = torch.autograd.grad(loss, f)
    assert grad.dtype == dtype
    close(grad, exp_grad, tol(dtype), atol_scale=1.0 / n_fake)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("create_graph", [False, True])
def test_low_precision_gradients_under_a_loss_scale(impl, dtype, create_graph):
    """Mixed precision: fp16 / bf16 logits, the loss scaled by GradScaler's starting 65536 before backward.
    d loss / d logit (~1/n) is kept in float32 and scaled there: in fp16 the scale alone is inf, and
    1/n for a large batch rounds into fp16's subnormals (percent errors). Each gradient must be the
    exact one to within the logits' dtype's rounding -- under create_graph (a penalty on the gradient
    under mixed precision) too, where the gradient is recomputed differentiably."""
    n, scale = 65536, 65536.0
    r, f = logits(n, dtype).requires_grad_(), logits(n, dtype).requires_grad_()
    out = d_loss(r, f, "nonsaturating", impl=impl)
    got_r, got_f = torch.autograd.grad(out.loss * scale, (r, f), create_graph=create_graph)
    (got_g,) = torch.autograd.grad(g_loss(f, "nonsaturating", impl=impl) * scale, (f,), create_graph=create_graph)
    _, gr, gf = expected_d(r.detach(), f.detach(), "nonsaturating")
    _, gg = expected_g(f.detach(), "nonsaturating")
    info = torch.finfo(dtype)
    for got, exp in ((got_r, gr), (got_f, gf), (got_g, gg)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        exact = scale * exp.double()
        # one rounding to the dtype: half an ulp, whose size is fixed below the smallest normal number
        bound = (info.eps / 2) * torch.maximum(exact.abs(), torch.full_like(exact, info.smallest_normal))
        excess = ((got.double() - exact).abs() / bound).max()
        assert excess <= 1.0, f"{impl} {dtype}: a gradient is off by {excess:.3g} times its rounding"
        assert got.requires_grad == create_graph


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_stay_finite(impl, kind):
    big = torch.tensor([1e4, -1e4, 0.5, -1e4, 1e4], dtype=torch.float32)
    r, f = big.clone().requires_grad_(), big.flip(0).clone().requires_grad_()
    out = d_loss(r, f, kind, impl=impl)
    stats, gr, gf = expected_d(r.detach(), f.detach(), kind)
    close(torch.stack(list(out)), stats, 1e-5)
    got_r, got_f = torch.autograd.grad(out.loss, (r, f))
    assert torch.isfinite(got_r).all() and torch.isfinite(got_f).all()
    close(got_r, gr, 1e-5)
    close(got_f, gf, 1e-5)
    loss = g_loss(f, kind, impl=impl)
    (grad,) = torch.autograd.grad(loss, f)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    close(loss, expected_g(f.detach(), kind)[0], 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_confident_discriminator_small_losses_keep_their_relative_accuracy(impl, dtype):
    """A D that tells real from fake (|logits| ~ 8..9) has log-D losses of ~1e-4: they keep the relative
    accuracy of their dtype (log(1 + e) in float32 rounds away e's low digits: 5e-4 errors)."""
    r = torch.linspace(8.0, 9.0, 50, dtype=dtype)
    f = -torch.linspace(8.2, 9.1, 37, dtype=dtype)
    out = d_loss(r, f, "nonsaturating", impl=impl)
    stats, _, _ = expected_d(r, f, "nonsaturating")
    rtol = tol(dtype)
    for name in ("loss", "value", "d_fake"):  # each of size ~1e-4
        torch.testing.assert_close(getattr(out, name).double(), stats[DLOSS_FIELDS.index(name)], rtol=rtol, atol=0)
    for kind, x in (("nonsaturating", -f), ("minimax", f)):  # G's loss where G fools D
        torch.testing.assert_close(g_loss(x, kind, impl=impl).double(), expected_g(x, kind)[0], rtol=rtol, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["minimax", "nonsaturating"])
def test_float64_logits_beyond_twenty_keep_float64_accuracy(impl, kind):
    """softplus(x) = x + log1p(exp(-x)) is not x beyond x = 20 in float64 (torch's F.softplus default
    threshold, a float32 cut-off): the last term is 2e-9, and sigmoid(x) is 1 - 2e-9."""
    r = torch.linspace(-40.0, 40.0, 23, dtype=torch.float64).requires_grad_()
    f = torch.linspace(-38.0, 38.0, 19, dtype=torch.float64).requires_grad_()
    out = d_loss(r, f, kind, impl=impl)
    stats, gr, gf = expected_d(r.detach(), f.detach(), kind)
    close(torch.stack(list(out)), stats, tol(torch.float64))
    got_r, got_f = torch.autograd.grad(out.loss, (r, f))
    close(got_r, gr, tol(torch.float64), atol_scale=1.0 / 23)
    close(got_f, gf, tol(torch.float64), atol_scale=1.0 / 19)
    loss = g_loss(f, kind, impl=impl)
    exp_loss, exp_grad = expected_g(f.detach(), kind)
    close(loss, exp_loss, tol(torch.float64))
    (grad,) = torch.autograd.grad(loss, f)
    close(grad, exp_grad, tol(torch.float64), atol_scale=1.0 / 19)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["real", "fake"])
def test_nonfinite_logits_give_nan_results(impl, kind, bad, side):
    r, f = torch.randn(9), torch.randn(5000)
    (r if side == "real" else f)[3] = bad
    out = d_loss(r, f, kind, impl=impl)
    assert all(torch.isnan(t) for t in out), out
    if side == "fake":
        assert torch.isnan(g_loss(f, kind, impl=impl))


def float64_logits_away_from_kinks():
    """(real, fake) float64 logits requiring grad. Hinge has kinks at +-1: the real logits keep away
    from them so that finite differences are valid."""
    r = (torch.rand(6, dtype=torch.float64) * 0.8 + 1.1) * torch.tensor([1, -1, 1, -1, 1, -1.0], dtype=torch.float64)
    f = torch.randn(5, 1, dtype=torch.float64) * 0.3
    return r.requires_grad_(), f.requires_grad_()


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_cpu_float64(kind):
    r, f = float64_logits_away_from_kinks()
    assert torch.autograd.gradcheck(lambda a, b: d_loss(a, b, kind, impl="cpu").loss, (r, f))
    assert torch.autograd.gradcheck(lambda b: g_loss(b, kind, impl="cpu"), (f,))


@pytest.mark.parametrize("kind", KINDS)
def test_gradgradcheck_cpu_float64(kind):
    """Double backward (create_graph=True, as a penalty on the loss's input gradient needs) is exact,
    not the silent zero a gradient saved as a constant would give."""
    r, f = float64_logits_away_from_kinks()
    assert torch.autograd.gradgradcheck(lambda a, b: d_loss(a, b, kind, impl="cpu").loss, (r, f))
    assert torch.autograd.gradgradcheck(lambda b: g_loss(b, kind, impl="cpu"), (f,))


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("kind", ["minimax", "nonsaturating", "least_squares"])
def test_second_order_gradients_match_the_reference(impl, kind):
    def grad_norm(impl_, r, f):
        out = d_loss(r, f, kind, impl=impl_)
        gr, gf = torch.autograd.grad(out.loss + g_loss(f, kind, impl=impl_), (r, f), create_graph=True)
        return (gr.pow(2).sum() + gf.pow(2).sum()) * 1e4  # the gradient's norm, differentiated again

    r0, f0 = logits(37, torch.float32), logits(29, torch.float32, shape_2d=True)
    results = []
    for impl_ in ("ref", impl):
        r, f = r0.clone().requires_grad_(), f0.clone().requires_grad_()
        penalty = grad_norm(impl_, r, f)
        results.append((penalty.detach(), *torch.autograd.grad(penalty, (r, f))))
    for actual, expected in zip(results[1], results[0]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    assert results[0][1].abs().sum() > 0  # a real second derivative (not the trivial zero)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_twice_with_retain_graph_and_a_scaled_gradient(impl):
    r, f = logits(50, torch.float32).requires_grad_(), logits(40, torch.float32).requires_grad_()
    out = d_loss(r, f, impl=impl)
    (out.loss * 3.0).backward(retain_graph=True)
    first = r.grad.clone(), f.grad.clone()
    out.loss.backward()
    torch.testing.assert_close(r.grad, first[0] * 4 / 3)
    torch.testing.assert_close(f.grad, first[1] * 4 / 3)
    assert not any(t.requires_grad for t in out[1:])  # the statistics are detached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_node_hands_over_its_gradients_and_recomputes_them_when_retained(dtype):
    """The C++ node gives autograd the gradients the forward computed (scaled in place when the
    incoming gradient is not 1); a retained graph's second backward recomputes them; G's node too;
    2-D logits get 2-D gradients; modifying a logit in place before backward is caught."""
    r0, f0 = logits(33, dtype), logits(21, dtype, shape_2d=True)
    expected = {}
    for impl in ("ref", "cpu"):
        r, f = r0.clone().requires_grad_(), f0.clone().requires_grad_()
        out = d_loss(r, f, "minimax", impl=impl)
        out.loss.backward(retain_graph=True)           # incoming gradient exactly 1
        first = r.grad.clone(), f.grad.clone()
        (out.loss * -0.5).backward()                   # recomputed, scaled, accumulated
        g = f0.clone().requires_grad_()
        loss = g_loss(g, "least_squares", impl=impl)
        loss.backward(torch.tensor(2.0, dtype=loss.dtype), retain_graph=True)
        loss.backward()
        expected.setdefault(impl, (first, r.grad, f.grad, g.grad))
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    (first, gr, gf, gg), (first_ref, gr_ref, gf_ref, gg_ref) = expected["cpu"], expected["ref"]
    for actual, wanted in zip((*first, gr, gf, gg), (*first_ref, gr_ref, gf_ref, gg_ref)):
        assert actual.dtype == dtype and actual.shape == wanted.shape
        torch.testing.assert_close(actual, wanted, **tol)
    r, f = r0.clone().requires_grad_(), f0.clone().requires_grad_()
    a, b = r * 1, f * 1
    out = d_loss(a, b, impl="cpu")
    with torch.no_grad():
        a.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_no_grad_calls_skip_the_gradient_and_backward_then_fails_clearly():
    r, f = torch.randn(10), torch.randn(10)
    for impl in IMPLS:
        with torch.no_grad():
            out = d_loss(r, f, impl=impl)
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("impl", ["auto", "ref", "cpu", "triton"])
def test_errors_name_the_argument(impl):
    good = torch.randn(4)
    cases = [
        ((torch.randn(0), good), "real_logits"),
        ((good, torch.randn(0)), "fake_logits"),
        ((torch.randn(4, 2), good), "real_logits"),
        ((good, torch.randn(2, 2, 1)), "fake_logits"),
        ((good, torch.randn(4, dtype=torch.float64)), "fake_logits"),
        ((torch.arange(4), good), "real_logits"),
        ((good.to(torch.device("meta")), good), "fake_logits"),
        ((good.to_sparse(), good), "real_logits"),   # not a confusing error from reshape / contiguous
        ((good, torch.nested.nested_tensor([good, good])), "fake_logits"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            d_loss(*args, impl=impl)
    with pytest.raises(TypeError, match="real_logits"):
        d_loss([1.0, 2.0], good, impl=impl)
    with pytest.raises(ValueError, match="kind"):
        d_loss(good, good, kind="vanilla", impl=impl)
    with pytest.raises(ValueError, match="kind"):
        g_loss(good, kind="", impl=impl)
    with pytest.raises(ValueError, match="fake_logits"):
        g_loss(torch.randn(3, 3), impl=impl)


def test_unknown_impl_and_impl_device_mismatch():
    with pytest.raises(ValueError, match="impl"):
        d_loss(torch.randn(3), torch.randn(3), impl="cuda")
    meta = torch.randn(3, device="meta")
    with pytest.raises(ValueError, match="impl='cpu'"):
        g_loss(meta, impl="cpu")


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_torch_compile_fullgraph(impl):
    def step(r, f):
        out = d_loss(r, f, "nonsaturating", impl=impl)
        return out.loss + g_loss(f, "nonsaturating", impl=impl), out.jsd

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if impl == "triton" else "inductor")
    r = torch.randn(33, requires_grad=True)
    f = torch.randn(33, 1, requires_grad=True)
    total, jsd = compiled(r, f)
    total.backward()
    r2, f2 = r.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    exp_total, exp_jsd = step(r2, f2)
    exp_total.backward()
    torch.testing.assert_close(total, exp_total)
    torch.testing.assert_close(jsd, exp_jsd)
    torch.testing.assert_close(r.grad, r2.grad)
    torch.testing.assert_close(f.grad, f2.grad)


def test_auto_picks_cpu_kernel_here():
    from fastgan import _dispatch
    assert _dispatch.extension() is not None, "fastgan._C must be built for the test suite"
    assert _dispatch.auto_impl("d_loss", torch.device("cpu")) == "cpu"
    assert _dispatch.auto_impl("g_loss", torch.device("cpu")) == "cpu"
