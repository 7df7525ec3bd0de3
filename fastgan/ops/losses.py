"""The fused log-D losses of the GAN game: loss, the game's statistics and the gradient in one pass.

Logits are D's raw outputs, D(x) = sigmoid(logit). With r the real logits, f the fake logits and
sp the softplus (means over the batch):

==================  ==============================  ================================
kind                D loss                          G loss
==================  ==============================  ================================
minimax             mean sp(-r) + mean sp(f)        -mean sp(f)   (min log(1 - D(G(z))))
nonsaturating       mean sp(-r) + mean sp(f)        mean sp(-f)   (max log D(G(z)))
hinge               mean relu(1-r) + mean relu(1+f) -mean f
wasserstein         mean f - mean r                 -mean f
least_squares       0.5 mean (r-1)^2 + 0.5 mean f^2 0.5 mean (f-1)^2
==================  ==============================  ================================

Whatever the kind, ``d_loss`` also returns the batch estimate of V(G, D) = -mean sp(-r) - mean sp(f),
the Jensen-Shannon estimate (V + log 4) / 2 (exact when D is optimal), and mean D(x), mean D(G(z)).

Implementations: ``ref`` below (the specification), ``cpu`` (csrc/cpu/losses.cpp) and ``triton``
(fastgan/ops/triton/losses.py). The fast paths compute d loss / d logits in the forward pass (it
costs nothing extra once the logits are loaded), so backward only scales it by the incoming gradient.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from fastgan._dispatch import extension, register_op, resolve_impl, same_device, tensor_arg, triton_module
from fastgan.ops._autograd import partial_variable


class LossKind(NamedTuple):
    index: int                                                 # the id the kernels switch on
    d_real: Callable[[torch.Tensor], torch.Tensor]             # per-sample D loss term on real logits
    d_fake: Callable[[torch.Tensor], torch.Tensor]             # per-sample D loss term on fake logits
    g_fake: Callable[[torch.Tensor], torch.Tensor]             # per-sample G loss term on fake logits


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # F.softplus returns x itself beyond its default threshold 20, a float32 cut-off: in float64
    # softplus(21) - 21 = 8e-10 and 1 - sigmoid(21) (its gradient) are lost. Beyond 40 both are below
    # float64's rounding, and exp(40) is finite in float32 too.
    return F.softplus(x, threshold=40.0)


LOSS_KINDS: dict[str, LossKind] = {
    "minimax": LossKind(0, lambda r: _softplus(-r), lambda f: _softplus(f), lambda f: -_softplus(f)),
    "nonsaturating": LossKind(1, lambda r: _softplus(-r), lambda f: _softplus(f), lambda f: _softplus(-f)),
    "hinge": LossKind(2, lambda r: F.relu(1 - r), lambda f: F.relu(1 + f), lambda f: -f),
    "wasserstein": LossKind(3, lambda r: -r, lambda f: f, lambda f: -f),
    "least_squares": LossKind(4, lambda r: 0.5 * (r - 1) ** 2, lambda f: 0.5 * f ** 2, lambda f: 0.5 * (f - 1) ** 2),
}

LOG4 = math.log(4.0)


class DLoss(NamedTuple):
    """The discriminator's loss and the game's statistics, all 0-d tensors on the logits' device."""
    loss: torch.Tensor    # the D loss of the chosen kind (carries the gradient)
    value: torch.Tensor   # V(G, D) estimate: mean log D(x) + mean log(1 - D(G(z)))
    jsd: torch.Tensor     # (value + log 4) / 2: the Jensen-Shannon estimate when D is optimal
    d_real: torch.Tensor  # mean D(x)
    d_fake: torch.Tensor  # mean D(G(z))


register_op("d_loss", "d_loss_forward")
register_op("g_loss", "g_loss_forward")


# ---------------------------------------------------------------------------------------------
# Reference (the specification): plain PyTorch, autograd by torch.
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _poison_nonfinite(loss: torch.Tensor, *logits: torch.Tensor) -> torch.Tensor:
    """``loss`` computed on the finite logits, made NaN (with a NaN gradient at exactly the non-finite
    logits) when any logit is NaN or inf: never hidden behind a finite mean or a zero gradient.
    No host synchronisation."""
    for x in logits:
        finite = torch.isfinite(x)
        # 0 where finite, NaN elsewhere: adds 0 (and a 0 gradient) at finite logits, NaN at the others.
        marker = torch.where(finite, torch.zeros_like(x), torch.full_like(x, float("nan")))
        loss = loss + (marker * x).sum()
    return loss


