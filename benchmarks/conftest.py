"""Fixtures shared by the benchmark suites.

The benchmarks do not set TRITON_INTERPRET: on CUDA machines fastgan must run its real Triton kernels,
and on CPU fastgan's ``impl="auto"`` picks the C++ paths, which need no interpreter.
"""
from __future__ import annotations

import pytest
import torch

import common
import machine


@pytest.fixture(scope="session")
def device() -> torch.device:
    return common.select_device()


@pytest.fixture(scope="session")
def matmul_rate(device) -> float:
    """The device's fp32 matmul rate (FLOP/s), measured once in this run (see common.measure_matmul_rate);
    the step benchmarks divide their matmul + convolution FLOPs by it to get a 'limit' time."""
    return common.measure_matmul_rate(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Put fastgan's machine description (GPU, driver, torch / triton versions) into the JSON."""
    machine_info["fastgan_machine"] = machine.describe()
