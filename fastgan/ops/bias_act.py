"""bias_act: ``clamp(act(x + bias) * gain, -clamp, clamp)`` with the bias along one dimension.

The element-wise tail of a convolution (or of any layer whose GEMM is done elsewhere): NCHW and
channels_last maps, any ``dim``. After StyleGAN3's ``bias_act``: one table of activations
(``fastgan.ops.activations``), the reference beside the fast paths, one ``impl`` switch.

Implementations: ``ref`` (plain PyTorch below: the specification), ``cpu`` (csrc/cpu/layers.cpp)
and ``triton`` (fastgan/ops/triton/bias_act.py). The fast paths save only the OUTPUT for backward and
recompute the activation's derivative from it; the backward (d x and the bias gradient's reduction in
one pass) is a second op, ``fastgan::bias_act_grad``, whose own backward is written with
differentiable torch ops, so the op is twice differentiable (R1 / gradient penalties).
``linear_act`` reuses ``bias_act_grad`` for its backward.

Dispatch of a call: under ``torch.compile`` the torch.library custom ops (one opaque node each, no
graph break); eager ``impl="cpu"`` calls the same C++ kernels through autograd nodes written in C++
(csrc/cpu/layers.cpp: same backward structure, no Python per-call cost); eager ``impl="triton"``
through ``torch.autograd.Function``s around the same kernels.
"""
from __future__ import annotations

import math
import struct
from typing import Optional

import torch
from torch import Tensor

from fastgan._dispatch import extension, register_op, resolve_impl, same_device, tensor_arg, triton_module
from fastgan.ops.activations import ACTIVATION_BY_INDEX, apply_unfused, kernel_computes, resolve_act

register_op("bias_act", "bias_act_forward")

NO_CLAMP = -1.0  # the kernels' encoding of clamp=None


# ---------------------------------------------------------------------------------------------
# Reference (the specification): plain PyTorch, autograd by torch.
# ---------------------------------------------------------------------------------------------

