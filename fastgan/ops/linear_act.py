"""linear_act: ``act(x @ weight.T + bias) * gain`` (a linear layer and its activation, fused).

Implementations: ``ref`` (plain PyTorch below: the specification), ``cpu`` (csrc/cpu/layers.cpp:
ATen's GEMM, then bias, activation and gain in one OpenMP pass) and ``triton``
(fastgan/ops/triton/linear_act.py: a tiled ``tl.dot`` matmul with bias, activation and gain in its
epilogue). Backward: the gradient through the activation, recomputed from the saved output and fused
with the bias gradient's reduction (``fastgan::bias_act_grad``, shared with bias_act, differentiable
again), then the two matmuls with torch's GEMM. So linear_act is twice differentiable.
Under torch.compile the call is the custom op ``fastgan::linear_act``; eager CPU calls use a C++
autograd node around the same kernels, eager Triton calls a ``torch.autograd.Function``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgan._dispatch import (cpu_supports, extension, functorch_active, register_op, resolve_impl, same_device,
                              tensor_arg, triton_module)
from fastgan.ops.activations import apply_unfused, kernel_computes, resolve_act
from fastgan.ops.bias_act import (NO_CLAMP, _check_gain, _like, autocast_cast, autocast_dtype, bias_act_grad_call,
                                   check_bias)

register_op("linear_act", "linear_act_forward")
_EXT = extension() if cpu_supports("linear_act", torch.device("cpu")) else None  # the eager fast path's module


def linear_act_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "linear",
                         alpha: float | None = None, gain: float = 1.0) -> Tensor:
    """``act(x @ weight.T + bias) * gain`` in plain PyTorch."""
    spec, alpha = resolve_act(act, alpha)
    return apply_unfused(F.linear(x, weight, bias), spec, alpha, gain)


def _linear_act_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, alpha: float, gain: float,
                     impl: str) -> Tensor:
    """act(x @ weight.T + bias) * gain for x (M, K): a contiguous (M, N) result."""
    if impl == "cpu":
        return extension().linear_act_forward(x, weight, bias, act, alpha, gain)
    return triton_module("linear_act").linear_act_forward(x, weight, bias, act, alpha, gain)


@torch.library.custom_op("fastgan::linear_act", mutates_args=())
def _linear_act_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, alpha: float, gain: float,
                   impl: str) -> Tensor:
    """act(x @ weight.T + bias) * gain for x (M, K): a contiguous (M, N) result."""
    return _linear_act_impl(x, weight, bias, act, alpha, gain, impl)


@_linear_act_op.register_fake
def _(x, weight, bias, act, alpha, gain, impl):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, act, alpha, gain, impl = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias = bias is not None
    ctx.args = (act, alpha, gain, impl)


def _linear_act_backward(ctx, grad_out, compiling=True):
    x, weight, out = ctx.saved_tensors
    act, alpha, gain, impl = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    # d loss / d (x @ W.T + b) and d loss / d b in one pass over grad_out and the saved output.
    grad_z, grad_bias = bias_act_grad_call(_like(grad_out, out), out, need_b, 1, act, alpha, gain, NO_CLAMP, impl,
                                           compiling)
    grad_x = grad_z @ weight if need_x else None
    grad_w = grad_z.t() @ x if need_w else None
    return grad_x, grad_w, (grad_bias if need_b else None), None, None, None, None


_linear_act_op.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


class _LinearActFunction(torch.autograd.Function):
    """Eager path: the same kernels and backward as the custom op without the torch.library
    dispatch cost (tens of microseconds per call); torch.compile uses the custom op."""

    @staticmethod
    def forward(ctx, x, weight, bias, act, alpha, gain, impl):
        inputs = (x, weight, bias, act, alpha, gain, impl)
        out = _linear_act_impl(*inputs)
        _linear_act_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _linear_act_backward(ctx, grad_out, compiling=False)


def _linear_act_cpu_eager(x, weight, bias, act, alpha, gain, impl):
    return extension().linear_act_autograd(x, weight, bias, act, alpha, gain)


_FAST_DTYPES = (torch.float32, torch.float64)
_ACT_INDEX: dict[tuple[str, float | None], tuple[int, float]] = {}  # (act, alpha) -> (index, alpha), validated


def _cpu_eager_fast(x: Tensor, weight: Tensor, bias: Tensor | None, act, alpha, impl) -> Tensor | None:
    """The C++ autograd call for the common eager case, or None where the general path is needed.

    At GAN layer sizes the general path's Python (validation, autocast, dispatch: ~15 us a call) costs
    as much as the fused element-wise work, so this admits, with a few cheap tests, only calls that
    the general path would send to the same C++ node unchanged: 2-D float32/float64 CPU tensors of
    matching shapes and dtypes, a contiguous bias or none, gain 1, autocast off, not being traced, a
    string act. Anything else (including every invalid call) returns None and takes the general path,
    which validates and raises there.
    """
    if _EXT is None or not (impl == "auto" or impl == "cpu") or type(act) is not str:
        return None
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.is_cpu and weight.is_cpu):
        return None
    dtype = x.dtype
    if (x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or weight.dtype != dtype
            or dtype not in _FAST_DTYPES):
        return None
    if bias is not None and not (isinstance(bias, Tensor) and bias.is_cpu and bias.dtype == dtype and bias.dim() == 1
                                 and bias.shape[0] == weight.shape[0] and bias.is_contiguous()):
        return None
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or functorch_active():
        return None
    key = (act, alpha, type(alpha))  # the type too: True == 1 hashes alike, but resolve_act refuses a bool
    try:
        resolved = _ACT_INDEX.get(key)
    except TypeError:  # an unhashable alpha: let the general path reject it
        return None
    if resolved is None:
        try:
            spec, alpha_value = resolve_act(act, alpha)
        except ValueError:
            return None
        if not kernel_computes("cpu", spec):  # an activation the C++ kernels lack: the general path
            return None
        resolved = _ACT_INDEX[key] = (spec.index, float(alpha_value))
    return _EXT.linear_act_autograd(x, weight, bias, resolved[0], resolved[1], 1.0)


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "linear",
               alpha: float | None = None, gain: float = 1.0, impl: str = "auto") -> Tensor:
    """``act(x @ weight.T + bias) * gain``: a linear layer and its activation in one op.

    ``x``: ``(..., in_features)``; ``weight``: ``(out_features, in_features)`` (``nn.Linear``'s layout);
    ``bias``: None or ``(out_features,)``; all one dtype and device. ``act`` / ``alpha``: see
    ``fastgan.ops.activations`` (lrelu's alpha defaults to 0.2). ``gain``: finite, non-zero.
    ``impl``: ``"auto" | "triton" | "cpu" | "ref"``. Twice differentiable.
    Under ``torch.autocast`` it casts as F.linear does: x, weight and bias (floating, not float64) to
    the autocast dtype of x's device type, so the output has that dtype.
    """
    if gain == 1.0 and type(gain) is not bool:
        out = _cpu_eager_fast(x, weight, bias, act, alpha, impl)
        if out is not None:
            return out
    tensor_arg("x", x)
    tensor_arg("weight", weight)
    spec, alpha = resolve_act(act, alpha)
    low = autocast_dtype(x.device.type)
    if low is not None:  # F.linear is a lower-precision autocast op: x, weight and bias in autocast's dtype
        x, weight, bias = autocast_cast(x, low), autocast_cast(weight, low), autocast_cast(bias, low)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape (..., {weight.shape[1]}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must share a dtype")
    check_bias(bias, x, weight.shape[0], "out_features")
    gain_f = _check_gain(gain)
    device = x.device
    if weight.device != device or (bias is not None and bias.device != device):
        same_device(x=x, weight=weight, bias=bias)  # raises, naming the argument
    impl = resolve_impl("linear_act", impl, device)
    if impl == "ref":
        return linear_act_reference(x, weight, bias, spec.name, alpha, gain_f)
    if bias is not None:
        bias = bias.contiguous()
    if torch.compiler.is_compiling():
        fn = _linear_act_op
    elif impl == "cpu":  # the same kernels and backward with the autograd node in C++ (no Python per-call cost)
        fn = _linear_act_cpu_eager
    else:
        fn = _LinearActFunction.apply
    fused = kernel_computes(impl, spec)
    act_args = (spec.index, alpha, gain_f) if fused else (0, 0.0, 1.0)  # else: linear, then the row
    out = fn(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), weight, bias, *act_args, impl)
    if not fused:
        out = apply_unfused(out, spec, alpha, gain_f)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])
