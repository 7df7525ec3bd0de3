"""BatchNorm followed by an activation, forward and backward fused, twice differentiable.

``batch_norm_act(x, ...)`` = act(BatchNorm(x)) for x of shape (N, C), (N, C, L) or (N, C, H, W)
(contiguous or channels_last). With n = N*L or N*H*W values per channel:

* training: mean and biased variance of the batch per channel (statistics in float32, float64 for
  float64 input), x_hat = (x - mean) / sqrt(var + eps), z = x_hat * weight + bias, y = act(z); the
  running statistics are updated as ``nn.BatchNorm`` updates them: with the unbiased variance
  var * n / (n - 1) and factor ``momentum`` (or 1 / num_batches_tracked when ``momentum`` is None,
  the cumulative average).
* eval: the same with the running statistics, one pass.

Backward (dz = dy * act'(z), z recomputed in float32 from the saved input: x and the per-channel
scale and shift; so y is not saved, and a bfloat16 output's rounding does not enter act'): db = sum dz, dw = sum dz x_hat,
and in training dx = w/sigma (dz - mean(dz) - x_hat mean(dz x_hat)); in eval dx = w/sigma dz. Two
per-channel reductions then one elementwise pass, as the forward.

Implementations: ``ref`` below (the specification), ``cpu`` (csrc/cpu/batch_norm_act.cpp) and
``triton`` (fastgan/ops/triton/batch_norm_act.py). The fast paths are three torch.library ops:
``fastgan::batch_norm_act_forward`` (functional: returns y and the statistics it normalised with),
``fastgan::batch_norm_act_backward`` (its gradient, whose own gradient re-derives through the
reference formulas, so R1 / gradient penalties work) and ``fastgan::batch_norm_update_running_stats``
(mutates the running statistics in place; ``mutates_args`` says so, which is why the update is not
part of the differentiable forward op: torch.library only attaches autograd to functional ops).
"""
from __future__ import annotations

import math

from typing import Optional

import torch

from fastgan._dispatch import extension, register_op, resolve_impl, same_device, tensor_arg, triton_module
from fastgan.ops._autograd import partial_variable
from fastgan.ops.activations import ACTIVATION_BY_INDEX, Activation, apply_unfused, kernel_computes, resolve_act

register_op("batch_norm_act", "batch_norm_act_forward")

_X_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Reference (the specification): plain PyTorch, autograd by torch.
# ---------------------------------------------------------------------------------------------

def _reference_core(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: Optional[torch.Tensor], var: Optional[torch.Tensor], training: bool, eps: float,
                    spec: Activation, alpha: float):
    """y, and the (mean, biased var) it normalised with, in the accumulation dtype. Differentiable
    (twice and more) in x, weight and bias; in training the statistics are those of the batch."""
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean = xf.mean(dims)
        # (no channels: torch's var warns of zero degrees of freedom for the empty result)
        var = xf.var(dims, unbiased=False) if x.shape[1] else mean.clone()
    else:
        mean, var = mean.to(acc), var.to(acc)
    z = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        z = z * weight.to(acc).view(shape)
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    return spec.ref(z, alpha).to(x.dtype), mean, var


def _update_running_stats_reference(running_mean, running_var, batch_mean, batch_var, count: int,
                                    momentum, num_batches_tracked) -> None:
    """nn.BatchNorm's update: r = (1 - f) r + f s, with the unbiased batch variance."""
    with torch.no_grad():
        if momentum is None:
            factor = 1.0 / num_batches_tracked.to(torch.float64)
        else:
            factor = momentum
        unbiased = batch_var * (count / (count - 1))
        running_mean.copy_(running_mean * (1 - factor) + batch_mean.to(running_mean.dtype) * factor)
        running_var.copy_(running_var * (1 - factor) + unbiased.to(running_var.dtype) * factor)


def batch_norm_act_reference(x, weight, bias, running_mean, running_var, training: bool, momentum=0.1,
                             eps: float = 1e-5, act: str = "linear", alpha=None, *, num_batches_tracked=None):
    """Plain-PyTorch ``batch_norm_act`` (same arguments, no validation beyond the activation)."""
    spec, alpha = resolve_act(act, alpha)
    use_batch_stats = training or running_mean is None
    y, mean, var = _reference_core(x, weight, bias, running_mean, running_var, use_batch_stats, eps, spec, alpha)
    if use_batch_stats and running_mean is not None and training:
        count = math.prod(x.shape[:1] + x.shape[2:])  # values per channel
        _update_running_stats_reference(running_mean, running_var, mean.detach(), var.detach(), count,
                                        momentum, num_batches_tracked)
    return y