def _bias_shape(ndim: int, dim: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = -1
    return shape


def bias_act_reference(x: Tensor, bias: Tensor | None = None, dim: int = 1, act: str = "linear",
                       alpha: float | None = None, gain: float = 1.0, clamp: float | None = None) -> Tensor:
    """``clamp(act(x + bias) * gain)`` in plain PyTorch (bias broadcast along ``dim``)."""
    spec, alpha = resolve_act(act, alpha)
    if bias is not None:
        x = x + bias.reshape(_bias_shape(x.dim(), dim % x.dim()))
    return apply_unfused(x, spec, alpha, gain, clamp)


def bias_act_grad_reference(grad_out: Tensor, out: Tensor, dim: int, act: str, alpha: float | None = None,
                            gain: float = 1.0, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """(d loss / d x, d loss / d bias) of bias_act from the saved output ``out``, in plain PyTorch.

    Saturated outputs (``|out| >= clamp``) pass no gradient.
    """
    spec, alpha = resolve_act(act, alpha)
    dim = dim % out.dim()
    if clamp is not None:  # selects before the activation's backward, as torch's clamp backward
        grad_out = torch.where(out.abs() < clamp, grad_out, 0.0)
    grad_x = spec.backward(grad_out * gain, out / gain, alpha)
    reduce_dims = [d for d in range(out.dim()) if d != dim]
    return grad_x, grad_x.sum(dim=reduce_dims) if reduce_dims else grad_x


# ---------------------------------------------------------------------------------------------
# Layout: every tensor reaches the kernels as a contiguous (outer, C, inner) view.
# ---------------------------------------------------------------------------------------------

def _dense_order(t: Tensor) -> list[int] | None:
    """Dims in decreasing stride, if ``t`` permuted that way is contiguous (NCHW, channels_last,
    any dense layout), else None."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _dense(t: Tensor) -> Tensor:
    """``t`` itself when it is dense in some dim order (keeps channels_last), else a contiguous copy."""
    return t if _dense_order(t) is not None else t.contiguous()


def _view3d(t: Tensor, dim: int) -> Tensor:
    """The (outer, C, inner) contiguous view of a dense ``t`` with C = t.shape[dim]."""
    if t.is_contiguous():  # the common case, without the permutation search
        shape = t.shape
        return t.view(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))
    order = _dense_order(t)
    assert order is not None, "fastgan internal error: _view3d needs a dense tensor"
    tp = t.permute(order)
    d = order.index(dim)
    return tp.view(math.prod(tp.shape[:d]), tp.shape[d], math.prod(tp.shape[d + 1:]))


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with ``ref``'s strides (incoming gradients may be expanded or in another layout)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


# ---------------------------------------------------------------------------------------------
# Fast paths, registered with torch.library (one opaque op each for torch.compile).
# ---------------------------------------------------------------------------------------------

def _bias_act_impl(x: Tensor, bias: Optional[Tensor], dim: int, act: int, alpha: float, gain: float,
                   clamp: float, impl: str) -> Tensor:
    """clamp(act(x + bias) * gain) for a dense x (output in x's layout); clamp < 0: no clamp."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x3, out3 = _view3d(x, dim), _view3d(out, dim)
    if impl == "cpu":
        extension().bias_act_forward(x3, bias, out3, act, alpha, gain, clamp)
    else:
        triton_module("bias_act").bias_act_forward(x3, bias, out3, act, alpha, gain, clamp)
    return out


def _bias_act_grad_impl(grad_out: Tensor, out: Tensor, need_bias_grad: bool, dim: int, act: int, alpha: float,
                        gain: float, clamp: float, impl: str) -> tuple[Tensor, Tensor]:
    """(d loss / d x in out's layout, d loss / d bias or an empty tensor); grad_out has out's strides."""
    if impl == "ref":
        spec = ACTIVATION_BY_INDEX[act]
        grad_x, grad_bias = bias_act_grad_reference(grad_out, out, dim, spec.name, alpha, gain,
                                                    None if clamp < 0 else clamp)
        grad_x = _like(grad_x, out)
        return grad_x, (grad_bias.contiguous() if need_bias_grad else out.new_empty(0))
    grad_x = torch.empty_like(out)
    if out.numel() == 0:
        return grad_x, out.new_zeros(out.shape[dim] if need_bias_grad else 0)
    args = (_view3d(grad_out, dim), _view3d(out, dim), _view3d(grad_x, dim), need_bias_grad, act, alpha, gain, clamp)
    if impl == "cpu":
        grad_bias = extension().bias_act_backward(*args)
    else:
        grad_bias = triton_module("bias_act").bias_act_backward(*args)
    return grad_x, grad_bias


@torch.library.custom_op("fastgan::bias_act", mutates_args=())
def _bias_act_op(x: Tensor, bias: Optional[Tensor], dim: int, act: int, alpha: float, gain: float,
                 clamp: float, impl: str) -> Tensor:
    """clamp(act(x + bias) * gain) for a dense x (output in x's layout); clamp < 0: no clamp."""
    return _bias_act_impl(x, bias, dim, act, alpha, gain, clamp, impl)


@_bias_act_op.register_fake
def _(x, bias, dim, act, alpha, gain, clamp, impl):
    return torch.empty_like(x)


def _bias_act_setup(ctx, inputs, output):
    x, bias, dim, act, alpha, gain, clamp, impl = inputs
    ctx.save_for_backward(output)
    ctx.has_bias = bias is not None
    ctx.args = (dim, act, alpha, gain, clamp, impl)


def _saturation_threshold(clamp: float, dtype: torch.dtype) -> float:
    """The clamp as the output dtype holds it: saturated outputs equal this value exactly (in bf16,
    clamp=0.9 is stored as 0.8984...), so ``|out| >= threshold`` tells them apart from the rest.
    The kernels clamp in float32 (float64 for float64) and round the result once to the output dtype;
    this rounds the same way, in plain Python (no tensor: it runs inside traced backward graphs)."""
    if clamp < 0 or dtype == torch.float64:
        return clamp
    f32 = struct.unpack("<f", struct.pack("<f", clamp))[0]
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", f32))[0]
    if dtype == torch.bfloat16:  # round to nearest even on the upper 16 bits of the float32
        bits = struct.unpack("<I", struct.pack("<f", f32))[0]
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    return f32


def _bias_act_backward(ctx, grad_out, grad_op=None):
    (out,) = ctx.saved_tensors
    need_bias_grad = ctx.has_bias and ctx.needs_input_grad[1]
    dim, act, alpha, gain, clamp, impl = ctx.args
    grad_x, grad_bias = (grad_op or _bias_act_grad_op)(_like(grad_out, out), out, need_bias_grad, dim, act, alpha,
                                                       gain, _saturation_threshold(clamp, out.dtype), impl)
    return grad_x, (grad_bias if need_bias_grad else None), None, None, None, None, None, None


_bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup)


@torch.library.custom_op("fastgan::bias_act_grad", mutates_args=())
def _bias_act_grad_op(grad_out: Tensor, out: Tensor, need_bias_grad: bool, dim: int, act: int, alpha: float,
                      gain: float, clamp: float, impl: str) -> tuple[Tensor, Tensor]:
    """(d loss / d x in out's layout, d loss / d bias or an empty tensor); grad_out has out's strides."""
    return _bias_act_grad_impl(grad_out, out, need_bias_grad, dim, act, alpha, gain, clamp, impl)


@_bias_act_grad_op.register_fake
def _(grad_out, out, need_bias_grad, dim, act, alpha, gain, clamp, impl):
    return torch.empty_like(out), out.new_empty(out.shape[dim] if need_bias_grad else 0)


def _bias_act_grad_setup(ctx, inputs, output):
    grad_out, out, need_bias_grad, dim, act, alpha, gain, clamp, impl = inputs
    ctx.save_for_backward(grad_out, out)
    ctx.args = (dim, act, alpha, gain, clamp)


def _bias_act_grad_backward(ctx, grad_grad_x, grad_grad_bias):
    # grad_x = grad_out * gain * f'(s) * mask with s = out / gain (f'(s): the table's derivative in the
    # output). So d/d grad_out = u * gain * f'(s) * mask and d/d out = u * grad_out * f''(s) * mask,
    # with u the incoming gradient of grad_x plus that of grad_bias broadcast along dim. Plain torch
    # ops: this is differentiable again.
    grad_out, out = ctx.saved_tensors
    dim, act, alpha, gain, clamp = ctx.args
    spec = ACTIVATION_BY_INDEX[act]
    u = grad_grad_x if grad_grad_x is not None else torch.zeros_like(out)
    if grad_grad_bias is not None and grad_grad_bias.numel() > 0:
        u = u + grad_grad_bias.reshape(_bias_shape(out.dim(), dim))
    s = out / gain
    if clamp >= 0:  # selects first, as in the forward rule
        u = torch.where(out.abs() < clamp, u, 0.0)
    d_grad_out = spec.backward(u * gain, s, alpha)
    d_out = spec.backward2(u * grad_out, s, alpha)
    return d_grad_out, d_out, None, None, None, None, None, None, None


_bias_act_grad_op.register_autograd(_bias_act_grad_backward, setup_context=_bias_act_grad_setup)


# Eager calls take plain autograd.Functions around the same kernels and the same backward formulas:
# the torch.library dispatch of a custom op costs tens of microseconds per call, as much as the
# element-wise pass itself at GAN sizes. Under torch.compile the custom ops above are used.

class _BiasActGradFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, out, need_bias_grad, dim, act, alpha, gain, clamp, impl):
        inputs = (grad_out, out, need_bias_grad, dim, act, alpha, gain, clamp, impl)
        result = _bias_act_grad_impl(*inputs)
        _bias_act_grad_setup(ctx, inputs, result)
        return result

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_bias):
        return _bias_act_grad_backward(ctx, grad_grad_x, grad_grad_bias)


