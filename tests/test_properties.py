"""Bad input, property-based (hypothesis): every public op either returns the reference's answer or
raises ValueError / TypeError whose message names the offending argument. Never a crash, never a
silently wrong result, never a mutated input.

Shapes, strides (non-contiguous views, stride-0 expansions, storage offsets), dtypes, devices
(``meta`` stands in for "a device the fast path cannot run on"), zero-size dimensions, NaN / inf
values and wrong argument types are drawn at random; the implementations ``cpu`` (fastgan._C) and
``triton`` (through the interpreter here) are compared against ``ref`` on each draw.

Examples are derandomised (the same draws every run, so CI is stable); set
``FASTGAN_HYPOTHESIS_EXPLORE=1`` to draw fresh ones, and ``FASTGAN_HYPOTHESIS_SCALE=10`` to run ten
times as many.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastgan.ops import LOSS_KINDS, d_loss, g_loss

# FASTGAN_TEST_IMPLS=ref,cpu narrows the comparison (scripts/asan_check.sh: the C++ path only).
# Triton runs on these CPU tensors only through the interpreter (tests/conftest.py turns it on when
# there is no GPU); on a GPU machine the Triton kernels are covered by tests/gpu/.
IMPLS = tuple(i for i in ("ref", "cpu", "triton")
              if i in os.environ.get("FASTGAN_TEST_IMPLS", "ref,cpu,triton").split(",")
              and (i != "triton" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")))
FAST_IMPLS = tuple(i for i in IMPLS if i != "ref")
KINDS = tuple(LOSS_KINDS)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_SCALE = float(os.environ.get("FASTGAN_HYPOTHESIS_SCALE", "1"))


def props(max_examples: int):
    """Settings of one property: few examples (the interpreter is slow, the CPU shared), no deadline."""
    return settings(max_examples=max(1, int(max_examples * _SCALE)), deadline=None,
                    derandomize=os.environ.get("FASTGAN_HYPOTHESIS_EXPLORE") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)


# ------------------------------------------------------------------------------------------------
# Strategies: values, layouts
# ------------------------------------------------------------------------------------------------

# Special values planted into otherwise Gaussian data: extremes the losses must survive (|x| <= 1e4
# is the documented finite range), signed zeros, and the non-finite ones.
FINITE_SPECIALS = (0.0, -0.0, 1e4, -1e4, 30.0, -30.0, 88.7, -88.7, 1e-30, -1e-30)
NONFINITE = (math.nan, math.inf, -math.inf)

# Sizes: tiny, odd, around the Triton blocks (128 minimum, 4096 per program), batch 1.
SIZES = st.one_of(st.integers(1, 9), st.integers(10, 300), st.sampled_from([127, 128, 129, 4097]))


@st.composite
def values(draw, n: int, dtype: torch.dtype, nonfinite: bool) -> torch.Tensor:
    """n values in ``dtype`` (contiguous, 1-D): scaled Gaussians with a few planted specials."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 3.0, 30.0, 1e3, 1e4]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
    pool = FINITE_SPECIALS + (NONFINITE if nonfinite else ())
    for _ in range(draw(st.integers(0, min(n, 3)))):
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(pool))
    if nonfinite and draw(st.booleans()):  # make sure some draws do carry a non-finite value
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(NONFINITE))
    return x.to(dtype)