def _finite_part(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def d_loss_reference(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "nonsaturating") -> DLoss:
    spec = _loss_kind(kind)
    acc = _acc_dtype(real_logits.dtype)
    r, f = real_logits.reshape(-1).to(acc), fake_logits.reshape(-1).to(acc)
    rf, ff = _finite_part(r), _finite_part(f)
    loss = _poison_nonfinite(spec.d_real(rf).mean() + spec.d_fake(ff).mean(), r, f)
    with torch.no_grad():
        value = -(_softplus(-r).mean() + _softplus(f).mean())
        stats = torch.stack([value, (value + LOG4) / 2, torch.sigmoid(r).mean(), torch.sigmoid(f).mean()])
        stats = _poison_nonfinite(stats, r, f)
    return DLoss(loss, stats[0], stats[1], stats[2], stats[3])


def g_loss_reference(fake_logits: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    spec = _loss_kind(kind)
    f = fake_logits.reshape(-1).to(_acc_dtype(fake_logits.dtype))
    return _poison_nonfinite(spec.g_fake(_finite_part(f)).mean(), f)


# ---------------------------------------------------------------------------------------------
# Fast paths, registered with torch.library so torch.compile sees one opaque op (no graph break).
# ---------------------------------------------------------------------------------------------

def _d_loss_impl(real, fake, kind: int, impl: str, need_grad: bool):
    if impl == "cpu":
        stats, grad_real, grad_fake = extension().d_loss_forward(real, fake, kind, need_grad)
        return stats, grad_real, grad_fake
    return triton_module("losses").d_loss_forward(real, fake, kind, need_grad)


def _g_loss_impl(fake, kind: int, impl: str, need_grad: bool):
    if impl == "cpu":
        loss, grad = extension().g_loss_forward(fake, kind, need_grad)
        return loss, grad
    return triton_module("losses").g_loss_forward(fake, kind, need_grad)


def _empty_grad(x: torch.Tensor, need_grad: bool) -> torch.Tensor:
    # d loss / d logits is kept in the accumulation dtype (see csrc/cpu/losses.cpp, DLossResult): in bf16 /
    # fp16 its ~1/n values round into subnormals, and a loss scale multiplied in fp16 overflows.
    return x.new_empty(x.numel() if need_grad else 0, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("fastgan::d_loss", mutates_args=())
def _d_loss_op(real: torch.Tensor, fake: torch.Tensor, kind: int, impl: str,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stats, grad_real, grad_fake); stats = [loss, value, jsd, d_real, d_fake]."""
    return _d_loss_impl(real, fake, kind, impl, need_grad)


@_d_loss_op.register_fake
def _(real, fake, kind, impl, need_grad):
    stats = real.new_empty(5, dtype=_acc_dtype(real.dtype))
    return stats, _empty_grad(real, need_grad), _empty_grad(fake, need_grad)


def _d_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2], inputs[0], inputs[1])
    ctx.kind = inputs[2]


def _kind_name(index: int) -> str:
    return next(name for name, spec in LOSS_KINDS.items() if spec.index == index)


def _d_loss_backward(ctx, grad_stats, _grad_real_out, _grad_fake_out):
    grad_real, grad_fake, real, fake = ctx.saved_tensors
    if grad_real.numel() == 0:
        raise RuntimeError("fastgan.ops.d_loss: backward through a call made without gradients "
                           "(grad mode was off or no input required grad)")
    g = grad_stats[0]  # only `loss` carries gradient; the statistics are detached by d_loss
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the saved gradient is a constant to autograd, so take
        # the differentiable gradient of the reference instead of a silently zero second derivative.
        with torch.enable_grad():
            real, fake = partial_variable(real), partial_variable(fake)
            loss = d_loss_reference(real, fake, _kind_name(ctx.kind)).loss
            gr, gf = torch.autograd.grad(loss, (real, fake), g, create_graph=True)
        return gr, gf, None, None, None
    # Scaled in the accumulation dtype, then cast to the logits' (a loss scale of 65536 is inf in fp16).
    return ((g * grad_real).to(real.dtype).view_as(real), (g * grad_fake).to(fake.dtype).view_as(fake),
            None, None, None)


_d_loss_op.register_autograd(_d_loss_backward, setup_context=_d_loss_setup)


@torch.library.custom_op("fastgan::g_loss", mutates_args=())
def _g_loss_op(fake: torch.Tensor, kind: int, impl: str, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad_fake)."""
    return _g_loss_impl(fake, kind, impl, need_grad)


@_g_loss_op.register_fake
def _(fake, kind, impl, need_grad):
    return fake.new_empty((), dtype=_acc_dtype(fake.dtype)), _empty_grad(fake, need_grad)


def _g_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0])
    ctx.kind = inputs[1]


def _g_loss_backward(ctx, grad_loss, _grad_out):
    grad_fake, fake = ctx.saved_tensors
    if grad_fake.numel() == 0:
        raise RuntimeError("fastgan.ops.g_loss: backward through a call made without gradients "
                           "(grad mode was off or no input required grad)")
    if torch.is_grad_enabled():  # create_graph: see _d_loss_backward
        with torch.enable_grad():
            fake = partial_variable(fake)
            loss = g_loss_reference(fake, _kind_name(ctx.kind))
            (gf,) = torch.autograd.grad(loss, (fake,), grad_loss, create_graph=True)
        return gf, None, None, None
    return (grad_loss * grad_fake).to(fake.dtype).view_as(fake), None, None, None


_g_loss_op.register_autograd(_g_loss_backward, setup_context=_g_loss_setup)


# Eager calls take cheaper autograd nodes around the same kernels: the torch.library dispatch of a
# custom op costs tens of microseconds per call, more than the whole op at GAN batch sizes. The cpu
# implementation has its node in C++ (LossBackward in csrc/cpu/losses.cpp, a few microseconds
# forward and backward); triton uses the Python autograd.Functions below. Under torch.compile the
# custom ops above are used, so the graph stays whole.

class _DLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, real, fake, kind, impl, need_grad):
        stats, grad_real, grad_fake = _d_loss_impl(real, fake, kind, impl, need_grad)
        ctx.save_for_backward(grad_real, grad_fake, real, fake)
        ctx.kind = kind
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        return _d_loss_backward(ctx, grad_stats, None, None)