class _BiasActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, dim, act, alpha, gain, clamp, impl):
        inputs = (x, bias, dim, act, alpha, gain, clamp, impl)
        out = _bias_act_impl(*inputs)
        _bias_act_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # create_graph (grad mode on): the differentiable grad op; otherwise its kernel directly
        return _bias_act_backward(ctx, grad_out, _BiasActGradFunction.apply if torch.is_grad_enabled()
                                  else _bias_act_grad_impl)


def bias_act_grad_call(grad_out: Tensor, out: Tensor, need_bias_grad: bool, dim: int, act: int, alpha: float,
                       gain: float, clamp: float, impl: str, compiling: bool) -> tuple[Tensor, Tensor]:
    """The bias_act_grad op as a custom op (under torch.compile) or an autograd.Function (eager)."""
    if compiling:
        fn = _bias_act_grad_op
    else:  # create_graph (grad mode on): the differentiable Function; otherwise the kernel directly
        fn = _BiasActGradFunction.apply if torch.is_grad_enabled() else _bias_act_grad_impl
    return fn(grad_out, out, need_bias_grad, dim, act, alpha, gain, clamp, impl)


# ---------------------------------------------------------------------------------------------
# Public API: validation and dispatch.
# ---------------------------------------------------------------------------------------------

_FLOAT32 = torch.finfo(torch.float32)