LOGIT_LAYOUTS = ("flat", "column", "strided", "wide_column", "transposed", "offset", "expanded")


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor holding the 1-D values ``x`` as one logit per sample, in shape (N,) or (N, 1) and
    the memory layout named: the kernels see its data only through ``reshape``/``contiguous``."""
    n = x.shape[0]
    if layout == "flat":
        return x.clone()
    if layout == "column":
        return x.clone().reshape(n, 1)
    if layout == "strided":                       # every other element of a longer buffer
        buf = torch.full((2 * n,), 7.0, dtype=x.dtype)
        buf[::2] = x
        return buf[::2]
    if layout == "wide_column":                   # (N, 1) column of an (N, 3) matrix: stride (3, 1)
        buf = torch.full((n, 3), -5.0, dtype=x.dtype)
        buf[:, 1] = x
        return buf[:, 1:2]
    if layout == "transposed":                    # (N, 1) view of a (1, N) row
        return x.clone().reshape(1, n).t()
    if layout == "offset":                        # a view that starts 5 elements into its storage
        buf = torch.full((n + 5,), 3.0, dtype=x.dtype)
        buf[5:] = x
        return buf[5:]
    if layout == "expanded":                      # stride 0: one value seen n times
        return x[:1].clone().expand(n)
    raise AssertionError(layout)


@st.composite
def logit_tensor(draw, n: int, dtype: torch.dtype, nonfinite: bool = False) -> torch.Tensor:
    return lay_out(draw(values(n, dtype, nonfinite)), draw(st.sampled_from(LOGIT_LAYOUTS)))


# ------------------------------------------------------------------------------------------------
# Comparison helpers
# ------------------------------------------------------------------------------------------------

# float64: the reference's F.softplus switches to the identity above 20 (threshold=20), a relative
# error of up to exp(-20) = 2e-9 that the fast paths do not make; 1e-8 leaves room for it.
def value_rtol(dtype: torch.dtype) -> float:
    # Losses accumulate in float32 (float64 for float64 inputs) whatever the input dtype.
    return 1e-8 if dtype == torch.float64 else 1e-5


def grad_rtol(dtype: torch.dtype) -> float:
    # Gradients come back in the input's dtype: one rounding to bf16/fp16 may differ by an ulp.
    return {torch.float64: 1e-8, torch.float32: 1e-5}.get(dtype, 1e-2)


def magnitude(*xs: torch.Tensor, kind: str) -> float:
    """The size of the loss terms: |x| (|x|^2 for least squares), at least 1."""
    finite = torch.cat([x.detach().reshape(-1).double() for x in xs])
    finite = finite[torch.isfinite(finite)]
    m = max(1.0, float(finite.abs().max()) + 1.0) if finite.numel() else 1.0
    return m * m if kind == "least_squares" else m


def assert_same(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float, what: str) -> None:
    """Equal within ``rtol`` of ``scale``; NaN where the reference is NaN and nowhere else."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_unchanged(before: torch.Tensor, after: torch.Tensor, name: str) -> None:
    assert torch.equal(before.isnan(), after.isnan()) and torch.equal(
        torch.nan_to_num(before), torch.nan_to_num(after)), f"{name} was modified in place"


def names_argument(exc: BaseException, *names: str) -> None:
    msg = str(exc)
    assert any(n in msg for n in names), f"error message {msg!r} names none of {names}"


def leaf(x: torch.Tensor) -> torch.Tensor:
    """The same values and strides as ``x``, as a leaf that requires grad."""
    return x.detach().requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# d_loss / g_loss: valid input of every shape, layout and dtype
# ------------------------------------------------------------------------------------------------

def _d_loss_run(real, fake, kind, impl, upstream):
    r, f = leaf(real), leaf(fake)
    out = d_loss(r, f, kind, impl=impl)
    grads = torch.autograd.grad(out.loss * upstream, (r, f))
    return out, grads


@props(60)
@given(data=st.data(), kind=st.sampled_from(KINDS), dtype=st.sampled_from(FLOAT_DTYPES),
       n_real=SIZES, n_fake=SIZES, upstream=st.sampled_from([1.0, -0.5, 3.0]))
def test_d_loss_matches_reference_on_finite_input(data, kind, dtype, n_real, n_fake, upstream):
    real = data.draw(logit_tensor(n_real, dtype), label="real_logits")
    fake = data.draw(logit_tensor(n_fake, dtype), label="fake_logits")
    # fp16 overflows above 65504: those draws become inf, which the non-finite property covers.
    assume(torch.isfinite(real).all() and torch.isfinite(fake).all())
    real_before, fake_before = real.clone(), fake.clone()
    ref, (ref_gr, ref_gf) = _d_loss_run(real, fake, kind, "ref", upstream)
    scale = magnitude(real, fake, kind=kind)
    for impl in FAST_IMPLS:
        out, (gr, gf) = _d_loss_run(real, fake, kind, impl, upstream)
        for name, a, e in zip(out._fields, out, ref):
            assert_same(a, e, value_rtol(dtype), scale, f"{impl} {name}")
            assert a.dim() == 0
        assert out.loss.requires_grad and not any(t.requires_grad for t in out[1:])
        gscale = abs(upstream) * (scale ** 0.5 if kind == "least_squares" else 1.0)
        assert_same(gr, ref_gr, grad_rtol(dtype), gscale / n_real, f"{impl} grad real_logits")
        assert_same(gf, ref_gf, grad_rtol(dtype), gscale / n_fake, f"{impl} grad fake_logits")
        assert_unchanged(real_before, real, "real_logits")
        assert_unchanged(fake_before, fake, "fake_logits")


