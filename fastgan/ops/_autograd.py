"""Helpers shared by the ops' hand-written backward passes."""
from __future__ import annotations

import torch


def partial_variable(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as a variable to take a *partial* derivative with respect to, inside a backward.

    Differentiating with respect to a saved tensor itself would also follow that tensor's own
    history (an incoming gradient usually depends on the op's output, hence on its input), counting
    those paths twice under create_graph and otherwise running -- and freeing -- the forward's node
    from inside its own double backward. A fresh view stays connected to ``x`` (for a further
    derivative) while no other path of the graph reaches it; a tensor without gradient becomes a
    detached leaf. ``None`` stays ``None``.
    """
    if x is None:
        return None
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