def _check_gain(gain) -> float:
    # The kernels divide by gain in float32 (the saved output back to f(x)): 1 / gain must be finite there.
    if (isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain)
            or not _FLOAT32.smallest_normal <= abs(gain) <= _FLOAT32.max):
        raise ValueError(f"gain must be a finite non-zero number of float32's normal range "
                         f"(|gain| in [{_FLOAT32.smallest_normal:.3g}, {_FLOAT32.max:.3g}]), got {gain!r}")
    return float(gain)


def _check_clamp(clamp) -> float:
    if clamp is None:
        return NO_CLAMP
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not math.isfinite(clamp) or clamp < 0:
        raise ValueError(f"clamp must be None or a finite number >= 0, got {clamp!r}")
    return float(clamp)


# Device types with an autocast, read once at import: torch.compile (torch 2.11) cannot trace
# torch.amp.is_autocast_available inside a fullgraph region, but a set lookup it can.
_AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "privateuseone")
                                   if torch.amp.is_autocast_available(t))


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs lower-precision ops in on ``device_type``, or None when
    autocast is off there (or the device type has no autocast, e.g. meta)."""
    if device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(t, dtype: torch.dtype | None):
    """``t`` as torch.autocast casts an input of a lower-precision op (F.linear, convolutions):
    a floating-point tensor other than float64 becomes ``dtype``; anything else (None, non-tensors,
    float64, ``dtype=None``: autocast off) is returned as it is. The cast is differentiable, so
    gradients reach float32 parameters in float32, as through torch's own autocast casts."""
    if dtype is None or not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def check_bias(bias, x: Tensor, features: int, what: str) -> None:
    """Validate ``bias``: None, or a 1-D tensor of ``features`` elements in x's dtype."""
    if bias is None:
        return
    tensor_arg("bias", bias)
    if bias.dim() != 1 or bias.shape[0] != features:
        raise ValueError(f"bias must have shape ({features},) ({what}), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise ValueError(f"bias has dtype {bias.dtype} but x has {x.dtype}; they must share a dtype")


def bias_act(x: Tensor, bias: Tensor | None = None, dim: int = 1, act: str = "linear", alpha: float | None = None,
             gain: float = 1.0, clamp: float | None = None, impl: str = "auto") -> Tensor:
    """``clamp(act(x + bias) * gain, -clamp, clamp)``, bias broadcast along ``dim``, in one pass.

    ``x``: any shape and layout (NCHW and channels_last keep their layout; other non-dense inputs are
    copied once). ``bias``: None or shape ``(x.shape[dim],)``, x's dtype. ``act``: a name from
    ``fastgan.ops.activations.ACTIVATIONS``; ``alpha``: lrelu's negative slope (default 0.2).
    ``gain``: finite, non-zero. ``clamp``: None or >= 0. ``impl``: ``"auto" | "triton" | "cpu" | "ref"``.
    Twice differentiable; the fast paths save only the output for backward.
    Under ``torch.autocast`` a bias of another dtype than x is type-promoted with x, as in
    ``x + bias.view(...)`` (a bf16 x with a float32 bias gives a float32 result).
    """
    tensor_arg("x", x)
    spec, alpha = resolve_act(act, alpha)
    if isinstance(dim, bool) or not isinstance(dim, int) or x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim!r}")
    dim = dim % x.dim()
    if (isinstance(bias, Tensor) and bias.dtype != x.dtype and x.is_floating_point() and bias.is_floating_point()
            and autocast_dtype(x.device.type) is not None):
        # Under autocast, as ``x + bias`` (not an autocast op): type promotion, e.g. a bf16 map and a
        # float32 bias give float32. Outside autocast mixed dtypes stay an error (check_bias).
        common = torch.promote_types(x.dtype, bias.dtype)
        x, bias = x.to(common), bias.to(common)
    check_bias(bias, x, x.shape[dim], f"x.shape[{dim}]")
    gain_f, clamp_f = _check_gain(gain), _check_clamp(clamp)
    if clamp is not None and x.is_floating_point() and clamp_f > torch.finfo(x.dtype).max:
        raise ValueError(f"clamp={clamp!r} is beyond the largest finite {x.dtype} value "
                         f"({torch.finfo(x.dtype).max}): give a smaller clamp, or None")
    device = same_device(x=x, bias=bias)
    impl = resolve_impl("bias_act", impl, device)
    if impl == "ref":
        return bias_act_reference(x, bias, dim, spec.name, alpha, gain_f, clamp)
    if bias is not None:
        bias = bias.contiguous()
    x = _dense(x)
    if not kernel_computes(impl, spec):  # an activation these kernels lack: the bias in the kernel, then the row
        y = x if bias is None else _bias_act_call(x, bias, dim, 0, 0.0, 1.0, NO_CLAMP, impl)
        return apply_unfused(y, spec, alpha, gain_f, clamp)
    return _bias_act_call(x, bias, dim, spec.index, alpha, gain_f, clamp_f, impl)