@props(50)
@given(data=st.data(), kind=st.sampled_from(KINDS), dtype=st.sampled_from(FLOAT_DTYPES), n=SIZES,
       upstream=st.sampled_from([1.0, -2.0]))
def test_g_loss_matches_reference_on_finite_input(data, kind, dtype, n, upstream):
    fake = data.draw(logit_tensor(n, dtype), label="fake_logits")
    assume(torch.isfinite(fake).all())
    before = fake.clone()
    f = leaf(fake)
    ref = g_loss(f, kind, impl="ref")
    (ref_g,) = torch.autograd.grad(ref * upstream, f)
    scale = magnitude(fake, kind=kind)
    for impl in FAST_IMPLS:
        f = leaf(fake)
        loss = g_loss(f, kind, impl=impl)
        (g,) = torch.autograd.grad(loss * upstream, f)
        assert_same(loss, ref, value_rtol(dtype), scale, f"{impl} g_loss")
        gscale = abs(upstream) * (scale ** 0.5 if kind == "least_squares" else 1.0)
        assert_same(g, ref_g, grad_rtol(dtype), gscale / n, f"{impl} grad fake_logits")
        assert_unchanged(before, fake, "fake_logits")


@props(30)
@given(data=st.data(), kind=st.sampled_from(KINDS), dtype=st.sampled_from(FLOAT_DTYPES),
       n_real=st.integers(1, 40), n_fake=st.integers(1, 40))
def test_losses_without_grad_match_reference(data, kind, dtype, n_real, n_fake):
    """The forward-only path (no input requires grad, or grad mode off) computes the same values."""
    real = data.draw(logit_tensor(n_real, dtype), label="real_logits")
    fake = data.draw(logit_tensor(n_fake, dtype), label="fake_logits")
    assume(torch.isfinite(real).all() and torch.isfinite(fake).all())
    scale = magnitude(real, fake, kind=kind)
    ref = d_loss(real, fake, kind, impl="ref")
    ref_g = g_loss(fake, kind, impl="ref")
    for impl in FAST_IMPLS:
        with torch.no_grad():
            out = d_loss(leaf(real), leaf(fake), kind, impl=impl)
        for name, a, e in zip(out._fields, out, ref):
            assert_same(a, e, value_rtol(dtype), scale, f"{impl} {name} (no_grad)")
        assert_same(g_loss(fake, kind, impl=impl), ref_g, value_rtol(dtype), scale, f"{impl} g_loss")


# ------------------------------------------------------------------------------------------------
# d_loss / g_loss: NaN / inf
# ------------------------------------------------------------------------------------------------

@props(40)
@given(data=st.data(), kind=st.sampled_from(KINDS), dtype=st.sampled_from(FLOAT_DTYPES),
       n_real=st.integers(1, 200), n_fake=st.integers(1, 200))
