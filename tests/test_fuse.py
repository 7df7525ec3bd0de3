"""fastgan.nn fused layers and fastgan.fuse: the PyTorch DCGAN example's Generator and
Discriminator (as written there) and an MLP GAN keep their state_dict keys and parameter tensors,
give the same outputs, gradients and running statistics in train and eval mode, and compile;
what fuse() does not recognise is left alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan.nn import (BiasAct, Conv1dAct, Conv2dAct, Conv3dAct, ConvTranspose1dAct, ConvTranspose2dAct,
                        ConvTranspose3dAct, FusedLinear)

nz, ngf, ndf, nc = 8, 4, 4, 3


# --- the PyTorch DCGAN example (examples/dcgan/main.py), small sizes -----------------------------

class Generator(nn.Module):
    def __init__(self, ngpu):
        super(Generator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is Z, going into a convolution
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            # state size. (ngf*8) x 4 x 4
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            # state size. (ngf*4) x 8 x 8
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            # state size. (ngf*2) x 16 x 16
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            # state size. (ngf) x 32 x 32
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh()
            # state size. (nc) x 64 x 64
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output


class Discriminator(nn.Module):
    def __init__(self, ngpu):
        super(Discriminator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is (nc) x 64 x 64
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 32 x 32
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 16 x 16
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*4) x 8 x 8
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*8) x 4 x 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid()
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)

        return output.view(-1, 1).squeeze(1)


def weights_init(m):  # the example's initialiser: still finds the fused layers by class name
    classname = m.__class__.__name__
    if classname.find('Conv') != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find('BatchNorm') != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


# --- an MLP GAN: a Sequential G and a D with its own forward (fused through torch.fx) ------------

def mlp_generator():
    return nn.Sequential(nn.Linear(nz, 32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2),
                         nn.Linear(32, 2), nn.Tanh())


class MLPDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(2, 32), nn.LeakyReLU(0.2, inplace=True)
        self.fc2, self.act2 = nn.Linear(32, 32), nn.LeakyReLU(0.2, inplace=True)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x))))).squeeze(1)


def tensors_of(module):
    return module.state_dict(keep_vars=True)


def assert_shares_state(fused, original):
    a, b = tensors_of(fused), tensors_of(original)
    assert list(a) == list(b)
    for k in a:
        assert a[k] is b[k], k


def assert_same_behaviour(make, x_shape):
    """fuse(model) against an independent copy of the model: outputs, input and parameter gradients,
    running statistics, in train mode (twice) and eval mode."""
    torch.manual_seed(0)
    model = make()
    model.apply(weights_init)
    reference = copy.deepcopy(model)
    fused = fastgan.fuse(model)  # shares model's tensors
    assert_shares_state(fused, model)
    for mode in ("train", "train", "eval"):
        for m in (fused, reference):
            m.train(mode == "train")
        x = torch.randn(x_shape)
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yr = fused(xf), reference(xr)
        torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(yr)
        (yf * w).sum().backward()
        (yr * w).sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-6)
        pf, pr = dict(fused.named_parameters()), dict(reference.named_parameters())
        # absolute tolerance on the scale of the model's gradients: a bias followed by BatchNorm has a
        # gradient that is exactly 0, computed as a cancelling sum of terms of that scale
        scale = max(1.0, max(float(p.grad.abs().max()) for p in pr.values()))
        for k in pr:
            torch.testing.assert_close(pf[k].grad, pr[k].grad, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, k=k: f"{k}: {m}")
        for (k, bf), (_, br) in zip(fused.named_buffers(), reference.named_buffers()):
            torch.testing.assert_close(bf, br, rtol=1e-5, atol=1e-6, msg=k)
        for m in (fused, reference):
            m.zero_grad()
    return model, fused


def kinds(module):
    return [type(m).__name__ for m in module.modules()]


def test_dcgan_generator():
    model, fused = assert_same_behaviour(lambda: Generator(0), (3, nz, 1, 1))
    assert kinds(model).count("ConvTranspose2d") == 5 and "Tanh" in kinds(model)  # the original is untouched
    k = kinds(fused)
    assert k.count("BatchNormAct2d") == 4 and k.count("ReLU") == 0
    assert k.count("ConvTranspose2dAct") == 1 and fused.main[12].act == "tanh" and k.count("Tanh") == 0
    assert fused.main[0].__class__ is nn.ConvTranspose2d  # conv -> BatchNorm: the conv stays


def test_dcgan_discriminator():
    _, fused = assert_same_behaviour(lambda: Discriminator(0), (2, nc, 64, 64))
    k = kinds(fused)
    assert k.count("Conv2dAct") == 2 and k.count("BatchNormAct2d") == 3 and k.count("LeakyReLU") == 0
    assert fused.main[0].act == "lrelu" and fused.main[0].alpha == 0.2 and fused.main[11].act == "sigmoid"


def test_mlp_gan():
    _, g = assert_same_behaviour(mlp_generator, (5, nz))
    assert [type(m).__name__ for m in g] == ["FusedLinear", "Identity", "Linear", "BatchNormAct1d", "Identity",
                                             "FusedLinear", "Identity"]
    _, d = assert_same_behaviour(MLPDiscriminator, (5, 2))
    assert isinstance(d.fc1, FusedLinear) and isinstance(d.fc2, FusedLinear) and type(d.out) is nn.Linear
    assert type(d.act1) is nn.Identity and type(d.act2) is nn.Identity


def test_inplace_and_checkpoints_both_ways():
    g = Generator(0)
    keys, tensors = list(g.state_dict()), tensors_of(g)
    assert fastgan.fuse(g, inplace=True) is g
    assert list(g.state_dict()) == keys and all(tensors_of(g)[k] is tensors[k] for k in keys)
    plain = Generator(0)
    plain.load_state_dict(g.state_dict())    # fused checkpoint -> plain model
    g.load_state_dict(Generator(0).state_dict())  # plain checkpoint -> fused model
    assert all(tensors_of(g)[k] is tensors[k] for k in keys)  # loaded into the same tensors


def test_optimizer_built_before_fuse_trains_the_fused_model():
    d = MLPDiscriminator()
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    before = d.fc1.weight.detach().clone()
    fastgan.fuse(d, inplace=True)
    d(torch.randn(4, 2)).sum().backward()
    opt.step()
    assert not torch.equal(d.fc1.weight, before)


def test_leaves_unrecognised_modules_alone():
    class Residual(nn.Module):  # the linear output is used twice: fusing would change the result
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            h = self.fc(x)
            return self.act(h) + h

    class Functional(nn.Module):  # functional activation: not a module to replace
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x))

    class Untraceable(nn.Module):  # data-dependent control flow: fx cannot trace; the Sequential inside is fused
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()
            self.seq = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.seq(self.act(self.fc(x)))

    class MyLinear(nn.Linear):
        pass

    hooked = nn.utils.spectral_norm(nn.Linear(4, 4))  # old-style spectral norm: a pre-forward hook
    model = nn.Sequential(hooked, nn.ReLU(), MyLinear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.LeakyReLU(-0.5),
                          nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.Softplus(), Residual(), Functional(),
                          Untraceable(), nn.LayerNorm(4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 4))
    fused = fastgan.fuse(model)
    assert [type(m) for m in fused] == [type(m) for m in model]  # nothing at the top level is fused
    assert fused[0] is not hooked and type(fused[0]) is nn.Linear
    assert type(fused[10].fc) is nn.Linear and type(fused[10].act) is nn.ReLU
    assert type(fused[11].fc) is nn.Linear
    assert type(fused[12].fc) is nn.Linear and type(fused[12].act) is nn.Tanh  # untraceable level left alone
    assert type(fused[12].seq[0]) is FusedLinear and type(fused[12].seq[1]) is nn.Identity  # ... its Sequential not
    assert kinds(fused).count("FusedLinear") == 1
    x = torch.randn(3, 4)
    model.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), model(x))


def test_torch_compile_fullgraph_of_fused_models():
    torch.manual_seed(0)
    d = fastgan.fuse(MLPDiscriminator())
    g = fastgan.fuse(nn.Sequential(nn.Linear(nz, 16), nn.LeakyReLU(0.2), nn.Linear(16, 2), nn.Tanh()))
    step = torch.compile(lambda z: d(g(z)), fullgraph=True)
    z = torch.randn(6, nz)
    out = step(z)
    torch.testing.assert_close(out, d(g(z)))
    out.sum().backward()
    grads = [p.grad.clone() for p in [*g.parameters(), *d.parameters()]]
    for p in [*g.parameters(), *d.parameters()]:
        p.grad = None
    d(g(z)).sum().backward()
    for got, p in zip(grads, [*g.parameters(), *d.parameters()]):
        torch.testing.assert_close(got, p.grad)


def test_torch_compile_fused_dcgan_discriminator():
    torch.manual_seed(0)
    d = fastgan.fuse(Discriminator(0))
    x = torch.randn(2, nc, 64, 64)
    d.eval()  # eval: no running-stat update, so eager and compiled calls see the same state
    compiled = torch.compile(d, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), d(x))


# --- the fused layers on their own ---------------------------------------------------------------

ACTS = [("relu", None, nn.ReLU()), ("lrelu", 0.1, nn.LeakyReLU(0.1)), ("tanh", None, nn.Tanh()),
        ("sigmoid", None, nn.Sigmoid())]


@pytest.mark.parametrize("act,alpha,torch_act", ACTS)
def test_fused_linear_matches_linear_and_act(act, alpha, torch_act):
    torch.manual_seed(0)
    fl = FusedLinear(7, 5, act=act, alpha=alpha)
    lin = nn.Linear(7, 5)
    lin.load_state_dict(fl.state_dict())
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(fl(x), torch_act(lin(x)))
    assert [n for n, _ in fl.named_parameters()] == ["weight", "bias"]
    assert FusedLinear(3, 2, bias=False).bias is None


@pytest.mark.parametrize("fused_cls,base,shape", [
    (Conv1dAct, nn.Conv1d, (2, 3, 9)), (Conv2dAct, nn.Conv2d, (2, 3, 7, 6)), (Conv3dAct, nn.Conv3d, (1, 3, 5, 4, 4)),
    (ConvTranspose1dAct, nn.ConvTranspose1d, (2, 3, 9)), (ConvTranspose2dAct, nn.ConvTranspose2d, (2, 3, 5, 6)),
    (ConvTranspose3dAct, nn.ConvTranspose3d, (1, 3, 3, 4, 4)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_act_modules(fused_cls, base, shape, bias):
    torch.manual_seed(0)
    conv = base(3, 5, 3, stride=2, padding=1, bias=bias)
    fused = fused_cls.from_conv(conv, "lrelu", 0.2)
    assert isinstance(fused, base) and fused.weight is conv.weight and fused.bias is conv.bias
    x = torch.randn(shape, requires_grad=True)
    y = fused(x)
    y_ref = F.leaky_relu(conv(x), 0.2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *conv.parameters()], g)
    want = torch.autograd.grad(y_ref, [x, *conv.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fresh = fused_cls(3, 5, 3, stride=2, padding=1, bias=bias, act="tanh")
    fresh.load_state_dict(conv.state_dict())
    torch.testing.assert_close(fresh(x), torch.tanh(conv(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="from_conv"):
        fused_cls.from_conv(nn.Linear(3, 3))


def test_conv2d_act_channels_last():
    conv = Conv2dAct(4, 6, 3, padding=1, act="relu").to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    y = conv(x)
    ref = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused_cls,shape,layout", [
    (Conv2dAct, (2, 3, 9, 8), torch.contiguous_format), (Conv2dAct, (2, 3, 9, 8), torch.channels_last),
    (ConvTranspose2dAct, (2, 3, 5, 6), torch.channels_last), (Conv3dAct, (1, 3, 5, 4, 6), torch.channels_last_3d),
    (Conv1dAct, (2, 3, 9), torch.contiguous_format),
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["lrelu", "tanh"])
def test_conv_act_runs_the_activation_in_place_on_the_conv_output(fused_cls, shape, layout, bias, act):
    """On CPU the fused convolution modules apply bias + activation in place on the convolution's fresh
    output (bias_act_fresh_): same values and gradients as the unfused modules, in both layouts."""
    torch.manual_seed(0)
    fused = fused_cls(3, 5, 3, stride=2, padding=1, bias=bias, act=act)
    base = fused._base(3, 5, 3, stride=2, padding=1, bias=bias)
    base.load_state_dict(fused.state_dict())
    if layout is not torch.contiguous_format:
        fused, base = fused.to(memory_format=layout), base.to(memory_format=layout)
    x = torch.randn(shape).to(memory_format=layout).requires_grad_()
    y = fused(x)
    assert y._version > 0                      # written in place after the convolution made it
    ref = F.leaky_relu(base(x), 0.2) if act == "lrelu" else torch.tanh(base(x))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert y.is_contiguous(memory_format=layout) == ref.is_contiguous(memory_format=layout)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, [x, *fused.parameters()], g),
                         torch.autograd.grad(ref, [x, *base.parameters()], g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_act_in_place_path_is_twice_differentiable(layout):
    """R1 through a D that starts with a fused conv + LeakyReLU: gradcheck and gradgradcheck in float64."""
    torch.manual_seed(0)
    fused = Conv2dAct(2, 3, 3, padding=1, act="lrelu").double().to(memory_format=layout)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    w, b = fused.weight, fused.bias
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(fused, {"weight": w, "bias": b}, (x,)),
                                    (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: torch.func.functional_call(fused, {"weight": w, "bias": b}, (x,)),
                                        (x, w, b))


def test_bias_act_module():
    m = BiasAct(5, act="lrelu", gain=2.0, clamp=1.5)
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(m(x), (F.leaky_relu(x + m.bias.view(1, -1, 1, 1), 0.2) * 2).clamp(-1.5, 1.5))
    assert list(m.state_dict()) == ["bias"] and BiasAct(5, bias=False).bias is None
    with pytest.raises(ValueError, match="act"):
        BiasAct(5, act="no_such_activation")


def test_fused_conv_modules_take_unbatched_input():
    """torch's convolutions accept unbatched (C, L) / (C, H, W) input: the bias runs along dim 0 there."""
    torch.manual_seed(0)
    for conv, shape in ((nn.Conv2d(3, 5, 3, padding=1), (3, 5, 7)), (nn.Conv2d(3, 5, 3, padding=1), (3, 6, 7)),
                        (nn.Conv1d(3, 4, 3), (3, 9)), (nn.ConvTranspose2d(3, 4, 3), (3, 4, 4))):
        x = torch.randn(shape)
        fused = fastgan.fuse(nn.Sequential(conv, nn.LeakyReLU(0.2)))
        assert "Act" in type(fused[0]).__name__
        torch.testing.assert_close(fused(x), F.leaky_relu(conv(x), 0.2))
        torch.testing.assert_close(fused(x[None])[0], fused(x))