def _bias_act_call(x: Tensor, bias: Tensor | None, dim: int, act: int, alpha: float, gain: float, clamp: float,
                   impl: str) -> Tensor:
    # A validated call (dense x, contiguous bias, clamp encoded) to the kernels of impl with autograd.
    if torch.compiler.is_compiling():
        return _bias_act_op(x, bias, dim, act, alpha, gain, clamp, impl)
    if impl == "cpu" and x.numel() > 0:
        return _bias_act_cpu_eager(x, bias, dim, act, alpha, gain, clamp)
    return _BiasActFunction.apply(x, bias, dim, act, alpha, gain, clamp, impl)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def bias_act_fresh_(y: Tensor, bias: Tensor | None, act: str, alpha: float | None = None,
                    impl: str = "auto") -> Tensor:
    """``bias_act(y, bias, 1, act, alpha)`` for a map ``y`` that nothing else refers to -- the output a
    fused convolution module has just computed. On the CPU path it runs in place on ``y`` (as eager's
    ``LeakyReLU(inplace=True)``): no second map is allocated and first-touched, and the convolution's
    backward, which needs its input and weight but not its output, is unaffected. Anywhere else (other
    devices or layouts, autocast dtype promotion, torch.compile, an activation the C++ kernels lack) it
    is ``bias_act``, out of place."""
    spec, alpha = resolve_act(act, alpha)
    if (y.device.type == "cpu" and 3 <= y.dim() <= 5 and y.numel() > 0 and not torch.compiler.is_compiling()
            and (bias is None or bias.dtype == y.dtype)
            and (y.is_contiguous() or (y.dim() in _CHANNELS_LAST and y.is_contiguous(memory_format=_CHANNELS_LAST[y.dim()])))
            and resolve_impl("bias_act", impl, y.device) == "cpu" and kernel_computes("cpu", spec)):
        check_bias(bias, y, y.shape[1], "the convolution's out_channels")
        return extension().bias_act_inplace_autograd(y, None if bias is None else bias.contiguous(), spec.index, alpha,
                                                     1.0, NO_CLAMP, NO_CLAMP)
    return bias_act(y, bias, 1, spec.name, alpha, impl=impl)


def _bias_act_cpu_eager(x: Tensor, bias: Tensor | None, dim: int, act: int, alpha: float, gain: float,
                        clamp: float) -> Tensor:
    """The C++ kernels with the autograd node in C++ (same backward as the custom op: the fused
    gradient kernel, whose own backward is differentiable); x is dense. Output in x's layout."""
    order = None if x.is_contiguous() else _dense_order(x)
    xp = x if order is None else x.permute(order)
    d = dim if order is None else order.index(dim)
    shape = xp.shape
    x3 = xp.view(math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:]))
    y3 = extension().bias_act_autograd(x3, bias, act, alpha, gain, clamp, _saturation_threshold(clamp, x.dtype))
    y = y3.view(shape)
    if order is not None:
        inverse = [0] * len(order)
        for i, o in enumerate(order):
            inverse[o] = i
        y = y.permute(inverse)
    return y
