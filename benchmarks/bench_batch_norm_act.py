"""Forward + backward of BatchNorm + LeakyReLU(0.2) on a convolution's output, at DCGAN sizes:
fastgan's BatchNormAct2d (``fastgan.ops.batch_norm_act``) vs eager ``nn.BatchNorm2d`` +
``nn.LeakyReLU(0.2, inplace=True)`` (as the PyTorch DCGAN example writes it) vs ``torch.compile`` of
that eager module. Problems (``benchmark.group``): batch 64 feature maps of a DCGAN, 64 channels at
32x32 down to 512 channels at 4x4, in NCHW (what a convolution returns by default) and one in
channels_last.

What is timed, per round: the training-mode forward (batch statistics, running-statistics update)
and the backward to the input, weight and bias (``torch.autograd.grad``, so nothing accumulates
across rounds). Before timing, each contender's output, gradients and running statistics are
checked against the eager module's on the same input. On CUDA each problem is also timed as a CUDA
graph replay of the same step (groups ending in `` (graphed)``, ``common.op_timing_modes``): an eager
call there is bound by the host, the replay shows the kernels' device time.

    python -m pytest benchmarks/bench_batch_norm_act.py --benchmark-enable
"""
from __future__ import annotations

import copy
import gc
import time

import pytest
import torch
import torch._dynamo
from torch import nn

import common
from fastgan.nn import BatchNormAct2d

# Every torch.compile contender goes through the same wrapper code object, so each new problem is a
# recompile of it: past torch's default limit (8) dynamo would silently run the later problems eagerly
# under the "torch_compile" name.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

BATCH = 64
# (channels, height = width, layout): a DCGAN's BatchNorm inputs at 64x64 images, largest map first.
SHAPES = [(64, 32, "nchw"), (128, 16, "nchw"), (256, 8, "nchw"), (512, 4, "nchw"), (128, 16, "channels_last")]
CONTENDERS = ("eager", "torch_compile", "fastgan")
ROUNDS = 30


def _problem(channels: int, size: int, layout: str) -> str:
    return f"bn-lrelu-b{BATCH}-c{channels}-{size}x{size}-{layout}"


def _eager_module(channels: int, device) -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
    return nn.Sequential(bn, nn.LeakyReLU(0.2, inplace=True)).to(device)


def _contender(name: str, channels: int, device):
    """(callable module, its BatchNorm parameters and buffers holder, compile time or None)."""
    eager = _eager_module(channels, device)
    if name == "eager":
        return eager, eager[0], None
    if name == "fastgan":
        fused = BatchNormAct2d(channels, act="lrelu", alpha=0.2).to(device)
        fused.load_state_dict(eager[0].state_dict())
        return fused, fused, None
    module = copy.deepcopy(eager)
    return torch.compile(module), module[0], 0.0


def _inputs(channels: int, size: int, layout: str, device):
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(BATCH, channels, size, size, device=device, generator=gen) * 0.7 + 0.3
    grad = torch.randn(BATCH, channels, size, size, device=device, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        grad = grad.to(memory_format=torch.channels_last)
    return x.requires_grad_(True), grad


def _step(module, params, x, grad):
    y = module(x)
    return torch.autograd.grad(y, (x, params.weight, params.bias), grad)


def _check_against_eager(name, module, params, channels, size, layout, device):
    """The contender computes what eager BatchNorm2d + LeakyReLU computes (one step from a copy)."""
    eager = _eager_module(channels, device)
    x, grad = _inputs(channels, size, layout, device)
    with torch.no_grad():
        y_ref = eager(x)
    y = module(x)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{name} output differs from eager: {m}")
    x2 = x.detach().clone().requires_grad_(True)
    grads = torch.autograd.grad(y, (x, params.weight, params.bias), grad)
    eager2 = _eager_module(channels, device)
    grads_ref = torch.autograd.grad(eager2(x2), (x2, eager2[0].weight, eager2[0].bias), grad)
    # At the kink (z ~ 0) the two sides may round z to different signs and take different slopes:
    # such elements are left out of dx, and allowed for (|grad| each) in the per-channel sums.
    near_kink = y_ref.abs() < 1e-4
    allowance = near_kink.sum(dim=(0, 2, 3)) * float(grad.abs().max())
    dx, dx_ref = grads[0][~near_kink], grads_ref[0][~near_kink]
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4 * max(1.0, float(dx_ref.abs().max())),
                               msg=lambda m: f"{name} dx differs from eager: {m}")
    for g, r, what in zip(grads[1:], grads_ref[1:], ("dweight", "dbias")):
        tolerance = 1e-4 * max(1.0, float(r.abs().max())) + allowance
        assert bool(((g - r).abs() <= tolerance + 1e-4 * r.abs()).all()), f"{name} {what} differs from eager"
    torch.testing.assert_close(params.running_mean, eager[0].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params.running_var, eager[0].running_var, rtol=1e-5, atol=1e-6)


def _timed_call(contender, channels, size, layout, mode, device):
    """(the timed step, its iterations per round, info): the contender built, compiled and checked
    against eager first."""
    gc.collect()
    module, params, compile_time = _contender(contender, channels, device)
    info = {}
    if compile_time is not None:  # compile (forward + backward graphs) outside the timed region
        x, grad = _inputs(channels, size, layout, device)
        start = time.perf_counter()
        _step(module, params, x, grad)
        info["compile_time_s"] = time.perf_counter() - start
        params.running_mean.zero_()
        params.running_var.fill_(1.0)
        params.num_batches_tracked.zero_()
    _check_against_eager(contender, module, params, channels, size, layout, device)
    x, grad = _inputs(channels, size, layout, device)
    if mode == "graphed":
        run = common.graphed(lambda: _step(module, params, x, grad))
        return run, run.steps, info

    def run():
        out = _step(module, params, x, grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run, 1, info


@pytest.mark.parametrize("mode", common.op_timing_modes(common.select_device()))
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("channels,size,layout", SHAPES)
def bench_batch_norm_lrelu(benchmark, device, contender, channels, size, layout, mode):
    # The first contender of a group builds all and times them interleaved (common.paired_op_group:
    # paired_median_s, which report.py prefers); each is then also timed alone by pytest-benchmark.
    group = _problem(channels, size, layout) + (" (graphed)" if mode == "graphed" else "")
    enabled = not getattr(benchmark, "disabled", False)
    common.paired_op_group(group, CONTENDERS, lambda name: _timed_call(name, channels, size, layout, mode, device),
                           enabled=enabled)
    entry = common.take_paired_op(group, contender)
    benchmark.group = group
    benchmark.extra_info.update(contender=contender, mode=mode, threads=torch.get_num_threads(),
                                **entry.extra_info(contender))
    benchmark.pedantic(entry.calls[contender], rounds=ROUNDS if enabled else 1, iterations=entry.iterations,
                       warmup_rounds=3 if enabled else 0)
