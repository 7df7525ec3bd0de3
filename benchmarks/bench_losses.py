"""Forward + backward of the discriminator's loss: fastgan.ops.d_loss vs the PyTorch DCGAN example's
two BCEWithLogitsLoss calls (against ones / zeros, each followed by backward) vs torch.compile of that
eager code. All contenders see the same logits (several input sets, rotated) in one run.

On CUDA each size is timed in two modes (``common.op_timing_modes``): as called (groups ending in
``(cuda)``: bound by the host's dispatch and launches at these sizes) and as a CUDA-graph replay of the
same forward + backward on one input set (``(cuda, graphed)``: device time, as inside fastgan.Trainer's
captured steps).

    python -m pytest benchmarks/bench_losses.py --benchmark-enable
"""
import itertools

import pytest
import torch
from torch import nn

import common
from fastgan.ops import d_loss

SIZES = [64, 4096, 262144]
N_INPUT_SETS = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_criterion = nn.BCEWithLogitsLoss()


def eager_step(real, fake):
    """As the DCGAN example: one BCE term per side, each with its own backward."""
    err_real = _criterion(real, torch.full_like(real, 1.0))
    err_real.backward()
    err_fake = _criterion(fake, torch.full_like(fake, 0.0))
    err_fake.backward()
    return err_real.detach() + err_fake.detach()


def _eager_loss(real, fake):
    return _criterion(real, torch.full_like(real, 1.0)) + _criterion(fake, torch.full_like(fake, 0.0))


_compiled_loss = torch.compile(_eager_loss)


def compiled_step(real, fake):
    loss = _compiled_loss(real, fake)
    loss.backward()
    return loss.detach()


def fastgan_step(real, fake):
    out = d_loss(real, fake, "nonsaturating")
    out.loss.backward()
    return out.loss.detach()


CONTENDERS = {"eager": eager_step, "torch_compile": compiled_step, "fastgan": fastgan_step}


def _input_sets(n):
    gen = torch.Generator().manual_seed(n)
    return [tuple((torch.randn(n, generator=gen) * 2).to(DEVICE).requires_grad_() for _ in range(2))
            for _ in range(N_INPUT_SETS)]


def _run(step, real, fake):
    real.grad = None
    fake.grad = None
    return step(real, fake)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n", SIZES)
def bench_contenders_agree(n):
    """Before timing: every contender computes the same loss and the same gradients."""
    real, fake = _input_sets(n)[0]
    results = {}
    for name, step in CONTENDERS.items():
        loss = _run(step, real, fake)
        results[name] = (loss, real.grad.clone(), fake.grad.clone())
    for name, (loss, gr, gf) in results.items():
        torch.testing.assert_close(loss, results["eager"][0], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(gr, results["eager"][1], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(gf, results["eager"][2], rtol=1e-5, atol=1e-8, msg=name)


def _timed_call(name: str, n: int, mode: str):
    """(the timed step, its iterations per round, info) of contender ``name``."""
    step = CONTENDERS[name]
    if mode == "graphed":
        real, fake = _input_sets(n)[0]
        one_step = common.graphed(lambda: _run(step, real, fake))
        return one_step, one_step.steps, {}
    inputs = itertools.cycle(_input_sets(n))
    for _ in range(3):  # warm-up (and compilation) outside the timed rounds
        _run(step, *next(inputs))
    _sync()

    def one_step():
        _run(step, *next(inputs))
        _sync()
    return one_step, 5 if n < 100000 else 1, {}


@pytest.mark.parametrize("mode", common.op_timing_modes(DEVICE))
@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("n", SIZES)
def bench_d_loss_forward_backward(benchmark, contender, n, mode):
    # The first contender of a group builds all and times them interleaved (common.paired_op_group:
    # paired_median_s, which report.py prefers); each is then also timed alone by pytest-benchmark.
    group = f"d_loss fwd+bwd N={n} ({DEVICE.type})"
    if mode == "graphed":
        group = group[:-1] + ", graphed)"  # "... (cuda)" -> "... (cuda, graphed)"
    common.paired_op_group(group, list(CONTENDERS), lambda name: _timed_call(name, n, mode),
                           enabled=not benchmark.disabled)
    entry = common.take_paired_op(group, contender)
    benchmark.group = group
    benchmark.extra_info.update(contender=contender, n=n, device=DEVICE.type, mode=mode, **entry.extra_info(contender))
    benchmark.pedantic(entry.calls[contender], rounds=200 if n < 100000 else 30, iterations=entry.iterations,
                       warmup_rounds=1)
