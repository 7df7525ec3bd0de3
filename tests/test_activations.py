"""The activation table's promise: adding an activation is one row of
``fastgan.ops.activations.ACTIVATIONS``. A row added here (ELU, which no kernel has code for) must then
work in linear_act, bias_act and batch_norm_act under every impl (values and first and second
derivatives against formulas written here), in the fused modules, in ``fastgan.fuse`` and under
torch.compile; and the built-in rows must stay fused in both kernel families."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan import _dispatch
from fastgan.nn import BatchNormAct2d, FusedLinear
from fastgan.ops import ACTIVATIONS, batch_norm_act, bias_act, linear_act, resolve_act
from fastgan.ops import activations as table
from fastgan.ops.activations import Activation, kernel_computes

IMPLS = ["ref", "cpu", "triton"]


def close(actual, expected, rtol=1e-5):
    actual, expected = actual.detach().double(), expected.detach().double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(1.0, float(expected.abs().max())))


@pytest.fixture
def elu(monkeypatch):
    """A new row, exactly as a contributor would write it: y = x for x > 0, alpha (e^x - 1) below.
    f'(x) in y: 1 where y > 0, y + alpha elsewhere; d f' / dy: 0 where y > 0, 1 elsewhere."""
    row = Activation("elu", max(a.index for a in ACTIVATIONS.values()) + 1, 1.0,
                     ref=lambda x, alpha: F.elu(x, alpha),
                     grad_from_output=lambda y, alpha: torch.where(y > 0, torch.ones_like(y), y + alpha),
                     grad2_from_output=lambda y, alpha: (y <= 0).to(y.dtype),
                     alpha_meaning="the negative saturation value", alpha_min=0.0,
                     module=nn.ELU, module_alpha=lambda m: float(m.alpha))
    monkeypatch.setitem(ACTIVATIONS, row.name, row)
    monkeypatch.setitem(table.ACTIVATION_BY_INDEX, row.index, row)
    return row


BUILTIN = ("linear", "relu", "lrelu", "tanh", "sigmoid")


def test_builtin_rows_are_fused_by_both_kernel_families():
    """The built-in rows run inside the kernels (a mismatch of ids or names between the three tables
    would silently send them down the unfused path), and every id a kernel claims is the table's."""
    triton_names = _dispatch.triton_module("activations").KERNEL_ACTIVATIONS
    for names in (_dispatch.extension().kernel_activations(), triton_names):
        assert set(BUILTIN) <= set(names)
        for index, name in enumerate(names):
            assert table.ACTIVATION_BY_INDEX[index].name == name
    for name in BUILTIN:
        row = ACTIVATIONS[name]
        assert kernel_computes("cpu", row) and kernel_computes("triton", row), name
        assert not kernel_computes("ref", row)


def test_an_extension_built_before_kernel_activations_keeps_the_builtin_rows_fused(monkeypatch):
    class OldBuild:  # fastgan._C as built before it exported kernel_activations
        pass
    monkeypatch.setattr(table, "extension", lambda: OldBuild())
    monkeypatch.setattr(table, "_KERNEL_NAMES", {})
    assert all(kernel_computes("cpu", ACTIVATIONS[name]) for name in BUILTIN)


def test_a_row_under_a_kernel_id_with_another_name_is_not_sent_to_the_kernel(elu):
    impostor = Activation("not_tanh", ACTIVATIONS["tanh"].index, 0.0, ref=elu.ref,
                          grad_from_output=elu.grad_from_output, grad2_from_output=elu.grad2_from_output)
    assert not kernel_computes("cpu", impostor) and not kernel_computes("triton", impostor)
    assert not kernel_computes("cpu", elu) and not kernel_computes("triton", elu)


def test_fuse_asks_the_row_which_module_instances_it_stands_for(monkeypatch):
    # softplus(x) = log(1 + e^x): f'(x) = 1 - e^-y, d f' / dy = e^-y; nn.Softplus matches only for beta 1
    # and the default threshold (other settings compute another function).
    row = Activation("softplus", max(a.index for a in ACTIVATIONS.values()) + 1, 0.0, ref=lambda x, a: F.softplus(x),
                     grad_from_output=lambda y, a: -torch.expm1(-y), grad2_from_output=lambda y, a: torch.exp(-y),
                     module=nn.Softplus, module_matches=lambda m: m.beta == 1 and m.threshold == 20)
    monkeypatch.setitem(ACTIVATIONS, row.name, row)
    monkeypatch.setitem(table.ACTIVATION_BY_INDEX, row.index, row)
    assert table.activation_of_module(nn.Softplus()) == ("softplus", None)
    assert table.activation_of_module(nn.Softplus(beta=2.0)) is None
    fused = fastgan.fuse(nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2), nn.Softplus(beta=2.0)))
    assert fused[0].act == "softplus" and type(fused[3]) is nn.Softplus
    assert "alpha" not in repr(fused[0])  # no alpha_meaning: the row takes no alpha


def test_new_row_alpha_rules(elu):
    assert resolve_act("elu", None) == (elu, 1.0)
    assert resolve_act("elu", 0.5)[1] == 0.5
    with pytest.raises(ValueError, match=r"alpha for act='elu' must be >= 0 \(the negative saturation value\)"):
        resolve_act("elu", -0.5)
    # the built-in rule keeps its words
    with pytest.raises(ValueError, match=r"alpha for act='lrelu' must be >= 0 \(the negative slope\), got -0.1"):
        resolve_act("lrelu", -0.1)
    assert "elu" in str(pytest.raises(ValueError, resolve_act, "softsign").value)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_shape", [(1, 7), (6, 37), (2, 3, 20)])