def _scale_unless_training(module, h):
    return h if module.training else h * 3.0


def test_fuse_leaves_forwards_with_python_branches_alone():
    """fx records one path through forward: a branch not taken while tracing (``noise is None`` is never
    true for a Proxy; ``self.training`` takes the mode of the moment) may put work between a layer and its
    activation, so such a level is not fused -- also when the branch sits in a method forward calls."""
    class NoiseBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)

        def forward(self, x, noise=None):
            h = self.fc(x)
            if noise is None:
                h = h * 3.0
            return self.out(self.act(h))

    class EvalBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def forward(self, x):
            return self.act(self._scale(self.fc(x)))

        def _scale(self, h):
            return h * 3.0 if not self.training else h

    class BaseBranch(nn.Module):  # the branch sits in a base class's forward, reached by super().forward()
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def forward(self, x):
            h = self.fc(x)
            return self.act(h if self.training else h * 3.0)

    class Derived(BaseBranch):
        def forward(self, x):
            return super().forward(x) + 1.0

    class HelperBase(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def _scale(self, h):
            return h if self.training else h * 3.0

    class SuperHelper(HelperBase):  # the branch in a base-class helper reached through super()
        def forward(self, x):
            return self.act(super()._scale(self.fc(x)))

    class ModuleHelper(HelperBase):  # ... and in a function of the module called by name
        def forward(self, x):
            return self.act(_scale_unless_training(self, self.fc(x)))

    class Straight(nn.Module):  # no branch: fused
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def forward(self, x):
            return self.act(self.fc(x))

    x = torch.randn(5, 4)
    for cls in (NoiseBranch, EvalBranch, Derived, SuperHelper, ModuleHelper):
        torch.manual_seed(0)
        model = cls()
        fused = fastgan.fuse(model)
        assert type(fused.fc) is nn.Linear and type(fused.act) is nn.Tanh
        for mode in (True, False):
            model.train(mode)
            fused.train(mode)
            torch.testing.assert_close(fused(x), model(x))
    assert type(fastgan.fuse(Straight()).fc) is FusedLinear


def test_fuse_keeps_batch_norm_extra_state_and_fuses_traced_graph_modules():
    """A BatchNorm carrying more than the standard state (an extra buffer, a non-persistent one, a
    state_dict hook) keeps all of it when fused, as linear and conv layers do; an fx.GraphModule whose
    graph calls nested submodules (targets like ``block.fc``) is fused along its graph."""
    bn = nn.BatchNorm1d(4)
    bn.register_buffer("extra", torch.arange(4.0))
    bn.register_buffer("scratch", torch.zeros(2), persistent=False)
    model = nn.Sequential(bn, nn.ReLU())
    fused = fastgan.fuse(model)
    assert type(fused[0]).__name__ == "BatchNormAct1d"
    assert list(fused.state_dict()) == list(model.state_dict()) and "0.extra" in fused.state_dict()
    assert fused[0].scratch is bn.scratch and fused[0].extra is bn.extra

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.LeakyReLU(0.2)

        def forward(self, x):
            return self.act(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.out = Block(), nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.block(x))

    torch.manual_seed(0)
    traced = torch.fx.symbolic_trace(Net())
    reference = copy.deepcopy(traced)
    fused = fastgan.fuse(traced)
    assert type(fused.block.fc) is FusedLinear and type(fused.block.act) is nn.Identity
    x = torch.randn(3, 4)
    torch.testing.assert_close(fused(x), reference(x))


def test_module_arguments_are_checked_at_construction():
    for build in (lambda: FusedLinear(3, 4, impl="cuda"), lambda: Conv2dAct(3, 4, 3, impl="gpu"),
                  lambda: BiasAct(3, impl=None), lambda: fastgan.nn.BatchNormAct2d(3, impl="fast")):
        with pytest.raises(ValueError, match="impl must be one of"):
            build()
    with pytest.raises(ValueError, match="gain"):
        BiasAct(3, gain=0.0)
    with pytest.raises(ValueError, match="clamp"):
        BiasAct(3, clamp=-1.0)
    with pytest.raises(ValueError, match="dim"):
        BiasAct(3, dim=1.0)
    with pytest.raises(ValueError, match="num_features"):
        BiasAct(-3)


def test_fuse_argument_errors():
    with pytest.raises(TypeError, match="module"):
        fastgan.fuse("model")
    with pytest.raises(TypeError, match="inplace"):
        fastgan.fuse(nn.Linear(2, 2), inplace="yes")


def test_fuse_leaves_a_grandchild_called_by_its_parent_alone():
    """A traced parent calling ``self.block.fc`` then ``self.block.act``: ``block``'s own forward uses ``fc``
    without the activation, so replacing it there would change ``block``'s output."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def forward(self, x):
            return self.fc(x) - x

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x) + self.block.act(self.block.fc(x))

    torch.manual_seed(0)
    model, x = Parent(), torch.randn(3, 4)
    fused = fastgan.fuse(model)
    assert type(fused.block.fc) is nn.Linear
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_leaves_runs_inside_a_sequential_its_parent_walks_through():
    """Feature taps: a parent iterating (or indexing) its Sequential reads the outputs between children,
    so that Sequential is not fused inside; one the parent calls whole still is."""
    class Tapped(nn.Module):
        def __init__(me):  # not named self
            super().__init__()
            me.body = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 1))
            me.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            me.indexed = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(me, x):
            taps, h = [], x
            for i, layer in enumerate(me.body):
                h = layer(h)
                if i == 0:
                    taps.append(h)
            return h + me.head(x).sum(1, keepdim=True) + me.indexed[0](x).sum(1, keepdim=True), taps

    torch.manual_seed(0)
    model, x = Tapped(), -torch.rand(3, 4) * 5
    fused = fastgan.fuse(model)
    assert type(fused.body[0]) is nn.Linear and type(fused.indexed[0]) is nn.Linear
    assert type(fused.head[0]).__name__ == "FusedLinear"
    (y0, t0), (y1, t1) = model(x), fused(x)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(t1[0], t0[0])


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
def test_fuse_copy_of_a_model_with_norm_reparametrisations_after_a_forward(norm):
    """fuse(inplace=False) copies the module tree; spectral_norm / weight_norm keep a computed (non-leaf)
    ``weight`` attribute after a forward, which cannot be deep-copied: it is shared like the parameters."""
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrap = getattr(nn.utils, norm)
        model = nn.Sequential(wrap(nn.Conv2d(3, 4, 3)), nn.LeakyReLU(0.2), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    ref = model(x)
    fused = fastgan.fuse(model)
    assert type(fused[0]) is nn.Conv2d and type(fused[3]).__name__ == "FusedLinear"
    assert type(model[3]) is nn.Linear  # the original is untouched
    torch.testing.assert_close(fused(x), ref)


def test_fuse_leaves_modules_forward_reaches_by_another_name_alone():
    """fx names a module by the first name it is registered under: a forward calling it through an alias
    (``self.fc1_act = self.act``) or a plain dict must not see the name fx gave replaced (the activation
    ran twice, or not at all)."""
    class AliasedAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.LeakyReLU(0.2)
            self.fc = nn.Linear(4, 8)
            self.fc_act = self.act
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.fc_act(self.fc(x)))

    class AliasedLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.fc = self.trunk
            self.act, self.out = nn.Tanh(), nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.act(self.fc(x)))

    class ActTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)
            self.acts = {"main": self.act}

        def forward(self, x):
            return self.out(self.acts["main"](self.fc(x)))

    x = torch.randn(5, 4)
    for cls in (AliasedAct, AliasedLayer, ActTable):
        torch.manual_seed(0)
        model = cls()
        fused = fastgan.fuse(model)
        assert type(fused.fc) is nn.Linear, cls.__name__
        torch.testing.assert_close(fused(x), model(x))


class _StoresWhatItComputes(nn.Module):  # module level: pickled by the test below
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)
        self.features, self.calls, self.history = None, 0, []

    def forward(self, x):
        h = self.act(self.fc(x))
        self.features = h
        self.calls += 1
        self.history.append(h)
        return self.out(h)


def test_fuse_leaves_nothing_of_its_trace_on_the_module():
    """Tracing runs forward on fx Proxies: what forward stores on the module (features for a feature
    matching loss, a call counter, a list it appends to) must not keep Proxies or change after fuse()
    (a Proxy left there made pickle / torch.save of the model fail)."""
    import pickle

    for inplace in (False, True):
        model = _StoresWhatItComputes()
        fused = fastgan.fuse(model, inplace=inplace)
        assert type(fused.fc) is FusedLinear
        for m in (model, fused):
            assert m.features is None and m.calls == 0 and m.history == []
        pickle.loads(pickle.dumps(fused))


def test_fuse_leaves_sequentials_read_between_children_by_other_methods_or_through_a_container_alone():
    """Feature taps read by a method other than forward (a ``features()`` for feature matching), or read
    from Sequentials held in a ModuleList / Sequential that the code walks in turn (``for block in
    self.blocks: for layer in block``): those Sequentials are not fused inside. Called whole, or only
    walked in ``__init__``, they still are."""
    class FeaturesMethod(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.LeakyReLU(0.2))
            self.out = nn.Linear(8, 1)
            for layer in self.main:  # building / initialising the model walks it: no feature read
                nn.init.zeros_(layer.bias) if isinstance(layer, nn.Linear) else None

        def forward(self, x):
            return self.out(self.main(x))

        def features(self, x):
            feats = []
            for layer in self.main:
                x = layer(x)
                feats.append(x)
            return feats

    class NestedTaps(nn.Module):
        def __init__(self, container=nn.ModuleList):
            super().__init__()
            blocks = [nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2)), nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.2))]
            self.blocks = nn.ModuleList(blocks) if container is nn.ModuleList else nn.Sequential(*blocks)
            self.heads = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU())])  # called whole: fused
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            feats = []
            for block in self.blocks:
                for layer in block:
                    x = layer(x)
                    feats.append(x)
            for head in self.heads:
                x = head(x)
            return self.out(x), feats

    torch.manual_seed(0)
    x = torch.randn(5, 4)
    model = FeaturesMethod()
    fused = fastgan.fuse(model)
    assert type(fused.main[0]) is nn.Linear
    for got, want in zip(fused.features(x), model.features(x)):
        torch.testing.assert_close(got, want)
    for container in (nn.ModuleList, nn.Sequential):
        model = NestedTaps(container)
        fused = fastgan.fuse(model)
        assert type(fused.blocks[0][0]) is nn.Linear and type(fused.blocks[1][0]) is nn.Linear
        assert type(fused.heads[0][0]) is FusedLinear
        (y0, t0), (y1, t1) = model(x), fused(x)
        torch.testing.assert_close(y1, y0)
        for got, want in zip(t1, t0):
            torch.testing.assert_close(got, want)


def test_fused_models_under_torch_func_transforms():
    """torch.func.grad (an R1 penalty written with torch.func), vmap and jacrev through a fused model
    give what they give through the original (the fused ops run their torch reference there)."""
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4),
                      nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    fused = fastgan.fuse(d)
    assert kinds(fused).count("Conv2dAct") == 1 and kinds(fused).count("FusedLinear") == 1
    x = torch.randn(3, 3, 8, 8)
    for transform in (lambda m: torch.func.grad(lambda v: m(v).sum())(x),
                      lambda m: torch.func.vmap(lambda v: m(v[None]))(x),
                      lambda m: torch.func.jacrev(lambda v: m(v[None]).sum())(x[0])):
        torch.testing.assert_close(transform(fused), transform(d))


def test_an_init_helper_that_walks_a_sequential_does_not_stop_its_fusion():
    """Code that builds the model (``__init__`` and what it calls, e.g. a ``reset_parameters`` looping over
    ``self.main`` to initialise it) reads no features: the Sequential is still fused. A method that forward
    or other code calls is scanned, and forward always is (an __init__ may run it once to infer shapes)."""
    class InitHelper(nn.Module):
        def __init__(self, probe=False):
            super().__init__()
            self.main = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
            self.reset_parameters()
            if probe:
                self.forward(torch.zeros(1, 4))

        def reset_parameters(self):
            for layer in self.main:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, 0.02)

        def forward(self, x):
            return self.main(x)

    class TapsInForward(InitHelper):
        def forward(self, x):
            feats = []
            for layer in self.main:
                x = layer(x)
                feats.append(x)
            return x, feats

    torch.manual_seed(0)
    assert type(fastgan.fuse(InitHelper()).main[0]) is FusedLinear
    assert type(fastgan.fuse(InitHelper(probe=True)).main[0]) is FusedLinear
    taps = TapsInForward(probe=True)
    fused = fastgan.fuse(taps)
    assert type(fused.main[0]) is nn.Linear
    x = torch.randn(3, 4)
    for got, want in zip(fused(x)[1], taps(x)[1]):
        torch.testing.assert_close(got, want)
