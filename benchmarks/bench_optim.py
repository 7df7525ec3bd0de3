"""One optimizer step (zero_grad included) over GAN-shaped parameters: fastgan.optim vs torch.optim.

Problems (``benchmark.group``): the parameters of a GAN network at three sizes,

* ``0.5M`` – the MLP generator of the benchmarks' ``mlp`` problem (64 -> 256 -> 512 -> 784),
* ``5M``   – a DCGAN generator (ConvTranspose 4x4 + BatchNorm) with ngf = 76,
* ``50M``  – the same with ngf = 256 (runs one round unless ``--benchmark-enable``: it is slow on CPU).

``adam-step-<size>`` contenders: ``fastgan`` (FusedAdam), ``torch-foreach`` (Adam(foreach=True)),
``torch-fused`` (Adam(fused=True)). ``adam-ema-step-<size>``: ``fastgan`` (FusedAdam with an EMA
updated in the same pass) vs ``torch-fused+lerp`` (Adam(fused=True) then ``torch._foreach_lerp_``).

What is timed, per round: ``step()`` then ``zero_grad()``. torch's contenders use torch's default
``zero_grad(set_to_none=True)`` and get fresh gradient tensors assigned before each round (as autograd
hands them over); fastgan uses ``zero_grad(set_to_none=False)`` -- a real fill of its flat gradient
buffer inside the timed region -- and gets the gradients copied into that buffer before each round
(as autograd accumulates into it). Before timing, every contender's first step is checked against
Adam's closed-form first step (``p - lr * g / (|g| + eps)``) and, with EMA, the shadow against
``lerp(p0, p1, 1 - beta)``.

Real timing: ``python -m pytest benchmarks/bench_optim.py --benchmark-enable``.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from fastgan.optim import EMA, FusedAdam

LR, BETAS, EPS, EMA_BETA = 2e-4, (0.5, 0.999), 1e-8, 0.999


def _dcgan_generator_shapes(ngf: int, nz: int = 100, nc: int = 3) -> list[tuple[int, ...]]:
    widths = [ngf * 8, ngf * 4, ngf * 2, ngf]
    shapes, c_in = [], nz
    for w in widths:
        shapes += [(c_in, w, 4, 4), (w,), (w,)]  # ConvTranspose2d weight, BatchNorm weight and bias
        c_in = w
    shapes.append((c_in, nc, 4, 4))
    return shapes


SIZES = {
    "0.5M": [(256, 64), (256,), (512, 256), (512,), (784, 512), (784,)],
    "5M": _dcgan_generator_shapes(76),
    "50M": _dcgan_generator_shapes(256),
}
# Timed rounds per size with --benchmark-enable (one round otherwise).
ROUNDS = {"0.5M": 200, "5M": 40, "50M": 6}


def _params_and_grads(size: str):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in SIZES[size]]
    grads = [torch.randn(s, generator=gen) for s in SIZES[size]]
    return params, grads


class _Model(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.ps = torch.nn.ParameterList(params)


def _build(contender: str, size: str):
    """(step_fn, setup_fn, params, grads, ema_shadows_or_None, optimizer) for one contender."""
    params, grads = _params_and_grads(size)
    if contender == "fastgan" or contender == "fastgan+ema":
        ema = EMA(_Model(params), EMA_BETA) if contender == "fastgan+ema" else None
        opt = FusedAdam(params, lr=LR, betas=BETAS, eps=EPS, ema=ema)
        (bucket,) = opt._buckets[0]
        opt.zero_grad(set_to_none=False)  # .grad of every parameter = its view of the flat buffer
        flat_src = torch.cat([g.reshape(-1) for g in grads])

        def setup():
            bucket.flat_grad.copy_(flat_src)  # what autograd's accumulation left in the buffer

        def step():
            opt.step()
            opt.zero_grad(set_to_none=False)

        return step, setup, params, grads, (ema.shadow_params if ema else None), opt
    kw = {"torch-foreach": dict(foreach=True), "torch-fused": dict(fused=True),
          "torch-fused+lerp": dict(fused=True)}[contender]
    opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **kw)
    shadows = [p.detach().clone() for p in params] if contender == "torch-fused+lerp" else None

    def setup():
        for p, g in zip(params, grads):
            p.grad = g  # what autograd hands over after zero_grad(set_to_none=True)

    if shadows is None:
        def step():
            opt.step()
            opt.zero_grad()
    else:
        def step():
            opt.step()
            torch._foreach_lerp_(shadows, params, 1 - EMA_BETA)
            opt.zero_grad()

    return step, setup, params, grads, shadows, opt


def _check_first_step(contender: str, size: str, step, setup, params, grads, shadows) -> None:
    """Adam's first step from zero state is p - lr * g / (|g| + eps) (bias corrections cancel)."""
    p0 = [p.detach().clone() for p in params]
    setup()
    step()
    for p, a, g in zip(params, p0, grads):
        expected = a - LR * g / (g.abs() + EPS)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=LR * 1e-4,
                                   msg=lambda m: f"{contender} ({size}) computes a different step: {m}")
    if shadows is not None:
        for s, a, p in zip(shadows, p0, params):
            torch.testing.assert_close(s, torch.lerp(a, p.detach(), 1 - EMA_BETA), rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{contender} ({size}) EMA differs: {m}")


def _run(benchmark, group: str, contender: str, size: str) -> None:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        step, setup, params, grads, shadows, opt = _build(contender, size)
    _check_first_step(contender, size, step, setup, params, grads, shadows)
    benchmark.group = f"{group}-{size}"
    benchmark.extra_info["contender"] = contender
    benchmark.extra_info["parameters"] = sum(p.numel() for p in params)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    enabled = not getattr(benchmark, "disabled", False)
    rounds = ROUNDS[size] if enabled else 1
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2 if enabled else 0)
    del step, setup, params, grads, shadows, opt
    gc.collect()


# contender outermost, size innermost: pytest then runs a size's contenders back to back, so they
# share the machine's state (other processes' load drifts over minutes on shared machines).
@pytest.mark.parametrize("contender", ["fastgan", "torch-foreach", "torch-fused"])
@pytest.mark.parametrize("size", list(SIZES))
def bench_adam_step(benchmark, contender, size):
    _run(benchmark, "adam-step", contender, size)


@pytest.mark.parametrize("contender", ["fastgan+ema", "torch-fused+lerp"])
@pytest.mark.parametrize("size", list(SIZES))
def bench_adam_ema_step(benchmark, contender, size):
    _run(benchmark, "adam-ema-step", contender, size)