def test_linear_act_with_new_row(elu, impl, x_shape):
    x = torch.randn(x_shape, requires_grad=True)
    w = (torch.randn(9, x_shape[-1]) / x_shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(9, requires_grad=True)
    y = linear_act(x, w, b, "elu", 0.7, gain=1.3, impl=impl)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = F.elu(leaves[0] @ leaves[1].t() + leaves[2], 0.7) * 1.3
    assert y.shape == want.shape and y.dtype == x.dtype
    close(y, want)
    g = torch.randn_like(y)
    for got, expected in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(want, leaves, g.double())):
        close(got, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bias_act_with_new_row(elu, impl, layout):
    x = torch.randn(2, 5, 3, 7)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    b = torch.randn(5, requires_grad=True)
    y = bias_act(x, b, 1, "elu", None, gain=1.5, clamp=1.2, impl=impl)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = (F.elu(xd + bd.view(1, -1, 1, 1), 1.0) * 1.5).clamp(-1.2, 1.2)
    close(y, want)
    g = torch.randn_like(y)
    for got, expected in zip(torch.autograd.grad(y, (x, b), g), torch.autograd.grad(want, (xd, bd), g.double())):
        close(got, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_with_new_row(elu, impl, training):
    torch_bn = nn.BatchNorm2d(4).train(training)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5), torch_bn.bias.uniform_(-0.5, 0.5)
        torch_bn.running_mean.uniform_(-0.2, 0.2), torch_bn.running_var.uniform_(0.5, 1.5)
    fused = BatchNormAct2d(4, act="elu", alpha=0.4, impl=impl).train(training)
    fused.load_state_dict(torch_bn.state_dict())
    x = torch.randn(3, 4, 5, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, y = F.elu(torch_bn(x1), 0.4), fused(x2)
    close(y, want)
    g = torch.randn_like(y)
    close(torch.autograd.grad(y, x2, g)[0], torch.autograd.grad(want, x1, g)[0], 1e-4)
    for key, value in torch_bn.state_dict().items():  # running statistics updated exactly as nn.BatchNorm2d
        close(fused.state_dict()[key], value)


@pytest.mark.parametrize("impl", IMPLS)
def test_new_row_in_bfloat16(elu, impl):
    x = torch.randn(6, 4, 3, 3, dtype=torch.bfloat16)
    w = torch.randn(5, 3, dtype=torch.bfloat16)
    b = torch.randn(4, dtype=torch.bfloat16)
    xd = x.double()
    close(linear_act(x, w, None, "elu", 0.5, impl=impl), F.elu(xd @ w.double().t(), 0.5), 2e-2)
    close(bias_act(x, b, 1, "elu", impl=impl), F.elu(xd + b.double().view(1, -1, 1, 1)), 2e-2)
    y = batch_norm_act(x, None, None, None, None, True, act="elu", impl=impl)
    assert y.dtype == torch.bfloat16
    close(y, F.elu(F.batch_norm(xd, None, None, training=True)), 2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_new_row_is_twice_differentiable(elu, impl):
    """gradcheck and gradgradcheck in float64 through all three ops (R1 / gradient penalties)."""
    x = torch.randn(3, 5, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_()  # away from ELU's kink at 0
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bn_w = torch.rand(4, dtype=torch.float64, requires_grad=True)

    def layers(x_, w_, b_, bn_w_):
        h = linear_act(x_, w_, None, "elu", 0.8, gain=1.1, impl=impl)
        h = bias_act(h, b_, 1, "elu", 0.6, impl=impl)
        return batch_norm_act(h, bn_w_, None, None, None, True, act="elu", alpha=0.9, impl=impl)

    assert torch.autograd.gradcheck(layers, (x, w, b, bn_w))
    assert torch.autograd.gradgradcheck(layers, (x, w, b, bn_w))


def test_fuse_folds_the_new_rows_module(elu):
    model = nn.Sequential(nn.Linear(6, 5), nn.ELU(0.5), nn.Linear(5, 4), nn.ELU(-0.5),
                          nn.Conv2d(4, 3, 1), nn.ELU(inplace=True))
    fused = fastgan.fuse(model)
    assert isinstance(fused[0], FusedLinear) and (fused[0].act, fused[0].alpha) == ("elu", 0.5)
    assert isinstance(fused[1], nn.Identity)
    assert type(fused[2]) is nn.Linear and type(fused[3]) is nn.ELU  # alpha < alpha_min: not this row's function
    assert fused[4].act == "elu" and fused[4].alpha == 1.0 and isinstance(fused[5], nn.Identity)
    assert "alpha=0.5" in repr(fused[0])
    x = torch.randn(2, 6)
    close(fused[:4](x), model[:4](x))
    z = torch.randn(2, 4, 3, 3)
    close(fused[4:](z), model[4:](z.clone()))


def test_new_row_under_torch_compile(elu):
    """All three ops (conv + bias_act, batch_norm_act, linear_act) in one fullgraph compile, forward and
    backward, against the same model built from torch modules."""
    torch_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU(0.3), nn.BatchNorm2d(4), nn.ELU(), nn.Flatten(),
                                nn.Linear(4 * 4 * 4, 6), nn.ELU(0.7))
    ours = fastgan.fuse(torch_model, inplace=False)
    assert [m.act for m in (ours[0], ours[2], ours[5])] == ["elu"] * 3
    x = torch.randn(5, 3, 6, 6)
    compiled = torch.compile(ours, fullgraph=True)
    y, want = compiled(x), torch_model(x)
    close(y, want)
    g = torch.randn_like(y)
    params = list(torch_model.parameters())  # ours shares these tensors
    for got, expected in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        close(got, expected, 1e-4)
