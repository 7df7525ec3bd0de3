"""The compiled Triton kernels' non-finite values and kinks on CUDA, against the reference (impl="ref",
torch autograd on the same device), element for element: tests/test_kernel_edges.py's cases, which
the CPU suite runs through the interpreter (its ``run_*`` helpers, here with a CUDA device). relu's
backward selects (0 at inactive units even for an inf / NaN incoming gradient), the clamp's mask
applies before the activation's backward, BatchNorm's eval backward does not pass a NaN input
through x * 0."""
from __future__ import annotations

import pytest

# tests/ is on sys.path (its conftest.py's folder, pytest's default import mode), as for test_properties_layers
from test_kernel_edges import (run_batch_norm_relu_inactive, run_bias_act_relu_inactive, run_bias_act_special_values,
                               run_linear_act_relu_inactive, run_relu_double_backward_infinite_grad_out)

LAYOUTS = ["nchw", "channels_last", "rows"]


@pytest.mark.parametrize("act", ["linear", "relu", "lrelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("gain", [1.0, -2.0])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_bias_act_special_values(cuda_device, act, gain, clamp):
    run_bias_act_special_values("triton", act, gain, clamp, cuda_device, subnormals=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bias_act_relu_blocks_non_finite_grad_where_inactive(cuda_device, layout):
    run_bias_act_relu_inactive("triton", layout, cuda_device)


def test_linear_act_relu_blocks_non_finite_grad_where_inactive(cuda_device):
    run_linear_act_relu_inactive("triton", cuda_device)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_relu_blocks_non_finite_grad_where_inactive(cuda_device, training, layout):
    run_batch_norm_relu_inactive("triton", training, layout, cuda_device)


@pytest.mark.parametrize("clamp", [None, 3.0])
def test_relu_double_backward_with_infinite_grad_out(cuda_device, clamp):
    run_relu_double_backward_infinite_grad_out("triton", clamp, cuda_device)
