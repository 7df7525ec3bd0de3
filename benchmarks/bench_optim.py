"""One optimizer step (zero_grad included) over GAN-shaped parameters: fastgan.optim vs torch.optim.

Problems (``benchmark.group``): the parameters of a GAN network at three sizes,

* ``0.5M`` – the MLP generator of the benchmarks' ``mlp`` problem (64 -> 256 -> 512 -> 784),
* ``5M``   – a DCGAN generator (ConvTranspose 4x4 + BatchNorm) with ngf = 76,
* ``50M``  – the same with ngf = 256 (runs one round unless ``--benchmark-enable``: it is slow on CPU).

``adam-step-<size>`` contenders: ``fastgan`` (FusedAdam), ``torch-foreach`` (Adam(foreach=True)),
``torch-fused`` (Adam(fused=True)). ``adam-ema-step-<size>``: ``fastgan`` (FusedAdam with an EMA
updated in the same pass) vs ``torch-fused+lerp`` (Adam(fused=True) then ``torch._foreach_lerp_``).

What is timed, per round: a step and the zero_grad that readies the gradients for the next backward.
torch's contenders run ``step()`` then torch's default ``zero_grad(set_to_none=True)`` and get their
gradient tensors assigned before each round (as autograd hands them over); fastgan runs
``step(zero_grad=True)`` -- the same as ``step(); zero_grad(set_to_none=False)``, the zeroing of its
flat gradient buffer done in the update's pass, inside the timed region -- and gets the gradients
copied into that buffer (as autograd accumulates into it). Every contender's gradients are freshly written before each round, parameter by
parameter from the last to the first (the order in which backward produces them): a step right after
backward finds the most recently written gradients in the caches and has to write the dirty lines
back, and all contenders should start from that same state (an earlier version wrote only fastgan's
gradients, which charged it ~20 MB of write-backs per round at 5M that torch's contenders never paid).
"limit": the fewest bytes a step must move -- read parameter, gradient and both moments, write the
parameter and moments, 28 bytes per float32 parameter (36 with the EMA's shadow read and written) --
over the device's copy bandwidth measured in the same run (``common.measure_copy_bandwidth``).
Before timing, every contender's first step is checked against Adam's closed-form first step
(``p - lr * g / (|g| + eps)``) and, with EMA, the shadow against ``lerp(p0, p1, 1 - beta)``.

Real timing: ``python -m pytest benchmarks/bench_optim.py --benchmark-enable``. pytest-benchmark runs
one contender after another; on a shared machine whose load drifts, the interleaved run is the one to
quote: ``python benchmarks/bench_optim.py [--threads N] [--repeats R]`` times every contender of a size
in each round (rotating the order) and prints medians and the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import pytest
import torch

import common
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
# The floor of a step in bytes per float32 parameter: Adam reads p, g, m, v and writes p, m, v; the EMA
# also reads and writes its shadow.
BYTES_PER_PARAM = {"adam-step": 7 * 4, "adam-ema-step": 9 * 4}
_bandwidth: dict[str, float] = {}


def copy_bandwidth(device: str) -> float:
    """The device's copy bandwidth (bytes/s, read + written), measured once per run."""
    if device not in _bandwidth:
        _bandwidth[device] = common.measure_copy_bandwidth(device)
    return _bandwidth[device]


# Timed rounds per size with --benchmark-enable (one round otherwise).
ROUNDS = {"0.5M": 200, "5M": 40, "50M": 6}


# CUDA too where there is one (the CUDA kernels in csrc/cuda/optim.cu); its groups end in " (cuda)".
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params_and_grads(size: str, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in SIZES[size]]
    grads = [torch.randn(s, generator=gen).to(device) for s in SIZES[size]]
    return params, grads


def _synchronised(fn, device: str):
    """fn, then a wait for the device's queue: the host clock then times the kernels, not their launch."""
    if device != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