def test_nonfinite_logits_never_give_a_finite_answer_on_fast_paths(data, kind, dtype, n_real, n_fake):
    """A NaN/inf logit makes every returned statistic NaN (as the reference does), and the gradient
    of the fast paths is non-finite exactly at the non-finite logits and equal to the reference's
    formula elsewhere — so a non-finite skip in the optimizer catches the step."""
    real = data.draw(logit_tensor(n_real, dtype, nonfinite=True), label="real_logits")
    fake = data.draw(logit_tensor(n_fake, dtype, nonfinite=True), label="fake_logits")
    assume(not (torch.isfinite(real).all() and torch.isfinite(fake).all()))
    ref = d_loss(real, fake, kind, impl="ref")
    assert all(torch.isnan(t) for t in ref), ref
    assert torch.isnan(g_loss(fake, kind, impl="ref")) == (not torch.isfinite(fake).all())
    for impl in FAST_IMPLS:
        out, (gr, gf) = _d_loss_run(real, fake, kind, impl, 1.0)
        assert all(torch.isnan(t) for t in out), (impl, out)
        for name, x, g in (("real_logits", real, gr), ("fake_logits", fake, gf)):
            bad = ~torch.isfinite(x)
            if x.stride(0) == 0 and bad.any():   # one value seen n times: its gradient sums them
                bad = torch.ones_like(bad)
            assert not torch.isfinite(g[bad]).any(), f"{impl}: finite gradient at a non-finite {name}"
        f = leaf(fake)
        loss = g_loss(f, kind, impl=impl)
        (g,) = torch.autograd.grad(loss, f)
        if torch.isfinite(fake).all():
            assert torch.isfinite(loss) and torch.isfinite(g).all()
        else:
            assert torch.isnan(loss)
            assert not torch.isfinite(g).all(), f"{impl}: NaN g_loss with an all-finite gradient"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_logit_makes_the_gradient_nonfinite(impl, bad, kind):
    """Every implementation, the reference included: a loss that is NaN because a logit is not finite
    must not come with an all-finite gradient — an optimizer fed such a gradient (zeros, say) would
    still move the parameters (Adam's momentum) instead of skipping the step."""
    fake = torch.tensor([0.5, bad, -1.0], requires_grad=True)
    real = torch.tensor([2.0, -0.25], requires_grad=True)
    loss = g_loss(fake, kind, impl=impl)
    (g,) = torch.autograd.grad(loss, fake)
    assert torch.isnan(loss)
    assert not torch.isfinite(g).all(), f"g_loss: NaN loss, finite gradient {g}"
    out = d_loss(real, fake, kind, impl=impl)
    gr, gf = torch.autograd.grad(out.loss, (real, fake))
    assert torch.isnan(out.loss)
    assert not torch.isfinite(gf).all(), f"d_loss: NaN loss, finite gradient {gf}"


# ------------------------------------------------------------------------------------------------
# d_loss / g_loss: wrong arguments
# ------------------------------------------------------------------------------------------------

# (description, builder of the bad value from a good (N,) float32 tensor, the names the error may
# use, the exception types allowed)
def _bad_logits(n: int):
    good = torch.randn(n)
    return [
        ("python list", lambda: good.tolist(), (TypeError,)),
        ("numpy array", lambda: good.numpy(), (TypeError,)),
        ("python float", lambda: 0.5, (TypeError,)),
        ("None", lambda: None, (TypeError,)),
        ("string", lambda: "logits", (TypeError,)),
        ("int64 tensor", lambda: good.to(torch.int64), (ValueError, TypeError)),
        ("bool tensor", lambda: good > 0, (ValueError, TypeError)),
        ("complex tensor", lambda: good.to(torch.complex64), (ValueError, TypeError)),
        ("float8 tensor", lambda: good.to(torch.float8_e4m3fn), (ValueError, TypeError)),
        ("0-d tensor", lambda: good[0].clone(), (ValueError,)),
        ("(N, 2)", lambda: torch.randn(n, 2), (ValueError,)),
        ("(N, 1, 1)", lambda: good.reshape(n, 1, 1), (ValueError,)),
        ("(1, N)", lambda: good.reshape(1, n) if n > 1 else torch.randn(1, 2), (ValueError,)),
        ("(0,)", lambda: torch.empty(0), (ValueError,)),
        ("(0, 1)", lambda: torch.empty(0, 1), (ValueError,)),
        ("(N, 0)", lambda: torch.empty(n, 0), (ValueError,)),
        ("meta tensor beside a cpu one", lambda: torch.empty(n, device="meta"), (ValueError,)),
    ]


_N_BAD = len(_bad_logits(1))


@props(60)
@given(n=st.integers(1, 20), which=st.sampled_from(["real_logits", "fake_logits"]),
       case=st.integers(0, _N_BAD - 1), kind=st.sampled_from(KINDS), impl=st.sampled_from(IMPLS + ("auto",)))
