"""The fused modules under saved-tensor hooks: torch.utils.checkpoint (non-reentrant, torch's recommended
mode, whose early stop raises from a pack hook) gives the values and gradients of the plain call, and an
exception raised in a user's pack hook reaches the caller as itself, through the C++ autograd nodes of
the CPU path too."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastgan.nn import BatchNormAct2d, BiasAct, Conv2dAct, FusedLinear

MODULES = {
    "Conv2dAct": lambda: Conv2dAct(3, 4, 3, act="lrelu"),
    "FusedLinear": lambda: nn.Sequential(nn.Flatten(), FusedLinear(75, 4, act="lrelu")),
    "BiasAct": lambda: BiasAct(3, act="tanh"),
    "BatchNormAct2d": lambda: BatchNormAct2d(3, act="lrelu"),
}


def _with_impl(module: nn.Module, impl: str) -> nn.Module:
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return module


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("name", list(MODULES))
def test_non_reentrant_checkpoint_matches_the_plain_call(name, impl):
    torch.manual_seed(0)
    plain = _with_impl(MODULES[name](), impl)
    checked = _with_impl(MODULES[name](), impl)
    checked.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 5, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = plain(x1)
    y2 = checkpoint(checked, x2, use_reentrant=False)
    torch.testing.assert_close(y2, y1)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    for p, q in zip(checked.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("name", list(MODULES))
def test_an_exception_in_a_pack_hook_reaches_the_caller(name, impl):
    def pack(t):
        raise _Boom("from the pack hook")

    module = _with_impl(MODULES[name](), impl)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with pytest.raises(_Boom, match="from the pack hook"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
