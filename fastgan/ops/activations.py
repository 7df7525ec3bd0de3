"""The table of activations every fused op shares (as StyleGAN3's ``bias_act`` keeps one).

Each row gives the activation's name, the integer id the kernels switch on, its default ``alpha``,
the function itself in plain PyTorch (the reference), and its derivative expressed in the
activation's OUTPUT, so that a fused backward needs only the saved output (no second copy of the
pre-activation). Both derivative rules are written with differentiable torch ops: the backward of a
fused op is differentiable again (double backward, for R1 / gradient penalties).

Adding an activation is one row here plus the matching lines in the kernels' helpers:
``fastgan/ops/triton/activations.py`` (``apply_act``, ``act_grad_from_output``) and
``csrc/cpu/activations.h`` (same names). The ids must agree across the three files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Activation:
    """One activation ``y = f(x, alpha)``.

    ``grad_from_output(y, alpha)`` is ``f'(x)`` written as a function of ``y = f(x)``;
    ``grad2_from_output(y, alpha)`` is the derivative of that rule with respect to ``y``
    (``d/dy [f'(x(y))]``), which the fused ops' double backward needs. Both are exact wherever
    ``f`` is differentiable (at the kink of relu / lrelu they follow torch: the slope left of 0).
    """
    name: str
    index: int
    default_alpha: float
    ref: Callable[[Tensor, float], Tensor]
    grad_from_output: Callable[[Tensor, float], Tensor]
    grad2_from_output: Callable[[Tensor, float], Tensor]


def _step(y: Tensor) -> Tensor:
    # 1 where y > 0: the torch convention for relu's (and leaky relu's) slope at 0 is the left one.
    return (y > 0).to(y.dtype)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("linear", 0, 0.0,
                   ref=lambda x, alpha: x,
                   grad_from_output=lambda y, alpha: torch.ones_like(y),
                   grad2_from_output=lambda y, alpha: torch.zeros_like(y)),
        Activation("relu", 1, 0.0,
                   ref=lambda x, alpha: torch.relu(x),
                   grad_from_output=lambda y, alpha: _step(y),
                   grad2_from_output=lambda y, alpha: torch.zeros_like(y)),
        Activation("lrelu", 2, 0.2,
                   ref=lambda x, alpha: F.leaky_relu(x, alpha),
                   # y > 0 exactly where x > 0 because alpha >= 0 (resolve_act checks it)
                   grad_from_output=lambda y, alpha: _step(y) * (1.0 - alpha) + alpha,
                   grad2_from_output=lambda y, alpha: torch.zeros_like(y)),
        Activation("tanh", 3, 0.0,
                   ref=lambda x, alpha: torch.tanh(x),
                   grad_from_output=lambda y, alpha: 1.0 - y * y,
                   grad2_from_output=lambda y, alpha: -2.0 * y),
        Activation("sigmoid", 4, 0.0,
                   ref=lambda x, alpha: torch.sigmoid(x),
                   grad_from_output=lambda y, alpha: y * (1.0 - y),
                   grad2_from_output=lambda y, alpha: 1.0 - 2.0 * y),
    )
}

ACTIVATION_BY_INDEX: dict[int, Activation] = {a.index: a for a in ACTIVATIONS.values()}


def resolve_act(act: str | Activation, alpha: float | None = None) -> tuple[Activation, float]:
    """Validate an activation name and its ``alpha``; return the table row and the alpha to use.

    ``alpha=None`` takes the row's default. ``alpha`` only changes ``lrelu`` (its negative slope,
    which must be >= 0 so that the sign of the output tells the branch); other activations ignore it.
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
    if row.name == "lrelu" and alpha < 0:
        raise ValueError(f"alpha for act='lrelu' must be >= 0 (the negative slope), got {alpha!r}")
    return row, alpha