def test_d_loss_rejects_bad_logits_naming_them(n, which, case, kind, impl):
    desc, make, errors = _bad_logits(n)[case]
    good = torch.randn(n)
    args = {"real_logits": good, "fake_logits": good.clone()}
    args[which] = make()
    with pytest.raises(errors) as info:
        d_loss(args["real_logits"], args["fake_logits"], kind, impl=impl)
    names_argument(info.value, which)


@props(40)
@given(n=st.integers(1, 20), case=st.integers(0, _N_BAD - 2),  # the last case needs a second tensor
       kind=st.sampled_from(KINDS), impl=st.sampled_from(IMPLS + ("auto",)))
def test_g_loss_rejects_bad_logits_naming_them(n, case, kind, impl):
    desc, make, errors = _bad_logits(n)[case]
    with pytest.raises(errors) as info:
        g_loss(make(), kind, impl=impl)
    names_argument(info.value, "fake_logits")


BAD_OPTIONS = [None, 3, 1.5, "", "Hinge", "bce", ("hinge",), b"hinge", torch.tensor(1)]


@props(30)
@given(bad=st.sampled_from(BAD_OPTIONS), impl=st.sampled_from(IMPLS + ("auto",)), n=st.integers(1, 9))
def test_losses_reject_bad_kind_naming_it(bad, impl, n):
    x = torch.randn(n)
    with pytest.raises((ValueError, TypeError)) as info:
        d_loss(x, x, bad, impl=impl)
    names_argument(info.value, "kind")
    with pytest.raises((ValueError, TypeError)) as info:
        g_loss(x, bad, impl=impl)
    names_argument(info.value, "kind")


@props(30)
@given(bad=st.sampled_from([None, 0, "CPU", "cuda", "torch", "", ("cpu",), "reference"]),
       kind=st.sampled_from(KINDS), n=st.integers(1, 9))
def test_losses_reject_bad_impl_naming_it(bad, kind, n):
    x = torch.randn(n)
    with pytest.raises((ValueError, TypeError)) as info:
        d_loss(x, x, kind, impl=bad)
    names_argument(info.value, "impl")
    with pytest.raises((ValueError, TypeError)) as info:
        g_loss(x, kind, impl=bad)
    names_argument(info.value, "impl")


@props(30)
@given(a=st.sampled_from(FLOAT_DTYPES), b=st.sampled_from(FLOAT_DTYPES), impl=st.sampled_from(IMPLS + ("auto",)),
       n=st.integers(1, 9))
def test_d_loss_rejects_mixed_dtypes_naming_them(a, b, impl, n):
    assume(a != b)
    with pytest.raises(ValueError) as info:
        d_loss(torch.randn(n).to(a), torch.randn(n).to(b), impl=impl)
    names_argument(info.value, "fake_logits", "real_logits")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_losses_on_the_wrong_device_name_the_implementation(impl):
    """``meta`` tensors stand in for a device a fast path cannot run on: a clear ValueError naming
    ``impl`` and the device, not a crash inside a kernel."""
    x = torch.randn(5, device="meta")
    with pytest.raises(ValueError) as info:
        d_loss(x, x, impl=impl)
    names_argument(info.value, "impl")
    assert "meta" in str(info.value)
    with pytest.raises(ValueError) as info:
        g_loss(x, impl=impl)
    names_argument(info.value, "impl")


def test_losses_on_meta_with_auto_give_the_reference_shapes():
    """``impl="auto"`` on a device without a fast path runs the reference: on ``meta`` that yields
    meta tensors of the right shape and dtype (shape inference), never a kernel launch."""
    x = torch.randn(6, 1, device="meta", dtype=torch.bfloat16)
    with warnings.catch_warnings():  # the "runs the reference" warning is issued once per process
        warnings.simplefilter("ignore", RuntimeWarning)
        out = d_loss(x, x, "hinge", impl="auto")
        loss = g_loss(x, "hinge", impl="auto")
    for t in list(out) + [loss]:
        assert t.device.type == "meta" and t.shape == () and t.dtype == torch.float32