def _reference_input_grads(grad_out, x, weight, bias, mean, var, training, eps, spec, alpha, create_graph):
    """(dx, dweight, dbias) of the reference through torch autograd; differentiable again when
    create_graph. dweight / dbias are computed (as d/d of a weight of ones / bias of zeros) even when
    weight / bias are None, as the fast paths do."""
    c = x.shape[1]
    acc = _acc_dtype(x.dtype)
    with torch.enable_grad():
        x_l = partial_variable(x)
        w_l = partial_variable(weight) if weight is not None else torch.ones(c, dtype=acc, device=x.device, requires_grad=True)
        b_l = partial_variable(bias) if bias is not None else torch.zeros(c, dtype=acc, device=x.device, requires_grad=True)
        y, _, _ = _reference_core(x_l, w_l, b_l, mean, var, training, eps, spec, alpha)
        dx, dw, db = torch.autograd.grad(y, (x_l, w_l, b_l), grad_out, create_graph=create_graph)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Fast paths, registered with torch.library so torch.compile sees opaque ops (no graph break).
# ---------------------------------------------------------------------------------------------

# Each op is a plain function (``_forward_impl``, ``_backward_impl``) exposed twice: as a
# torch.library custom op (what torch.compile traces: fake implementation + registered autograd) and,
# for eager calls, as a torch.autograd.Function with the same backward logic (eager CPU calls use the
# C++ twins BatchNormActFn / BatchNormActBackwardFn in csrc/cpu/batch_norm_act.cpp instead: the
# Python Functions cost ~60 us a training step). The custom-op dispatcher costs some 0.1-0.3 ms a
# call in eager mode, as much as the whole kernel at small sizes.

def _forward_impl(x, weight, bias, mean, var, training: bool, eps: float, act: int, alpha: float, impl: str,
                  running=None):
    """(y, mean, biased var): batch statistics in training (mean/var inputs unused), else copies of
    the given (running) statistics, in the accumulation dtype. ``running`` (eager Triton calls only):
    (running_mean, running_var, factor, count), updated in place by the statistics kernel."""
    if impl == "cpu":
        y, m, v = extension().batch_norm_act_forward(x, weight, bias, mean, var, training, eps, act, alpha)
        return y, m, v
    if impl == "triton":
        return triton_module("batch_norm_act").batch_norm_act_forward(x, weight, bias, mean, var, training,
                                                                       eps, act, alpha, running)
    raise ValueError(f"batch_norm_act_forward: unknown impl {impl!r}")


