"""Forward + backward of one G/D layer: fastgan's fused layers vs eager PyTorch vs torch.compile of the
eager module, in one run, on the same weights and inputs.

Problems (``benchmark.group``):

* ``linear+lrelu B=.. F=..``: ``nn.Linear(F, F)`` + ``nn.LeakyReLU(0.2)`` (eager) / ``torch.compile`` of
  that module / ``fastgan.fuse`` of it (``FusedLinear``: ``linear_act``), batch 64-512, 256-1024 features;
  plus ``bare_matmul``, the same weight with neither bias nor activation (``nn.Linear(F, F, bias=False)``:
  the vendor GEMMs alone, forward and backward), the floor the fused layer should come within 10% of.
* ``conv+lrelu`` / ``convT+tanh``: DCGAN discriminator and generator layers (``Conv2d(64, 128, 4, 2, 1)``
  on 32x32 maps + LeakyReLU(0.2); ``ConvTranspose2d(64, 3, 4, 2, 1)`` to 64x64 + Tanh), batch 32,
  with a bias: fastgan runs the convolution without it, then ``bias_act`` in one pass.
* ``bias+lrelu``: the element-wise tail alone on a DCGAN map (32, 128, 16, 16), NCHW and channels_last:
  ``F.leaky_relu(x + b)`` vs ``bias_act``.

Every timed call is a full step: input and parameter gradients set to None, forward, backward with a
fixed upstream gradient. Contenders are checked to agree (outputs and all gradients) before timing.
Each group's contenders are also timed in interleaved rounds (``common.paired_op_group``), whose
medians ``report.py`` prefers: load drift on a shared machine then hits all of them alike.
On CUDA every problem is timed in two modes (``common.op_timing_modes``): as called (groups ending in
``(cuda)``: host-bound at these sizes, Python and launches included) and as a CUDA graph replay of the
same step (groups ending in ``(cuda, graphed)``: device time only, as inside a captured training step).

    python -m pytest benchmarks/bench_layers.py --benchmark-enable
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import common
import fastgan
from fastgan.ops import bias_act

# Every torch.compile contender goes through the same wrapper code object, so each new problem is a
# recompile of it: past torch's default limit (8) dynamo would silently run the later problems eagerly
# under the "torch_compile" name.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONTENDERS = ("eager", "torch_compile", "fastgan")

# Timed only: bare_matmul computes a different function, so the agreement check leaves it out.
LINEAR_CONTENDERS = CONTENDERS + ("bare_matmul",)

LINEAR_PROBLEMS = [(b, f) for b in (64, 256, 512) for f in (256, 1024)]
MODES = common.op_timing_modes(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _linear_eager(features: int) -> nn.Module:
    torch.manual_seed(features)
    return nn.Sequential(nn.Linear(features, features), nn.LeakyReLU(0.2)).to(DEVICE)


def _conv_eager(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv+lrelu":
        return nn.Sequential(nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)).to(DEVICE)
    return nn.Sequential(nn.ConvTranspose2d(64, 3, 4, 2, 1), nn.Tanh()).to(DEVICE)


CONV_INPUT = {"conv+lrelu": (32, 64, 32, 32), "convT+tanh": (32, 64, 32, 32)}


def _contender(name: str, eager: nn.Module) -> nn.Module:
    model = copy.deepcopy(eager)
    if name == "bare_matmul":
        linear = model[0]
        bare = nn.Linear(linear.in_features, linear.out_features, bias=False).to(DEVICE)
        with torch.no_grad():
            bare.weight.copy_(linear.weight)
        return bare
    if name == "torch_compile":
        return torch.compile(model)
    if name == "fastgan":
        fused = fastgan.fuse(model, inplace=True)
        assert not any(isinstance(m, (nn.LeakyReLU, nn.Tanh)) for m in fused.modules()), "nothing was fused"
        return fused
    return model


def _step(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    x.grad = None
    for p in params:
        p.grad = None
    y = model(x)
    y.backward(grad)
    return y


def _check_agree(models: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, rtol: float, atol: float):
    results = {}
    for name, model in models.items():
        params = list(model.parameters())
        y = _step(model, params, x, grad)
        results[name] = [y.detach().clone(), x.grad.clone(), *[p.grad.clone() for p in params]]
    for name, tensors in results.items():
        for got, want in zip(tensors, results["eager"]):
            # atol relative to the tensor's scale: sums of ~1000 products agree to rtol of their size
            scale = max(1.0, float(want.abs().max()))
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}")


def _timed_call(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str):
    """(the timed step, its iterations per round): synchronised, or a CUDA graph replay."""
    params = list(model.parameters())
    if mode == "graphed":
        one_step = common.graphed(lambda: _step(model, params, x, grad))
        return one_step, one_step.steps
    for _ in range(3):  # warm-up (and compilation) outside the timed rounds
        _step(model, params, x, grad)
    _sync()

    def one_step():
        _step(model, params, x, grad)
        _sync()
    return one_step, 1


def _time(benchmark, make, contenders, group: str, contender: str, rounds: int, mode: str = "call", **info):
    """Time ``contender`` of the group. ``make(name) -> (model, x, grad)`` builds any contender: the
    first benchmark of a group builds them all and times them interleaved (common.paired_op_group:
    ``paired_median_s``, which report.py prefers), then each is also timed alone by pytest-benchmark."""
    if mode == "graphed":
        group = group[:-1] + ", graphed)"  # "... (cuda)" -> "... (cuda, graphed)"
    common.paired_op_group(group, contenders, lambda name: (*_timed_call(*make(name), mode), {}),
                           enabled=not benchmark.disabled)
    entry = common.take_paired_op(group, contender)
    benchmark.group = group
    benchmark.extra_info.update(contender=contender, device=DEVICE.type, mode=mode, **info,
                                **entry.extra_info(contender))
    benchmark.pedantic(entry.calls[contender], rounds=rounds, iterations=entry.iterations, warmup_rounds=1)


# --- linear + LeakyReLU ------------------------------------------------------------------------

@pytest.mark.parametrize("batch,features", LINEAR_PROBLEMS)
def bench_linear_contenders_agree(batch, features):
    eager = _linear_eager(features)
    models = {name: _contender(name, eager) for name in CONTENDERS}
    x = torch.randn(batch, features, device=DEVICE, requires_grad=True)
    # on a GPU, cuDNN / cuBLAS and Triton may still round differently (and use TF32 where torch allows it)
    tol = 3e-4 if DEVICE.type == "cuda" else 1e-5
    _check_agree(models, x, torch.randn(batch, features, device=DEVICE), tol, tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", LINEAR_CONTENDERS)
@pytest.mark.parametrize("batch,features", LINEAR_PROBLEMS)
def bench_linear_lrelu_forward_backward(benchmark, contender, batch, features, mode):
    def make(name):
        return (_contender(name, _linear_eager(features)),
                torch.randn(batch, features, device=DEVICE, requires_grad=True),
                torch.randn(batch, features, device=DEVICE))

    rounds = 200 if batch * features <= 64 * 1024 else 40
    _time(benchmark, make, LINEAR_CONTENDERS, f"linear+lrelu B={batch} F={features} ({DEVICE.type})", contender,
          rounds, mode, batch=batch, features=features)


# --- convolution + bias + activation (DCGAN layers) ---------------------------------------------

@pytest.mark.parametrize("kind", list(CONV_INPUT))
def bench_conv_contenders_agree(kind):
    eager = _conv_eager(kind)
    models = {name: _contender(name, eager) for name in CONTENDERS}
    x = torch.randn(CONV_INPUT[kind], device=DEVICE, requires_grad=True)
    grad = torch.randn_like(eager(x))
    tol = 3e-4 if DEVICE.type == "cuda" else 1e-4  # convolution algorithms may differ in summation order
    _check_agree(models, x, grad, tol, tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("kind", list(CONV_INPUT))
def bench_conv_act_forward_backward(benchmark, contender, kind, mode):
    def make(name):
        eager = _conv_eager(kind)
        x = torch.randn(CONV_INPUT[kind], device=DEVICE, requires_grad=True)
        return _contender(name, eager), x, torch.randn_like(eager(x))

    _time(benchmark, make, CONTENDERS, f"{kind} {CONV_INPUT[kind]} ({DEVICE.type})", contender, 20, mode, kind=kind)


# --- the element-wise tail alone ---------------------------------------------------------------

class _EagerBiasLrelu(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2)


class _FastganBiasLrelu(_EagerBiasLrelu):
    def forward(self, x):
        return bias_act(x, self.bias, 1, "lrelu", 0.2)


def _bias_models():
    torch.manual_seed(0)
    eager = _EagerBiasLrelu(128).to(DEVICE)
    fused = _FastganBiasLrelu(128).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return {"eager": eager, "torch_compile": torch.compile(copy.deepcopy(eager)), "fastgan": fused}


def _bias_input(layout: str):
    x = torch.randn(32, 128, 16, 16, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def bench_bias_act_contenders_agree(layout):
    x = _bias_input(layout)
    _check_agree(_bias_models(), x, torch.randn_like(x), 1e-5, 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def bench_bias_lrelu_forward_backward(benchmark, contender, layout, mode):
    def make(name):
        x = _bias_input(layout)
        return _bias_models()[name], x, torch.randn_like(x)

    _time(benchmark, make, CONTENDERS, f"bias+lrelu (32, 128, 16, 16) {layout} ({DEVICE.type})", contender, 100,
          mode, layout=layout)
