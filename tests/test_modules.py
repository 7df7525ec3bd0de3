"""fastgan.nn modules as drop-in replacements for the torch modules they stand for (nn.Linear,
nn.Conv*d / nn.ConvTranspose*d, nn.BatchNorm1d/2d, each followed by an activation): what a user of
the torch module may do with it -- wrap the weight in a parametrization, pass torch's constructor
keywords, re-initialise, print -- gives what the torch module + activation gives."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from fastgan.nn import (BatchNormAct1d, BatchNormAct2d, BiasAct, Conv1dAct, Conv2dAct, ConvTranspose1dAct,
                        ConvTranspose2dAct, FusedLinear)

CONVS = [(Conv1dAct, nn.Conv1d, (2, 3, 6)), (Conv2dAct, nn.Conv2d, (2, 3, 5, 5)),
         (ConvTranspose1dAct, nn.ConvTranspose1d, (2, 3, 6)), (ConvTranspose2dAct, nn.ConvTranspose2d, (2, 3, 5, 5))]


class _CountCalls(nn.Module):
    """An identity parametrization that counts how often the weight is computed."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return w


@pytest.mark.parametrize("fused_cls,base,shape", CONVS)
def test_conv_act_computes_a_parametrized_weight_once_per_forward(fused_cls, base, shape):
    """A parametrized weight is computed on each read: torch's conv reads it once a forward, so must
    the fused one (two reads ran spectral_norm's power iteration twice a step)."""
    fused, plain = fused_cls(3, 4, 3, act="lrelu"), base(3, 4, 3)
    counts = []
    for m in (fused, plain):
        count = _CountCalls()
        parametrize.register_parametrization(m, "weight", count)
        count.calls = 0  # (registering checks the parametrization by calling it once)
        m(torch.randn(shape))
        counts.append(count.calls)
    assert counts == [1, 1]


@pytest.mark.parametrize("fused_cls,base,shape", CONVS)
def test_spectral_norm_conv_act_matches_torch_over_training_steps(fused_cls, base, shape):
    """spectral_norm (SNGAN's discriminators) on a fused conv: same outputs, gradients and power-iteration
    state (u, v) as on torch's conv + activation, step after step in training mode."""
    fused = parametrizations.spectral_norm(fused_cls(3, 4, 3, act="lrelu", alpha=0.2))
    plain = parametrizations.spectral_norm(base(3, 4, 3))
    plain.load_state_dict(fused.state_dict())
    for _ in range(3):
        x = torch.randn(shape)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = fused(x1), F.leaky_relu(plain(x2), 0.2)
        torch.testing.assert_close(y1, y2)
        g = torch.randn_like(y2)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)
        for (name, p1), p2 in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, msg=lambda m: f"{name}: {m}")
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, msg=lambda m: f"{key}: {m}")


_BN_HAS_BIAS_KWARG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


@pytest.mark.skipif(not _BN_HAS_BIAS_KWARG, reason="this torch's nn.BatchNorm has no bias keyword")
@pytest.mark.parametrize("fused_cls,base,shape", [(BatchNormAct1d, nn.BatchNorm1d, (4, 3)),
                                                  (BatchNormAct1d, nn.BatchNorm1d, (4, 3, 5)),
                                                  (BatchNormAct2d, nn.BatchNorm2d, (4, 3, 2, 3))])
@pytest.mark.parametrize("impl", ["ref", "cpu", "triton"])
def test_batch_norm_act_takes_torchs_bias_keyword(fused_cls, base, shape, impl):
    """nn.BatchNorm(bias=False) -- a scale without a shift -- has a fused twin: same state_dict keys both
    ways, and the same outputs, gradients and running statistics as torch's module + activation."""
    fused = fused_cls(3, act="relu", impl=impl, bias=False)
    plain = base(3, bias=False)
    assert fused.bias is None and list(fused.state_dict()) == list(plain.state_dict())
    assert "bias=False" in repr(fused)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
    plain.load_state_dict(fused.state_dict())
    for training in (True, False):
        fused.train(training)
        plain.train(training)
        x = torch.randn(shape)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = fused(x1), torch.relu(plain(x2))
        torch.testing.assert_close(y1, y2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(fused.weight.grad, plain.weight.grad)
    fused.load_state_dict(plain.state_dict())  # and back
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value)


def test_every_fused_module_can_be_reset():
    """Re-initialising a model calls reset_parameters() on each module that has one (as torch's own
    modules all do); BiasAct's bias goes back to its initial zeros."""
    bias_act = BiasAct(3, act="relu")
    with torch.no_grad():
        bias_act.bias.fill_(1.0)
    bias_act.reset_parameters()
    assert torch.equal(bias_act.bias, torch.zeros(3))
    BiasAct(3, bias=False).reset_parameters()  # nothing to reset, and no error
    model = nn.Sequential(FusedLinear(2, 3), BiasAct(3), BatchNormAct1d(3), Conv1dAct(3, 3, 1))
    for m in model.modules():
        if m is not model:
            m.reset_parameters()


@pytest.mark.parametrize("make", [lambda act: BatchNormAct1d(3, act=act), lambda act: BatchNormAct2d(3, act=act)])
def test_batch_norm_act_repr_shows_alpha_only_where_the_activation_has_one(make):
    """As the fused linear and conv layers: an alpha is shown for lrelu (its slope), not for relu."""
    assert repr(make("relu")).endswith("act='relu')")
    assert repr(make("lrelu")).endswith("act='lrelu', alpha=0.2)")