class _Model(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.ps = torch.nn.ParameterList(params)


def _build(contender: str, size: str, device: str = "cpu"):
    """(step_fn, setup_fn, params, grads, ema_shadows_or_None, optimizer) for one contender."""
    step, setup, *rest = _build_unsynchronised(contender, size, device)
    return (_synchronised(step, device), _synchronised(setup, device), *rest)


def _build_unsynchronised(contender: str, size: str, device: str):
    params, grads = _params_and_grads(size, device)
    if contender == "fastgan" or contender == "fastgan+ema":
        ema = EMA(_Model(params), EMA_BETA) if contender == "fastgan+ema" else None
        opt = FusedAdam(params, lr=LR, betas=BETAS, eps=EPS, ema=ema)
        (bucket,) = opt._buckets[0]
        views = bucket.grad_views
        for p, view in zip(params, views):
            p.grad = view  # what autograd leaves after a backward: .grad = its view of the flat buffer

        def setup():
            for view, g in zip(reversed(views), reversed(grads)):
                view.copy_(g)  # what autograd's accumulation leaves in the buffer, output layer first

        def step():
            opt.step(zero_grad=True)

        return step, setup, params, grads, (ema.shadow_params if ema else None), opt
    kw = {"torch-foreach": dict(foreach=True), "torch-fused": dict(fused=True),
          "torch-fused+lerp": dict(fused=True)}[contender]
    opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **kw)
    shadows = [p.detach().clone() for p in params] if contender == "torch-fused+lerp" else None
    fresh = [torch.empty_like(g) for g in grads]

    def setup():
        for p, f, g in zip(reversed(params), reversed(fresh), reversed(grads)):
            f.copy_(g)
            p.grad = f  # what autograd hands over after zero_grad(set_to_none=True), output layer first

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


def _run(benchmark, group: str, contender: str, size: str, device: str) -> None:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        step, setup, params, grads, shadows, opt = _build(contender, size, device)
    _check_first_step(contender, size, step, setup, params, grads, shadows)
    benchmark.group = f"{group}-{size}" + ("" if device == "cpu" else f" ({device})")
    benchmark.extra_info["contender"] = contender
    benchmark.extra_info["parameters"] = numel = sum(p.numel() for p in params)
    bandwidth = copy_bandwidth(device)
    benchmark.extra_info.update(bytes_per_step=numel * BYTES_PER_PARAM[group], copy_bandwidth=bandwidth,
                                limit_s=numel * BYTES_PER_PARAM[group] / bandwidth,
                                limit_basis="bytes moved / copy bandwidth")
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
@pytest.mark.parametrize("device", DEVICES)
def bench_adam_step(benchmark, contender, size, device):
    _run(benchmark, "adam-step", contender, size, device)


@pytest.mark.parametrize("contender", ["fastgan+ema", "torch-fused+lerp"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("device", DEVICES)
def bench_adam_ema_step(benchmark, contender, size, device):
    _run(benchmark, "adam-ema-step", contender, size, device)


# ---- interleaved run (python benchmarks/bench_optim.py) -------------------------------------------------
CONTENDERS = ["fastgan", "torch-foreach", "torch-fused", "fastgan+ema", "torch-fused+lerp"]
RATIOS = [("torch-foreach", "fastgan"), ("torch-fused", "fastgan"), ("torch-fused+lerp", "fastgan+ema")]


def interleaved(sizes, rounds: dict[str, int], contenders=CONTENDERS) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of every contender, each round timing all contenders of a size back to back
    in a rotating order (two warm-up rounds dropped). Same setup/step/check as the pytest suite."""
    results = {}
    for size in sizes:
        gc.collect()
        built = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for name in contenders:
                step, setup, params, grads, shadows, _ = _build(name, size)
                _check_first_step(name, size, step, setup, params, grads, shadows)
                built[name] = (step, setup)
        times = {name: [] for name in contenders}
        for r in range(rounds[size] + 2):
            k = r % len(contenders)
            for name in contenders[k:] + contenders[:k]:
                step, setup = built[name]
                setup()
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                if r >= 2:
                    times[name].append(t1 - t0)
        results[size] = times
        del built
        gc.collect()
    return results


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--repeats", type=int, default=1, help="rounds per size = ROUNDS[size] * repeats")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    results = interleaved(sizes, {s: ROUNDS[s] * args.repeats for s in sizes})
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    for size, times in results.items():
        meds = {n: statistics.median(t) for n, t in times.items()}
        print(f"{size}: " + "  ".join(f"{n} {meds[n] * 1e3:.3f} ms" for n in times))
        for slow, fast in RATIOS:
            per_round = sorted(a / b for a, b in zip(times[slow], times[fast]))
            q = len(per_round) // 4
            print(f"  {slow} / {fast}: {statistics.median(per_round):.2f}x per-round median "
                  f"(quartiles {per_round[q]:.2f}-{per_round[-q - 1]:.2f}, {len(per_round)} rounds); "
                  f"ratio of medians {meds[slow] / meds[fast]:.2f}x")


if __name__ == "__main__":
    _main()