@torch.library.custom_op("fastgan::batch_norm_act_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                mean: Optional[torch.Tensor], var: Optional[torch.Tensor], training: bool, eps: float,
                act: int, alpha: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See _forward_impl."""
    return _forward_impl(x, weight, bias, mean, var, training, eps, act, alpha, impl)


@_forward_op.register_fake
def _(x, weight, bias, mean, var, training, eps, act, alpha, impl):
    acc = _acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _backward_impl(grad_out, x, weight, bias, mean, var, training: bool, eps: float, act: int, alpha: float,
                   impl: str):
    """(dx, dweight, dbias) from the saved input x and statistics (grad_out in x's layout)."""
    if impl == "cpu":
        dx, dw, db = extension().batch_norm_act_backward(grad_out, x, weight, bias, mean, var, training, eps, act,
                                                         alpha)
    elif impl == "triton":
        dx, dw, db = triton_module("batch_norm_act").batch_norm_act_backward(grad_out, x, weight, bias, mean, var,
                                                                             training, eps, act, alpha)
    elif impl == "ref":
        spec = _activation_by_index(act)
        dx, dw, db = _reference_input_grads(grad_out, x, weight, bias, mean, var, training, eps, spec, alpha,
                                            create_graph=False)
    else:
        raise ValueError(f"batch_norm_act_backward: unknown impl {impl!r}")
    return dx, _param_grad_dtype(dw, weight), _param_grad_dtype(db, bias)


@torch.library.custom_op("fastgan::batch_norm_act_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float,
                 act: int, alpha: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See _backward_impl."""
    return _backward_impl(grad_out, x, weight, bias, mean, var, training, eps, act, alpha, impl)


def _param_grad_dtype(grad: torch.Tensor, param: Optional[torch.Tensor]) -> torch.Tensor:
    return grad.to(param.dtype) if param is not None and grad.dtype != param.dtype else grad


@_backward_op.register_fake
def _(grad_out, x, weight, bias, mean, var, training, eps, act, alpha, impl):
    acc = _acc_dtype(x.dtype)
    c = x.shape[1]
    dw = x.new_empty(c, dtype=weight.dtype if weight is not None else acc)
    db = x.new_empty(c, dtype=bias.dtype if bias is not None else acc)
    return torch.empty_like(x), dw, db


def _activation_by_index(index: int) -> Activation:
    if index not in ACTIVATION_BY_INDEX:
        raise ValueError(f"unknown activation index {index}")
    return ACTIVATION_BY_INDEX[index]


def _forward_setup(ctx, inputs, output):
    x, weight, bias, _mean, _var, training, eps, act, alpha, impl = inputs
    _y, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.args = (training, eps, act, alpha, impl)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, var)


def _forward_backward(ctx, grad_y, _grad_mean, _grad_var, backward=None):
    x, weight, bias, mean, var = ctx.saved_tensors
    training, eps, act, alpha, impl = ctx.args
    if grad_y.stride() != x.stride():
        # The kernels walk grad_y with x's strides. (contiguous(memory_format=...) is not enough: for
        # a channels_last (N, C, 1, 1) x, or C == 1, it keeps different but equally "contiguous" strides.)
        grad_y = torch.empty_like(x).copy_(grad_y)
    backward = _backward_op if backward is None else backward
    dx, dw, db = backward(grad_y, x, weight, bias, mean, var, training, eps, act, alpha, impl)
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, None, None, None, None, None, None,
            None)


_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output):
    grad_out, x, weight, bias, mean, var, training, eps, act, alpha, _impl = inputs
    ctx.save_for_backward(grad_out, x, weight, bias, mean, var)
    ctx.args = (training, eps, act, alpha)


def _backward_backward(ctx, gg_x, gg_w, gg_b):
    """Second order: re-derive (dx, dw, db) with the reference formulas (differentiable ops) and take
    their gradient. The result is the total derivative in grad_out, x, weight and bias (the batch
    statistics are recomputed from x), so the inputs mean and var get none: they are functions of x
    already accounted for (or, in eval mode, running statistics: buffers without gradient)."""
    grad_out, x, weight, bias, mean, var = ctx.saved_tensors
    training, eps, act, alpha = ctx.args
    spec = _activation_by_index(act)
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        # partial derivatives: see fastgan.ops._autograd.partial_variable
        go_l, x_l, w_l, b_l = (partial_variable(t) for t in (grad_out, x, weight, bias))
        dx, dw, db = _reference_input_grads(go_l, x_l, w_l, b_l, mean, var, training, eps, spec, alpha,
                                            create_graph=True)
        outs, grads = [], []
        for out, gg in ((dx, gg_x), (dw, gg_w), (db, gg_b)):
            if gg is not None:
                outs.append(out)
                grads.append(gg.to(out.dtype))
        wrt = [t for t in (go_l, x_l, w_l, b_l) if t is not None]
        res = list(torch.autograd.grad(outs, wrt, grads, create_graph=create, allow_unused=True)) if outs else \
            [None] * len(wrt)
    it = iter(res)
    g_go, g_x = next(it), next(it)
    g_w = next(it) if weight is not None else None
    g_b = next(it) if bias is not None else None
    return g_go, g_x, g_w, g_b, None, None, None, None, None, None, None


_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup)


class _BackwardFunction(torch.autograd.Function):
    """Eager twin of fastgan::batch_norm_act_backward (same implementation and double backward).
    forward takes ctx (no setup_context): Function.apply then skips an inspect.signature bind."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, bias, mean, var, training, eps, act, alpha, impl):
        output = _backward_impl(grad_out, x, weight, bias, mean, var, training, eps, act, alpha, impl)
        _backward_setup(ctx, (grad_out, x, weight, bias, mean, var, training, eps, act, alpha, impl), output)
        return output

    @staticmethod
    def backward(ctx, gg_x, gg_w, gg_b):
        return _backward_backward(ctx, gg_x, gg_w, gg_b)


class _ForwardFunction(torch.autograd.Function):
    """Eager twin of fastgan::batch_norm_act_forward (same implementation; its backward is
    _BackwardFunction, itself differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, training, eps, act, alpha, impl, running=None):
        output = _forward_impl(x, weight, bias, mean, var, training, eps, act, alpha, impl, running)
        _forward_setup(ctx, (x, weight, bias, mean, var, training, eps, act, alpha, impl), output)
        # The statistics outputs are non-differentiable: without this autograd would fill two zero
        # gradients for them on every backward (two more launches on a GPU).
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        if grad_y is None:  # no gradient reached y (gradgradcheck's backward of the backward gets here)
            return (None,) * 11
        # Without create_graph (grad mode off here) nothing will differentiate the backward again: call
        # the kernels directly instead of recording a _BackwardFunction (tens of microseconds of host time).
        backward = _BackwardFunction.apply if torch.is_grad_enabled() else _backward_impl
        return _forward_backward(ctx, grad_y, grad_mean, grad_var, backward=backward) + (None,)


def _cpu_autograd_forward(x, weight, bias, mean, var, training: bool, eps: float, act: int, alpha: float, impl: str):
    """(y, mean, biased var) through the C++ autograd nodes (impl "cpu", eager)."""
    return extension().batch_norm_act_autograd(x, weight, bias, mean, var, training, eps, act, alpha)


def _update_running_stats(running_mean, running_var, batch_mean, batch_var, count: int, momentum: float,
                          num_batches_tracked: Optional[torch.Tensor]) -> None:
    """In place, as nn.BatchNorm: factor = momentum, or 1 / num_batches_tracked when that is given
    (momentum=None, the cumulative average). O(C) work: one C++ call on CPU, torch ops elsewhere."""
    ext = extension()
    if (running_mean.device.type == "cpu" and ext is not None and hasattr(ext, "batch_norm_update_running_stats")
            and running_mean.is_contiguous() and running_var.is_contiguous()
            and running_mean.dtype == running_var.dtype):
        ext.batch_norm_update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum,
                                            num_batches_tracked)
        return
    _update_running_stats_reference(running_mean, running_var, batch_mean, batch_var, count,
                                    None if num_batches_tracked is not None else momentum, num_batches_tracked)


@torch.library.custom_op("fastgan::batch_norm_update_running_stats", mutates_args=("running_mean", "running_var"))
def _update_running_stats_op(running_mean: torch.Tensor, running_var: torch.Tensor, batch_mean: torch.Tensor,
                             batch_var: torch.Tensor, count: int, momentum: float,
                             num_batches_tracked: Optional[torch.Tensor]) -> None:
    """The running-statistics update as an op that declares its mutation (what torch.compile sees)."""
    _update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum, num_batches_tracked)


@_update_running_stats_op.register_fake
def _(running_mean, running_var, batch_mean, batch_var, count, momentum, num_batches_tracked):
    return None


# ---------------------------------------------------------------------------------------------
# Public API: validation and dispatch.
# ---------------------------------------------------------------------------------------------

def _check_channel_vector(name: str, t, x: torch.Tensor) -> None:
    if t is None:
        return
    tensor_arg(name, t)
    c = x.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{name} must have shape ({c},) (one value per channel of x), got {tuple(t.shape)}")
    # As torch's BatchNorm: x's dtype, or float32 beside bfloat16 / float16 x (a model kept in float32
    # under autocast). Any other pairing would be computed silently at some other precision. (Running
    # statistics may be kept in any floating dtype: they are updated in their own.)
    low_precision_x = x.dtype in (torch.bfloat16, torch.float16)
    if name in ("weight", "bias") and t.dtype != x.dtype and not (t.dtype == torch.float32 and low_precision_x):
        allowed = "float32 or " + str(x.dtype) if low_precision_x else str(x.dtype)
        raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; expected {allowed}")


def _normalise_layout(x: torch.Tensor) -> torch.Tensor:
    """x contiguous or channels_last (the two layouts the kernels walk); anything else is copied."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def batch_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                   momentum: Optional[float] = 0.1, eps: float = 1e-5, act: str = "linear",
                   alpha: Optional[float] = None, impl: str = "auto", *,
                   num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(BatchNorm(x)) in fused passes, as ``F.batch_norm`` followed by the activation.

    ``x``: (N, C), (N, C, L) or (N, C, H, W) (contiguous or channels_last; other strides are copied),
    float32/float64/bfloat16/float16 (statistics in float32, float64 for float64). ``weight``, ``bias``:
    (C,) or None (affine=False). ``running_mean``, ``running_var``: (C,) or both None (then batch
    statistics are always used). ``training``: normalise with the batch statistics and update the
    running statistics in place (as ``nn.BatchNorm``: unbiased variance, factor ``momentum``); else
    normalise with the running statistics. ``momentum=None`` is the cumulative average: pass the
    module's ``num_batches_tracked`` (already incremented for this batch), the factor is then
    1 / num_batches_tracked. ``act``/``alpha``: an activation of ``fastgan.ops.activations``.
    ``impl``: "auto" | "triton" | "cpu" | "ref".

    Differentiable twice in x, weight and bias (R1 / gradient penalties).
    """
    tensor_arg("x", x)
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must have dtype float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"x must have shape (N, C), (N, C, L) or (N, C, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None, got "
                         f"running_mean={'None' if running_mean is None else 'a tensor'}, "
                         f"running_var={'None' if running_var is None else 'a tensor'}")
    if num_batches_tracked is not None:
        tensor_arg("num_batches_tracked", num_batches_tracked, floating=False)
        if num_batches_tracked.numel() != 1:
            raise ValueError(f"num_batches_tracked must be a one-element tensor (nn.BatchNorm's counter), got shape "
                             f"{tuple(num_batches_tracked.shape)}")
    device = same_device(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                         num_batches_tracked=num_batches_tracked)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a Python bool, got {type(training).__module__}.{type(training).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, the number of "
                             "batches seen including this one (nn.BatchNorm's buffer)")
    elif isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not math.isfinite(momentum):
        raise ValueError(f"momentum must be a finite number or None, got {momentum!r}")
    spec, alpha = resolve_act(act, alpha)
    use_batch_stats = training or running_mean is None
    count = math.prod(x.shape[:1] + x.shape[2:])  # values per channel (N * spatial; C may be 0)
    if use_batch_stats and count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    impl = resolve_impl("batch_norm_act", impl, device)
    if count == 0 and c > 0:
        # No values (N = 0, or an empty map): an empty result with zero gradients, the running statistics
        # untouched, as nn.BatchNorm gives (batch statistics of nothing would be 0 / 0).
        acc = _acc_dtype(x.dtype)
        return _reference_core(x, weight, bias, x.new_zeros(c, dtype=acc), x.new_ones(c, dtype=acc), False, eps,
                               spec, alpha)[0]
    if impl == "ref":
        return batch_norm_act_reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                        act, alpha, num_batches_tracked=num_batches_tracked)

    x4 = x.unsqueeze(-1) if x.dim() == 3 else x  # (N, C, L) walks as (N, C, L, 1)
    x4 = _normalise_layout(x4)
    unfused = None if kernel_computes(impl, spec) else (spec, alpha)  # else: the kernels with linear, then the row
    if unfused is not None:
        spec, alpha = resolve_act("linear")
    stats_in = (None, None) if use_batch_stats else (running_mean, running_var)
    update_here = training and running_mean is not None
    if torch.compiler.is_compiling():
        y, mean, var = _forward_op(x4, weight, bias, stats_in[0], stats_in[1], use_batch_stats, float(eps),
                                   spec.index, float(alpha), impl)
    elif impl == "cpu":  # the same kernels and backward with the autograd nodes in C++ (no Python per call)
        y, mean, var = _cpu_autograd_forward(x4, weight, bias, stats_in[0], stats_in[1], use_batch_stats,
                                             float(eps), spec.index, float(alpha), impl)
    else:
        # Eager Triton: the statistics kernel also updates the running statistics (nine fewer launches of
        # torch ops on C-element vectors), where they are plain vectors in the statistics' dtype.
        running = None
        if (update_here and momentum is not None and running_mean.dtype == running_var.dtype == _acc_dtype(x.dtype)
                and running_mean.is_contiguous() and running_var.is_contiguous()):
            running = (running_mean, running_var, float(momentum), count)
            update_here = False
        y, mean, var = _ForwardFunction.apply(x4, weight, bias, stats_in[0], stats_in[1], use_batch_stats,
                                              float(eps), spec.index, float(alpha), impl, running)
    if update_here:
        # Eager calls the update directly: the dispatcher of a mutating custom op costs ~0.2 ms a call,
        # more than the update itself; traced code must see the op and its declared mutation.
        update = _update_running_stats_op if torch.compiler.is_compiling() else _update_running_stats
        update(running_mean, running_var, mean.detach(), var.detach(), count,
               0.0 if momentum is None else float(momentum), num_batches_tracked if momentum is None else None)
    if unfused is not None:
        y = apply_unfused(y, *unfused)
    return y.squeeze(-1) if x.dim() == 3 else y