class _GLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fake, kind, impl, need_grad):
        loss, grad = _g_loss_impl(fake, kind, impl, need_grad)
        ctx.save_for_backward(grad, fake)
        ctx.kind = kind
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _g_loss_backward(ctx, grad_loss, None)


# ---------------------------------------------------------------------------------------------
# Public API: validation and dispatch.
# ---------------------------------------------------------------------------------------------

_LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _loss_kind(kind) -> LossKind:
    if not isinstance(kind, str) or kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {tuple(LOSS_KINDS)}, got {kind!r}")
    return LOSS_KINDS[kind]


def _check_logits(name: str, x) -> torch.Tensor:
    tensor_arg(name, x)
    if x.layout != torch.strided or x.is_nested:  # the kernels read a dense buffer of logits
        raise ValueError(f"{name} must be a dense tensor, got a {'nested' if x.is_nested else x.layout} one")
    if x.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"{name} must have dtype float32, float64, bfloat16 or float16, got {x.dtype}")
    if not (x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1)):
        raise ValueError(f"{name} must have shape (N,) or (N, 1) (one logit per sample), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the loss of an empty batch is undefined")
    return x


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).contiguous()


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "nonsaturating",
           impl: str = "auto") -> DLoss:
    """The discriminator's loss of ``kind`` and the game's statistics, in one pass over the logits.

    ``real_logits`` and ``fake_logits`` are D's raw outputs, shape ``(N,)`` or ``(N, 1)`` (the two
    batch sizes may differ), float32/float64/bfloat16/float16 (accumulation in float32, float64 for
    float64). Returns ``DLoss(loss, value, jsd, d_real, d_fake)``: 0-d tensors on the logits' device,
    computed without a host synchronisation; only ``loss`` carries a gradient (to both inputs, in
    their dtype). NaN or inf logits make every result NaN.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    spec = _loss_kind(kind)
    device = same_device(real_logits=real_logits, fake_logits=fake_logits)
    if real_logits.dtype != fake_logits.dtype:
        raise ValueError(f"fake_logits has dtype {fake_logits.dtype} but real_logits has {real_logits.dtype}; "
                         "they must share a dtype")
    impl = resolve_impl("d_loss", impl, device)
    if impl == "ref":
        return d_loss_reference(real_logits, fake_logits, kind)
    compiling = torch.compiler.is_compiling()
    if impl == "cpu" and not compiling:   # the C++ autograd node: a few microseconds per call
        return DLoss(*extension().d_loss_autograd(real_logits, fake_logits, spec.index))
    need_grad = torch.is_grad_enabled() and (real_logits.requires_grad or fake_logits.requires_grad)
    real, fake = _flat(real_logits), _flat(fake_logits)
    if compiling:
        stats = _d_loss_op(real, fake, spec.index, impl, need_grad)[0]
    else:
        stats = _DLossFunction.apply(real, fake, spec.index, impl, need_grad)
    detached = stats.detach()
    return DLoss(stats[0], detached[1], detached[2], detached[3], detached[4])


def g_loss(fake_logits: torch.Tensor, kind: str = "nonsaturating", impl: str = "auto") -> torch.Tensor:
    """The generator's loss of ``kind`` on D's logits for generated samples (see ``d_loss``)."""
    _check_logits("fake_logits", fake_logits)
    spec = _loss_kind(kind)
    impl = resolve_impl("g_loss", impl, fake_logits.device)
    if impl == "ref":
        return g_loss_reference(fake_logits, kind)
    compiling = torch.compiler.is_compiling()
    if impl == "cpu" and not compiling:
        return extension().g_loss_autograd(fake_logits, spec.index)
    need_grad = torch.is_grad_enabled() and fake_logits.requires_grad
    if compiling:
        return _g_loss_op(_flat(fake_logits), spec.index, impl, need_grad)[0]
    return _GLossFunction.apply(_flat(fake_logits), spec.index, impl, need_grad)
