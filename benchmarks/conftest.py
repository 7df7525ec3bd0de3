"""Fixtures shared by the benchmark suites.

The benchmarks do not set TRITON_INTERPRET: on CUDA machines fastgan must run its real Triton kernels,
and on CPU fastgan's ``impl="auto"`` picks the C++ paths, which need no interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

import common
import machine

# FASTGAN_BENCH_THREADS=N pins torch's intra-op threads for the whole run (recorded in machine_info as
# torch_threads). On a CPU shared with other work, N=1 avoids measuring OpenMP threads waiting for
# cores that other processes hold (seen here at load average 10+ on 2 cores: steps 10x slower).
if os.environ.get("FASTGAN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTGAN_BENCH_THREADS"]))

# cuDNN picks its convolution algorithms by timing them (benchmark mode) for every contender, as the
# PyTorch DCGAN example sets it (``cudnn.benchmark = True``) and as any tuned training loop does: its
# heuristic choices for the 3-channel layers of a DCGAN are legacy NCHW kernels plus layout
# conversions (seen in the H100 profiles). FASTGAN_BENCH_CUDNN_BENCHMARK=0 keeps cuDNN's heuristics.
# Recorded in each JSON's machine_info as cudnn_benchmark.
torch.backends.cudnn.benchmark = os.environ.get("FASTGAN_BENCH_CUDNN_BENCHMARK", "1") != "0"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return common.select_device()


@pytest.fixture(scope="session")
def matmul_rates(device) -> dict[str, float]:
    """The device's matmul rates (FLOP/s), measured once in this run: {"fp32": ...} plus {"tf32": ...}
    on CUDA (see common.measure_matmul_rates)."""
    return common.measure_matmul_rates(device)


@pytest.fixture(scope="session")
def matmul_rate(matmul_rates) -> float:
    """The fastest of the measured rates; the step benchmarks divide their matmul + convolution FLOPs
    by it to get a 'limit' time (a contender can't beat it without skipping work or lowering precision)."""
    return max(matmul_rates.values())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Put fastgan's machine description (GPU, driver, torch / triton versions) into the JSON."""
    machine_info["fastgan_machine"] = machine.describe()
    machine_info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
