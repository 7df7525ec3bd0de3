"""The table of activations every fused op shares (as StyleGAN3's ``bias_act`` keeps one).

Each row gives the activation's name, the integer id the kernels switch on, its default ``alpha``
(and what alpha means, if anything), the function itself in plain PyTorch (the reference), its
derivative expressed in the activation's OUTPUT, so that a fused backward needs only the saved output
(no second copy of the pre-activation), and the ``torch.nn`` module that ``fastgan.fuse`` replaces by
it. The derivative rules are written with differentiable torch ops: the backward of a fused op is
differentiable again (double backward, for R1 / gradient penalties).

**Adding an activation is one row here.** From then on it works in ``linear_act``, ``bias_act``,
``batch_norm_act``, their modules and ``fastgan.fuse``, under every ``impl``, twice differentiable and
under ``torch.compile``: where a kernel has no code for a row (``kernel_computes`` says which), the op
runs its kernel without activation and applies the row's ``ref`` (then gain and clamp) to the result
with torch ops (``apply_unfused``): a few more passes over memory, forward and backward. To fuse the
new activation into the kernels as well, give it the matching lines in
``fastgan/ops/triton/activations.py`` (``KERNEL_ACTIVATIONS``, ``apply_act``, ``act_grad_from_output``)
and ``csrc/cpu/activations.h`` (``kActNames`` and the switches): each kernel table names its ids, and
an id counts for a kernel only where the names agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgan._dispatch import extension, triton_module


@dataclass(frozen=True)
class Activation:
    """One activation ``y = f(x, alpha)``.

    ``grad_from_output(y, alpha)`` is ``f'(x)`` written as a function of ``y = f(x)``;
    ``grad2_from_output(y, alpha)`` is the derivative of that rule with respect to ``y``
    (``d/dy [f'(x(y))]``), which the fused ops' double backward needs. Both are exact wherever
    ``f`` is differentiable (at the kink of relu / lrelu they follow torch: the slope left of 0).

    ``grad_zero_where(y, alpha)``: for an ``f'`` that is 1 or 0 (relu), the mask of outputs where it
    is 0; the backward then selects the incoming gradient rather than multiplying it, as torch's
    ``threshold_backward`` (0 where ``y <= 0``, the incoming gradient elsewhere, NaN outputs
    included): an inf / NaN gradient (an overflowed loss scale) at an inactive unit gives 0, not
    NaN. ``piecewise_linear``: ``f'' = 0`` wherever ``f`` is differentiable, so the double backward's
    term in the output is exactly 0 (no product that an inf gradient would turn into NaN).
    ``backward`` and ``backward2`` apply both rules; the kernels follow them (``act_backward`` in
    ``fastgan/ops/triton/activations.py``, ``act_backward_ct`` in ``csrc/cpu/activations.h``).

    ``alpha_meaning``: what ``alpha`` is for this activation (None: it has none and ignores alpha;
    give it for any row that takes alpha: error messages and module reprs use it); ``alpha_min``: the
    smallest alpha accepted. ``module``: the ``torch.nn`` activation module that ``fastgan.fuse`` folds
    into the layer before it (exact type); ``module_matches(m)``: whether that instance computes this
    row's function (e.g. False for a variant selected by a constructor option); ``module_alpha(m)``: its
    alpha.
    """
    name: str
    index: int
    default_alpha: float
    ref: Callable[[Tensor, float], Tensor]
    grad_from_output: Callable[[Tensor, float], Tensor]
    grad2_from_output: Callable[[Tensor, float], Tensor]
    alpha_meaning: str | None = None
    alpha_min: float = -math.inf
    grad_zero_where: Callable[[Tensor, float], Tensor] | None = None
    piecewise_linear: bool = False
    module: type[nn.Module] | None = None
    module_matches: Callable[[Any], bool] = lambda m: True
    module_alpha: Callable[[Any], float | None] = lambda m: None

    def backward(self, grad_y: Tensor, y: Tensor, alpha: float) -> Tensor:
        """``grad_y * f'(x)`` from the output ``y = f(x)`` (differentiable in ``grad_y`` and ``y``)."""
        if self.grad_zero_where is not None:
            return torch.where(self.grad_zero_where(y, alpha), 0.0, grad_y)
        return grad_y * self.grad_from_output(y, alpha)

    def backward2(self, grad_y: Tensor, y: Tensor, alpha: float) -> Tensor:
        """``grad_y * d/dy [f'(x(y))]``: the derivative of ``backward`` in ``y``, times ``grad_y``."""
        if self.piecewise_linear:
            return torch.zeros_like(y)
        return grad_y * self.grad2_from_output(y, alpha)


def _step(y: Tensor) -> Tensor:
    # 1 where y > 0: the torch convention for relu's (and leaky relu's) slope at 0 is the left one.
    return (y > 0).to(y.dtype)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("linear", 0, 0.0,
                   ref=lambda x, alpha: x,
                   grad_from_output=lambda y, alpha: torch.ones_like(y),
                   grad2_from_output=lambda y, alpha: torch.zeros_like(y),
                   piecewise_linear=True),
        Activation("relu", 1, 0.0,
                   ref=lambda x, alpha: torch.relu(x),
                   grad_from_output=lambda y, alpha: _step(y),
                   grad2_from_output=lambda y, alpha: torch.zeros_like(y),
                   grad_zero_where=lambda y, alpha: y <= 0, piecewise_linear=True,
                   module=nn.ReLU),
        Activation("lrelu", 2, 0.2,
                   ref=lambda x, alpha: F.leaky_relu(x, alpha),
                   # y > 0 exactly where x > 0 because alpha >= 0 (alpha_min)
                   grad_from_output=lambda y, alpha: _step(y) * (1.0 - alpha) + alpha,
                   grad2_from_output=lambda y, alpha: torch.zeros_like(y),
                   piecewise_linear=True,
                   alpha_meaning="the negative slope", alpha_min=0.0,
                   module=nn.LeakyReLU, module_alpha=lambda m: float(m.negative_slope)),
        Activation("tanh", 3, 0.0,
                   ref=lambda x, alpha: torch.tanh(x),
                   grad_from_output=lambda y, alpha: 1.0 - y * y,
                   grad2_from_output=lambda y, alpha: -2.0 * y,
                   module=nn.Tanh),
        Activation("sigmoid", 4, 0.0,
                   ref=lambda x, alpha: torch.sigmoid(x),
                   grad_from_output=lambda y, alpha: y * (1.0 - y),
                   grad2_from_output=lambda y, alpha: 1.0 - 2.0 * y,
                   module=nn.Sigmoid),
    )
}

ACTIVATION_BY_INDEX: dict[int, Activation] = {a.index: a for a in ACTIVATIONS.values()}
if len(ACTIVATION_BY_INDEX) != len(ACTIVATIONS):
    raise RuntimeError("fastgan.ops.activations: two rows of ACTIVATIONS share an index")


def resolve_act(act: str | Activation, alpha: float | None = None) -> tuple[Activation, float]:
    """Validate an activation name and its ``alpha``; return the table row and the alpha to use.

    ``alpha=None`` takes the row's default. ``alpha`` only changes rows with an ``alpha_meaning``
    (lrelu: its negative slope, which must be >= 0 so that the sign of the output tells the branch);
    other activations ignore it.
    """
    if isinstance(act, Activation):
        act = act.name
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
    row = ACTIVATIONS[act]
    if alpha is None:
        return row, row.default_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a real number or None, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if alpha < row.alpha_min:
        raise ValueError(f"alpha for act={row.name!r} must be >= {row.alpha_min:g} ({row.alpha_meaning}), "
                         f"got {alpha!r}")
    return row, alpha


def activation_of_module(m: nn.Module) -> tuple[str, float | None] | None:
    """``(act, alpha)`` of a ``torch.nn`` activation module that a table row stands for (exact type,
    an alpha the row accepts), else None: what ``fastgan.fuse`` may fold into the layer before it."""
    for row in ACTIVATIONS.values():
        if row.module is not None and type(m) is row.module:
            if not row.module_matches(m):
                return None
            alpha = row.module_alpha(m)
            try:
                resolve_act(row, alpha)
            except ValueError:  # e.g. a LeakyReLU with a negative slope: not this row's function
                return None
            return row.name, alpha
    return None


_KERNEL_NAMES: dict[str, tuple[str, ...]] = {}  # impl -> the activation names its kernels have code for, by id


@torch.compiler.assume_constant_result  # traced code gets the answer, not the lookup (pybind, imports)
def _kernel_has(impl: str, name: str, index: int) -> bool:
    names = _KERNEL_NAMES.get(impl)
    if names is None:  # read each kernel family's own table once
        names = ()
        if impl == "cpu":
            ext = extension()
            if ext is not None:
                # A build older than kernel_activations (not rebuilt since) has code for these five.
                names = tuple(ext.kernel_activations() if hasattr(ext, "kernel_activations")
                              else ("linear", "relu", "lrelu", "tanh", "sigmoid"))
        elif impl == "triton":
            names = tuple(triton_module("activations").KERNEL_ACTIVATIONS)
        _KERNEL_NAMES[impl] = names
    return 0 <= index < len(names) and names[index] == name


def kernel_computes(impl: str, spec: Activation) -> bool:
    """Whether the kernels of ``impl`` (``"cpu"`` / ``"triton"``) compute ``spec`` themselves: their
    table has code under the row's id, for the row's name. Otherwise the op runs its kernel with
    ``linear`` and ``apply_unfused`` applies the row after it."""
    return _kernel_has(impl, spec.name, spec.index)


def apply_unfused(y: Tensor, spec: Activation, alpha: float, gain: float = 1.0, clamp: float | None = None) -> Tensor:
    """``clamp(spec(y) * gain)`` with the row's torch ops (differentiable to any order): the tail of the
    ``linear_act`` and ``bias_act`` references, and what runs after a kernel that lacks the row. (After
    a bf16 / fp16 ``batch_norm_act`` kernel it sees the normalised output rounded to that dtype, where
    the reference applies the activation before rounding: one rounding more.)"""
    y = spec.ref(y, alpha)
    if gain != 1:
        y = y * gain
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y
