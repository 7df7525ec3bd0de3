"""fastgan.Trainer against the eager PyTorch loops it replaces (fp32, CPU).

The reference loops below are written out in plain PyTorch (torch.optim.Adam, BCEWithLogitsLoss,
torch.autograd.grad) exactly as the PyTorch DCGAN example and the papers state them; the trainer
must produce the same parameters.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgan import Trainer

NZ = 8


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These models are tiny: one thread is fastest, and on a loaded shared machine torch's thread pool
    (spinning OpenMP workers) makes them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# models: the PyTorch DCGAN example's networks (reduced widths), and a small MLP pair
# ---------------------------------------------------------------------------------------------

class DCGANGenerator(nn.Module):
    """The example's generator (ConvTranspose/BatchNorm/ReLU stages, Tanh), for 16x16 images here
    (the example's 64x64 adds two more identical stages; the loop is what is being tested)."""

    def __init__(self, nz=NZ, ngf=4, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 2, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, x):
        return self.main(x)


class DCGANDiscriminator(nn.Module):
    """The example's discriminator (Conv/BatchNorm/LeakyReLU stages, optional final Sigmoid), 16x16."""

    def __init__(self, ndf=4, nc=3, sigmoid=False):
        super().__init__()
        layers = [
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False)]
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def dcgan_weights_init(m):
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def dcgan_pair(seed=0, sigmoid=False):
    torch.manual_seed(seed)
    g, d = DCGANGenerator(), DCGANDiscriminator(sigmoid=sigmoid)
    g.apply(dcgan_weights_init)
    d.apply(dcgan_weights_init)
    return g, d


def mlp_pair(seed=0, data_dim=6, hidden=16, pack=1):
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(NZ, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, data_dim))
    d = nn.Sequential(nn.Linear(data_dim * pack, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                      nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    return g, d


def latent(model_kind):
    return (NZ, 1, 1) if model_kind == "dcgan" else NZ


def real_batch(model_kind, n, gen):
    shape = (n, 3, 16, 16) if model_kind == "dcgan" else (n, 6)
    return torch.rand(shape, generator=gen) * 2 - 1


def adam(params):
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def assert_rel_close(got: nn.Module, want: nn.Module, tol=1e-4, what=""):
    """Every parameter and floating buffer within ``tol`` relative (L2 norm of the difference)."""
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for key, w in want_state.items():
        g = got_state[key]
        if not w.is_floating_point():
            assert torch.equal(g, w), f"{what}{key}"
            continue
        err = (g.double() - w.double()).norm().item()
        assert err <= tol * max(w.double().norm().item(), 1e-12), f"{what}{key}: relative error {err / w.norm().item():.3g}"


def assert_changed(before: dict, module: nn.Module):
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# the eager reference loops
# ---------------------------------------------------------------------------------------------

def eager_dcgan_step(g, d, opt_g, opt_d, real, z):
    """The PyTorch DCGAN example's iteration, with BCEWithLogitsLoss on D's logits."""
    criterion = nn.BCEWithLogitsLoss()
    d.zero_grad()
    output = d(real).view(-1)
    label = torch.ones_like(output)
    criterion(output, label).backward()
    fake = g(z)
    output = d(fake.detach()).view(-1)
    criterion(output, torch.zeros_like(output)).backward()
    opt_d.step()
    g.zero_grad()
    output = d(fake).view(-1)
    criterion(output, torch.ones_like(output)).backward()
    opt_g.step()


def eager_d_update(g, d, opt_d, real, z):
    """One D update of Algorithm 1 (non-saturating / BCE form); returns G(z) for a following G update."""
    criterion = nn.BCEWithLogitsLoss()
    d.zero_grad()
    output = d(real).view(-1)
    criterion(output, torch.ones_like(output)).backward()
    fake = g(z)
    output = d(fake.detach()).view(-1)
    criterion(output, torch.zeros_like(output)).backward()
    opt_d.step()
    return fake


def eager_g_update(d, opt_g, fake, g):
    criterion = nn.BCEWithLogitsLoss()
    g.zero_grad()
    output = d(fake).view(-1)
    criterion(output, torch.ones_like(output)).backward()
    opt_g.step()


def fuse_options():
    return [False, True]


# ---------------------------------------------------------------------------------------------
# the equivalence tests of the issue
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fuse", fuse_options())
@pytest.mark.parametrize("model", ["dcgan", "mlp"])
def test_ten_steps_match_dcgan_example_loop(model, fuse):
    g, d = dcgan_pair() if model == "dcgan" else mlp_pair()
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    trainer = Trainer(g, d, latent_dim=latent(model), loss="nonsaturating", fuse=fuse, seed=0)
    # BatchNorm in the DCGAN discriminator: two separate D forwards; the MLP D runs real+fake jointly
    assert trainer.joint_d_forward == (model == "mlp")
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    data_gen = torch.Generator().manual_seed(1)
    n = 8
    for _ in range(10):
        real = real_batch(model, n, data_gen)
        z = torch.randn((n, *trainer.latent_dim), generator=data_gen)
        stats = trainer.step(real, z)
        eager_dcgan_step(g_ref, d_ref, opt_g, opt_d, real, z)
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")
    for key in ("d_loss", "g_loss", "value", "jsd", "d_real", "d_fake"):
        assert isinstance(stats[key], torch.Tensor) and stats[key].dim() == 0, key
    assert trainer.step_count == 10 and trainer.d_step_count == 10


@pytest.mark.parametrize("model", ["dcgan", "mlp"])
def test_fit_with_two_d_steps_matches_eager_algorithm_1(model):
    """fit(d_steps=2): per iteration two D updates (fresh batch and fresh noise each), then the G
    update on the last D update's noise; the noise comes from the trainer's generator, one latent
    draw per D update."""
    g, d = dcgan_pair(3) if model == "dcgan" else mlp_pair(3)
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    seed, n, iters = 11, 8, 3
    trainer = Trainer(g, d, latent_dim=latent(model), d_steps=2, fuse=False, seed=seed)
    data = real_batch(model, n * 2 * iters, torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=n, shuffle=False)
    trainer.fit(loader, steps=iters, progress=False)

    noise_gen = torch.Generator().manual_seed(seed)
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    batches = iter(data.split(n))
    for _ in range(iters):
        fake = None
        for _k in range(2):
            z = torch.randn((n, *trainer.latent_dim), generator=noise_gen)
            fake = eager_d_update(g_ref, d_ref, opt_d, next(batches), z)
        eager_g_update(d_ref, opt_g, fake, g_ref)
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")
    assert trainer.step_count == iters and trainer.d_step_count == 2 * iters


EAGER_LOSSES = {  # (D loss, G loss) on real logits r and fake logits f, written out from the papers
    "minimax": (lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(), lambda f: -F.softplus(f).mean()),
    "nonsaturating": (lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(), lambda f: F.softplus(-f).mean()),
    "hinge": (lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(), lambda f: -f.mean()),
    "wasserstein": (lambda r, f: f.mean() - r.mean(), lambda f: -f.mean()),
    "least_squares": (lambda r, f: 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean(),
                      lambda f: 0.5 * ((f - 1) ** 2).mean()),
}


@pytest.mark.parametrize("loss", list(EAGER_LOSSES))
def test_every_loss_kind_matches_its_eager_loop(loss):
    d_loss_fn, g_loss_fn = EAGER_LOSSES[loss]
    g, d = mlp_pair(8)
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    trainer = Trainer(g, d, latent_dim=NZ, loss=loss, fuse=False, seed=0)
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        real, z = torch.randn(8, 6, generator=gen), torch.randn(8, NZ, generator=gen)
        stats = trainer.step(real, z)
        fake = g_ref(z)
        opt_d.zero_grad()
        d_value = d_loss_fn(d_ref(real).view(-1), d_ref(fake.detach()).view(-1))
        d_value.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_value = g_loss_fn(d_ref(fake).view(-1))
        g_value.backward()
        opt_g.step()
        torch.testing.assert_close(stats["d_loss"], d_value.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["g_loss"], g_value.detach(), rtol=1e-5, atol=1e-6)
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")


def test_step_reuses_g_forward_and_equals_d_step_then_g_step():
    g1, d1 = mlp_pair(5)
    g2, d2 = copy.deepcopy(g1), copy.deepcopy(d1)
    t1 = Trainer(g1, d1, latent_dim=NZ, fuse=False, seed=0)
    t2 = Trainer(g2, d2, latent_dim=NZ, fuse=False, seed=0)
    calls = []
    g1.register_forward_hook(lambda *a: calls.append("G"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        real = torch.randn(8, 6, generator=gen)
        z = torch.randn(8, NZ, generator=gen)
        calls.clear()
        t1.step(real, z)
        assert calls == ["G"]  # one G forward serves both updates
        t2.d_step(real, z)
        t2.g_step(z)
    for a, b in zip(list(g1.parameters()) + list(d1.parameters()), list(g2.parameters()) + list(d2.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_discriminator_frozen_during_g_step_and_unfrozen_after():
    g, d = mlp_pair()
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    seen = []

    def record(module, inputs, output):
        seen.append((torch.is_grad_enabled(), tuple(p.requires_grad for p in module.parameters())))

    trainer.step(torch.randn(8, 6))  # the first step also runs a one-time probe forward of D
    d.register_forward_hook(record)
    trainer.step(torch.randn(8, 6))
    # joint forward in the D step (trainable), then the G step's forward with D frozen
    assert len(seen) == 2
    assert all(seen[0][1]) and not any(seen[1][1])
    assert seen[1][0]  # autograd is on (G's gradient flows through D)
    assert all(p.requires_grad for p in d.parameters())
    seen.clear()
    trainer.g_step()
    assert len(seen) == 1 and not any(seen[0][1])
    assert all(p.requires_grad for p in d.parameters())


def test_user_frozen_discriminator_parameter_stays_frozen():
    g, d = mlp_pair()
    d[0].bias.requires_grad_(False)
    before = d[0].bias.detach().clone()
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    trainer.step(torch.randn(8, 6))
    assert not d[0].bias.requires_grad
    assert torch.equal(d[0].bias, before)


class BatchMeanShift(nn.Module):
    """Couples the samples of a batch (as a minibatch-stddev layer does): not on the per-sample list."""

    def forward(self, x):
        return x + 0.5 * x.mean(0, keepdim=True)


@pytest.mark.parametrize("kind, expected_joint", [("plain", True), ("batchnorm", False), ("instancenorm_stats", False),
                                                  ("instancenorm", True), ("spectral", False), ("spectral_param", False),
                                                  ("batch_mean", False), ("dropout", False), ("groupnorm", True),
                                                  ("hooked", False)])
def test_joint_forward_only_without_batch_dependent_layers(kind, expected_joint):
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 12), nn.ReLU(), nn.Linear(12, 2 * 4 * 4), nn.Unflatten(1, (2, 4, 4)))
    norm = {"plain": nn.Identity(), "batchnorm": nn.BatchNorm2d(4),
            "instancenorm_stats": nn.InstanceNorm2d(4, track_running_stats=True),
            "instancenorm": nn.InstanceNorm2d(4, affine=True), "spectral": nn.Identity(),
            "spectral_param": nn.Identity(), "batch_mean": BatchMeanShift(),
            "dropout": nn.Dropout(0.0),  # p=0 keeps the comparison exact; dropout still keeps D separate
            "groupnorm": nn.GroupNorm(2, 4), "hooked": nn.Identity()}[kind]
    if kind == "hooked":
        norm.register_forward_hook(lambda m, i, o: o)
    first = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # a bias before a norm layer has no gradient (only noise)
    if kind == "spectral":
        first = nn.utils.spectral_norm(first)
    elif kind == "spectral_param":
        first = nn.utils.parametrizations.spectral_norm(first)
    d = nn.Sequential(first, norm, nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(64, 1))
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    assert trainer.joint_d_forward is expected_joint
    sizes = []
    d.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    gen = torch.Generator().manual_seed(0)
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    for i in range(3):
        real, z = torch.randn(6, 2, 4, 4, generator=gen), torch.randn(6, NZ, generator=gen)
        sizes.clear()
        trainer.step(real, z)
        if i > 0:  # the first step also runs a one-time probe forward of D
            assert sizes == ([12, 6] if expected_joint else [6, 6, 6])
        eager_dcgan_step(g_ref, d_ref, opt_g, opt_d, real, z)
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")


def test_joint_d_forward_can_be_forced():
    g, d = mlp_pair()
    assert Trainer(g, d, latent_dim=NZ, fuse=False, joint_d_forward=False).joint_d_forward is False
    g, d = dcgan_pair()
    assert Trainer(g, d, latent_dim=(NZ, 1, 1), fuse=False, joint_d_forward=True).joint_d_forward is True


class WrappedMLPDiscriminator(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def test_joint_forward_stays_off_for_own_forward_code_and_on_for_fused_layers():
    """A D class with its own forward is not known to be per-sample (joint off, named in
    batch_dependent_layers; joint_d_forward=True turns it on); a D already made of fastgan's fused
    layers is."""
    import fastgan
    g, d = mlp_pair()
    trainer = Trainer(g, WrappedMLPDiscriminator(d), latent_dim=NZ, fuse=False)
    assert trainer.joint_d_forward is False and trainer.batch_dependent_layers == ["WrappedMLPDiscriminator"]
    g, d = mlp_pair()
    assert Trainer(g, WrappedMLPDiscriminator(d), latent_dim=NZ, fuse=False, joint_d_forward=True).joint_d_forward
    from fastgan.models import MLPDiscriminator, MLPGenerator
    trainer = Trainer(MLPGenerator(NZ, (6,), hidden=(8,)), MLPDiscriminator((6,), hidden=(8,)), latent_dim=NZ)
    assert trainer.joint_d_forward is True  # fastgan's own D classes only reshape around their Sequential
    g, d = mlp_pair()
    fused = fastgan.fuse(d)
    assert any(type(m).__name__ == "FusedLinear" for m in fused.modules())
    trainer = Trainer(g, fused, latent_dim=NZ)
    assert trainer.joint_d_forward is True and trainer.batch_dependent_layers == []


def _is_channels_last(x):
    n, c, h, w = x.shape
    return x.stride() == (h * w * c, 1, w * c, c)


@pytest.mark.parametrize("fuse", fuse_options())
def test_channels_last_is_automatic_for_conv_nets_on_cpu_and_changes_no_result(fuse):
    """CPU conv nets get their 4-D inputs in channels_last (oneDNN's fast layout); the parameters after
    ten steps (noise drawn by the trainer, lazy R1 on the channels_last real batch) equal the NCHW run's."""
    g, d = dcgan_pair()
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    seen = []
    g.register_forward_pre_hook(lambda m, i: seen.append(("G", _is_channels_last(i[0]))))
    d.register_forward_pre_hook(lambda m, i: seen.append(("D", _is_channels_last(i[0]))))
    r1 = dict(r1_gamma=1.0, r1_every=2)  # R1's double backward through the (fused) BatchNorm too
    fast = Trainer(g, d, latent_dim=(NZ, 1, 1), fuse=fuse, seed=3, **r1)
    plain = Trainer(g2, d2, latent_dim=(NZ, 1, 1), fuse=fuse, seed=3, channels_last=False, **r1)
    assert fast.channels_last is True and plain.channels_last is False
    gen = torch.Generator().manual_seed(1)
    for i in range(10):
        real = real_batch("dcgan", 8, gen)
        if i % 3 == 2:
            fast.d_step(real)
            plain.d_step(real)
            fast.g_step()
            plain.g_step()
        else:
            fast.step(real)
            plain.step(real)
    assert seen and all(is_cl for _, is_cl in seen) and {who for who, _ in seen} == {"G", "D"}
    assert_rel_close(g, g2, what="G ")
    assert_rel_close(d, d2, what="D ")
    z = torch.randn(4, NZ, 1, 1)
    torch.testing.assert_close(fast.sample(4, z=z), plain.sample(4, z=z), rtol=1e-4, atol=1e-5)


def test_channels_last_off_for_mlps_and_checked():
    g, d = mlp_pair()
    assert Trainer(g, d, latent_dim=NZ, fuse=False).channels_last is False
    with pytest.raises(ValueError, match="channels_last"):
        Trainer(g, d, latent_dim=NZ, fuse=False, channels_last="yes")


def test_channels_last_with_pack_and_r1_matches_nchw():
    """pack=2 merges sample pairs along channels (a reshape of the channels_last batch) and R1 takes
    the gradient with respect to the channels_last real batch: same parameters as the NCHW run."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 3 * 6 * 6), nn.Unflatten(1, (3, 6, 6)))
    d = nn.Sequential(nn.Conv2d(6, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(64, 1))
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    kw = dict(latent_dim=NZ, pack=2, fuse=False, seed=0, r1_gamma=2.0, r1_every=1)
    fast, plain = Trainer(g, d, **kw), Trainer(g2, d2, channels_last=False, **kw)
    assert fast.channels_last and not plain.channels_last
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        real = torch.randn(8, 3, 6, 6, generator=gen)
        a, b = fast.step(real), plain.step(real)
        torch.testing.assert_close(a["r1"], b["r1"], rtol=1e-4, atol=1e-6)
    assert_rel_close(g, g2, what="G ")
    assert_rel_close(d, d2, what="D ")


@pytest.mark.parametrize("given_z", [False, True])
def test_channels_last_latents_shaped_like_the_data_are_not_the_real_batch(given_z):
    """Noise maps the size of the images (a latent of the data's shape): the latent and the real batch
    get channels_last buffers of their own, so G sees the noise, and the run equals the NCHW one."""
    def nets():
        torch.manual_seed(0)
        g = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1), nn.Tanh())
        d = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 4 * 4, 1))
        return g, d

    real = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    runs = []
    for channels_last in (True, False):
        g, d = nets()
        fed = []
        g.register_forward_pre_hook(lambda m, inp: fed.append(inp[0].detach().clone()))
        trainer = Trainer(g, d, latent_dim=(1, 8, 8), seed=0, fuse=False, channels_last=channels_last)
        trainer.step(real, z=z if given_z else None)
        assert not torch.equal(fed[0], real)
        if given_z:
            assert torch.equal(fed[0], z)
        runs.append((g, d))
    assert_rel_close(runs[0][0], runs[1][0], what="G ")
    assert_rel_close(runs[0][1], runs[1][1], what="D ")


@pytest.mark.parametrize("shape", [(5, 7, 1, 1), (5, 3, 4, 6), (1, 2, 3, 3)])
def test_channels_last_layout_keeps_values(shape):
    g, d = dcgan_pair()
    trainer = Trainer(g, d, latent_dim=(NZ, 1, 1), fuse=False)
    x = torch.randn(shape)
    y = trainer._layout(x)
    assert torch.equal(y, x) and _is_channels_last(y)
    assert trainer._layout(y) is y  # already channels_last: no copy
    assert trainer._layout(torch.randn(4, 6)).dim() == 2


def test_fused_optimizer_gathering_gradients_in_step_matches_its_hooks():
    """FusedAdam.gather_grads_in_step (what the Trainer uses): no hook copies gradients during
    backward; step gathers them (including gradients accumulated over two backward passes and a
    parameter backward did not reach, which is skipped) and updates exactly as with the hooks."""
    from fastgan.optim import FusedAdam
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1), nn.Linear(1, 1))
    twin = copy.deepcopy(model)
    hooked, gathered = FusedAdam(model.parameters(), lr=1e-2), FusedAdam(twin.parameters(), lr=1e-2)
    gathered.gather_grads_in_step()
    views = gathered._buckets[0][0].grad_views
    for i in range(4):
        x = torch.randn(4, 5)
        for m, opt in ((model, hooked), (twin, gathered)):
            opt.zero_grad(set_to_none=True)
            head = m[:3] if i == 2 else m  # step 2: the last layer gets no gradient and is skipped
            head(x).square().sum().backward()
            if i == 1:
                head(x).sum().backward()  # accumulated into the same .grad
        assert all(p.grad is v for p, v in zip(model.parameters(), hooked._buckets[0][0].grad_views) if p.grad is not None)
        assert not any(p.grad is v for p, v in zip(twin.parameters(), views))
        hooked.step()
        gathered.step()
        assert all(p.grad is v for p, v in zip(twin.parameters(), views) if p.grad is not None)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)


def test_trainer_gathers_fused_gradients_in_step():
    g, d = mlp_pair()
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    for opt in (trainer.d_optimizer, trainer.g_optimizer):
        assert all(not b.hook_handles for buckets in opt._buckets for b in buckets)
    trainer.step(torch.randn(8, 6))
    assert all(p.grad is not None for p in list(g.parameters()) + list(d.parameters()))


# ---------------------------------------------------------------------------------------------
# penalties against torch.autograd.grad
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pack", [1, 2])
def test_lazy_r1_matches_autograd_penalty(pack):
    gamma, every, n = 3.0, 3, 8
    g, d = mlp_pair(7, pack=pack)
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    trainer = Trainer(g, d, latent_dim=NZ, r1_gamma=gamma, r1_every=every, pack=pack, fuse=False, seed=0)
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    gen = torch.Generator().manual_seed(3)
    for i in range(7):
        real, z = torch.randn(n, 6, generator=gen), torch.randn(n, NZ, generator=gen)
        stats = trainer.step(real, z)
        # eager: D loss + (gamma / 2) * every * E ||grad_x D(x)||^2 on steps 0, every, 2 every, ...
        real_in = real.clone().requires_grad_(True)
        real_logits = d_ref(real_in.reshape(n // pack, -1)).view(-1)
        fake = g_ref(z)
        fake_logits = d_ref(fake.detach().reshape(n // pack, -1)).view(-1)
        loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        if i % every == 0:
            (grad,) = torch.autograd.grad(real_logits.sum(), real_in, create_graph=True)
            r1 = grad.reshape(n // pack, -1).square().sum(1).mean()
            loss = loss + gamma / 2 * every * r1
            torch.testing.assert_close(stats["r1"], r1.detach(), rtol=1e-4, atol=1e-7)
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        F.softplus(-d_ref(fake.reshape(n // pack, -1)).view(-1)).mean().backward()
        opt_g.step()
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")


def test_wgan_gp_matches_autograd_penalty():
    lam, n = 10.0, 8
    g, d = mlp_pair(9)
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    seed = 4
    trainer = Trainer(g, d, latent_dim=NZ, loss="wasserstein", gp_lambda=lam, fuse=False, seed=seed)
    eps_gen = torch.Generator().manual_seed(seed)  # the trainer draws eps from its generator (z is given)
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        real, z = torch.randn(n, 6, generator=gen), torch.randn(n, NZ, generator=gen)
        stats = trainer.step(real, z)
        fake = g_ref(z)
        loss = d_ref(fake.detach()).mean() - d_ref(real).mean()
        eps = torch.empty(n, 1).uniform_(generator=eps_gen)
        x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(d_ref(x_hat).sum(), x_hat, create_graph=True)
        gp = (grad.norm(2, dim=1) - 1).square().mean()
        torch.testing.assert_close(stats["gp"], gp.detach(), rtol=1e-4, atol=1e-6)
        opt_d.zero_grad()
        (loss + lam * gp).backward()
        opt_d.step()
        opt_g.zero_grad()
        (-d_ref(fake).mean()).backward()
        opt_g.step()
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")


# ---------------------------------------------------------------------------------------------
# PacGAN, Sigmoid, EMA, precision
# ---------------------------------------------------------------------------------------------

def test_pack_concatenates_samples_along_dim_1():
    g, d = mlp_pair(2, pack=3)
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    trainer = Trainer(g, d, latent_dim=NZ, pack=3, fuse=False, seed=0)
    shapes = []
    d.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    gen = torch.Generator().manual_seed(0)
    opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
    for i in range(3):
        real, z = torch.randn(9, 6, generator=gen), torch.randn(9, NZ, generator=gen)
        shapes.clear()
        trainer.step(real, z)
        # joint real+fake (3 packs each), then the G step (the first step probes D once before)
        assert shapes == [(2, 18)] * (i == 0) + [(6, 18), (3, 18)]
        # eager: packs of 3 consecutive samples, features side by side
        pack = lambda x: x.reshape(3, 18)  # noqa: E731
        assert torch.equal(pack(real)[1], torch.cat([real[3], real[4], real[5]]))
        opt_d.zero_grad()
        fake = g_ref(z)
        (F.softplus(-d_ref(pack(real))).mean() + F.softplus(d_ref(pack(fake.detach()))).mean()).backward()
        opt_d.step()
        opt_g.zero_grad()
        F.softplus(-d_ref(pack(fake))).mean().backward()
        opt_g.step()
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")


def test_pack_on_images_concatenates_channels():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 3 * 4 * 4), nn.Unflatten(1, (3, 4, 4)))
    d = nn.Sequential(nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(16, 1))
    trainer = Trainer(g, d, latent_dim=NZ, pack=2, fuse=False, seed=0)
    shapes = []
    d.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    trainer.step(torch.randn(4, 3, 4, 4))
    assert shapes[-1] == (2, 6, 4, 4)
    with pytest.raises(ValueError, match="pack=2"):
        trainer.step(torch.randn(5, 3, 4, 4))


def test_discriminator_ending_in_sigmoid_uses_logits_with_one_warning():
    g, d_sig = dcgan_pair(4, sigmoid=True)
    g_ref = copy.deepcopy(g)
    d_ref = DCGANDiscriminator()
    d_ref.load_state_dict(d_sig.state_dict())  # same weights, no Sigmoid
    with pytest.warns(UserWarning, match="Sigmoid") as record:
        trainer = Trainer(g, d_sig, latent_dim=(NZ, 1, 1), fuse=False, seed=0)
        opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            real, z = real_batch("dcgan", 4, gen), torch.randn(4, NZ, 1, 1, generator=gen)
            trainer.step(real, z)
            eager_dcgan_step(g_ref, d_ref, opt_g, opt_d, real, z)
    assert sum("Sigmoid" in str(w.message) for w in record) == 1
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d_sig, d_ref, what="D ")
    # outside the trainer the discriminator still returns probabilities
    x = real_batch("dcgan", 2, torch.Generator().manual_seed(9))
    d_sig.eval()
    d_ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(d_sig(x), torch.sigmoid(d_ref(x)))


def test_sigmoid_followed_by_flatten_is_detected():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 6))
    d = nn.Sequential(nn.Linear(6, 1), nn.Sigmoid(), nn.Flatten(0))
    d_ref = nn.Sequential(nn.Linear(6, 1), nn.Flatten(0))
    d_ref.load_state_dict(d.state_dict())
    g_ref = copy.deepcopy(g)
    with pytest.warns(UserWarning, match="Sigmoid"):
        trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
        real, z = torch.randn(4, 6), torch.randn(4, NZ)
        trainer.step(real, z)
    eager_dcgan_step(g_ref, d_ref, adam(g_ref.parameters()), adam(d_ref.parameters()), real, z)
    assert_rel_close(d, d_ref, what="D ")


def test_sigmoid_inside_discriminator_is_left_alone(recwarn):
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 6))

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.gate = nn.Linear(6, 6), nn.Linear(6, 1), nn.Sigmoid()

        def forward(self, x):
            return self.head(self.body(x) * self.gate(x))

    d = Gated()
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    trainer.step(torch.randn(4, 6))
    assert isinstance(d.gate, nn.Sigmoid)
    assert not [w for w in recwarn if "Sigmoid" in str(w.message)]


def test_final_sigmoid_used_twice_is_an_error():
    """D's final Sigmoid module also gates a hidden layer: its input cannot be taken as the logit without
    changing the gate, and its output taken as a logit would train the wrong game -- a clear error."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 6))

    class SharedSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.sigmoid = nn.Linear(6, 6), nn.Linear(6, 1), nn.Sigmoid()

        def forward(self, x):
            return self.sigmoid(self.head(self.body(x) * self.sigmoid(x)))

    trainer = Trainer(g, SharedSigmoid(), latent_dim=NZ, fuse=False, seed=0)
    with pytest.raises(ValueError, match="ends in an nn.Sigmoid module that it also calls elsewhere"):
        trainer.step(torch.randn(4, 6))


def test_stats_are_zero_dim_and_nothing_syncs_with_the_host(monkeypatch):
    g, d = mlp_pair()
    trainer = Trainer(g, d, latent_dim=NZ, r1_gamma=1.0, r1_every=2, ema_beta=0.9, fuse=False, seed=0)
    trainer.step(torch.randn(8, 6))  # first step: one-time setup (probe forward) may look at values

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(3):
        stats = trainer.step(torch.randn(8, 6))
        trainer.d_step(torch.randn(8, 6))
        stats.update(trainer.g_step())
    monkeypatch.undo()
    for key in ("d_loss", "g_loss", "value", "jsd", "d_real", "d_fake", "r1"):
        assert stats[key].dim() == 0 and stats[key].device.type == "cpu", key
        assert torch.isfinite(stats[key])


def test_noise_is_drawn_from_the_trainers_generator():
    g1, d1 = mlp_pair()
    g2, d2 = copy.deepcopy(g1), copy.deepcopy(d1)
    real = torch.randn(8, 6)
    t1 = Trainer(g1, d1, latent_dim=NZ, fuse=False, seed=123)
    t1.step(real)
    t2 = Trainer(g2, d2, latent_dim=NZ, fuse=False, seed=0)
    t2.step(real, torch.randn(8, NZ, generator=torch.Generator().manual_seed(123)))
    for a, b in zip(g1.parameters(), g2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_uniform_prior_draws_in_minus_one_one():
    g, d = mlp_pair()
    seen = []
    g.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    trainer = Trainer(g, d, latent_dim=NZ, prior="uniform", fuse=False, seed=0)
    trainer.step(torch.randn(64, 6))
    z = seen[-1]
    assert z.min() >= -1 and z.max() <= 1 and z.min() < -0.5 and z.max() > 0.5


def test_sample_shapes_and_noise():
    g, d = mlp_pair()
    trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
    out = trainer.sample(5)
    assert out.shape == (5, 6) and not out.requires_grad
    z = torch.randn(3, NZ)
    torch.testing.assert_close(trainer.sample(3, z=z), g(z).detach())


# ---------------------------------------------------------------------------------------------
# the CUDA-graph bookkeeping, on CPU with a stand-in for torch.cuda's graph API
# (the real capture is tested in tests/gpu/test_trainer_gpu.py)
# ---------------------------------------------------------------------------------------------

class _StandInGraph:
    """Capture runs the body once (that is the step of the capturing call); the replay right after
    capture then has nothing left to do. Enough to check the Python side of the graph path."""

    def register_generator_state(self, generator):
        self.generator = generator

    def replay(self):
        pass


class _StandInStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


def _stand_in_cuda(monkeypatch, fail=False):
    import contextlib as _contextlib

    @_contextlib.contextmanager
    def graph(g, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _StandInStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _StandInStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


@pytest.mark.parametrize("fail", [False, True])
def test_graph_path_warms_up_captures_and_falls_back(monkeypatch, fail):
    _stand_in_cuda(monkeypatch, fail=fail)
    g, d = mlp_pair(10)
    eager = Trainer(copy.deepcopy(g), copy.deepcopy(d), latent_dim=NZ, fuse=False, seed=0, r1_gamma=1.0, r1_every=2)
    graphed = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0, r1_gamma=1.0, r1_every=2)
    graphed._graphs_on = True  # what cuda_graphs="auto" sets on a CUDA device
    graphed._grads_to_none = False
    gen = torch.Generator().manual_seed(0)
    calls = 3 if not fail else 5  # warm-up, warm-up, capture (+ eager steps after a failed capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            real = torch.randn(8, 6, generator=gen)
            for t in (eager, graphed):
                t.d_step(real)  # D updates 0, 2, 4 (d_step) are R1 steps; 1, 3, 5 (step) are not
            s_eager, s_graph = eager.step(real), graphed.step(real)
            assert list(s_graph) == list(s_eager)
            for key in s_eager:
                torch.testing.assert_close(s_graph[key], s_eager[key], rtol=1e-6, atol=1e-7)
                assert s_graph[key].dim() == 0
    failures = [w for w in caught if "CUDA graph capture" in str(w.message)]
    if fail:
        assert len(failures) == 1 and "d_step()" in str(failures[0].message)
        assert not graphed._graphs_on and not graphed._graphs
    else:
        assert not failures
        assert {key[0]: entry.graph is not None for key, entry in graphed._graphs.items()} == {
            "d_step": True, "step": True}
        assert all(key[3] == (key[0] == "d_step") for key in graphed._graphs)  # R1 variant keys
    for p, q in zip(list(g.parameters()) + list(d.parameters()),
                    list(eager.generator.parameters()) + list(eager.discriminator.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# drop-in: D fused on the first step; D outputs shaped as the DCGAN example's
# ---------------------------------------------------------------------------------------------

def _fused_module_types(module: nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if type(m).__module__.startswith("fastgan.")}


@pytest.mark.parametrize("model", ["dcgan", "mlp"])
def test_fuse_true_fuses_both_networks_and_fuse_false_neither(model):
    for fuse in (True, False):
        g, d = dcgan_pair() if model == "dcgan" else mlp_pair()
        trainer = Trainer(g, d, latent_dim=latent(model), fuse=fuse, seed=0)
        trainer.step(real_batch(model, 8, torch.Generator().manual_seed(0)))
        assert bool(_fused_module_types(g)) == fuse, _fused_module_types(g)
        assert bool(_fused_module_types(d)) == fuse, _fused_module_types(d)


class _ExampleDiscriminator(DCGANDiscriminator):
    """The example's D exactly as it returns: (N, 1, 1, 1) probabilities (its loop calls .view(-1))."""

    def forward(self, x):
        return self.main(x)


def test_dcgan_example_discriminator_as_written_matches_the_example_loop():
    torch.manual_seed(0)
    g, d = DCGANGenerator(), _ExampleDiscriminator(sigmoid=True)
    g.apply(dcgan_weights_init)
    d.apply(dcgan_weights_init)
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    d_ref.main = d_ref.main[:-1]  # the eager loop with BCEWithLogitsLoss takes the logits
    with pytest.warns(UserWarning, match="[Ss]igmoid"):
        trainer = Trainer(g, d, latent_dim=latent("dcgan"), seed=0)
        opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
        data_gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            real = real_batch("dcgan", 8, data_gen)
            z = torch.randn((8, *trainer.latent_dim), generator=data_gen)
            trainer.step(real, z)
            eager_dcgan_step(g_ref, d_ref, opt_g, opt_d, real, z)
    assert_rel_close(g, g_ref, what="G ")
    for (name, p), p_ref in zip(d.named_parameters(), d_ref.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_discriminator_output_with_more_than_one_value_per_sample_is_an_error():
    g, _ = mlp_pair()
    d = nn.Sequential(nn.Linear(6, 4))  # 4 values per sample
    trainer = Trainer(g, d, latent_dim=NZ, seed=0)
    with pytest.raises(ValueError, match="one value per D input"):
        trainer.step(real_batch("mlp", 8, torch.Generator().manual_seed(0)))


def test_r1_through_fused_batchnorm_equals_the_unfused_network():
    """Lazy R1 on a DCGAN D (conv -> BatchNorm -> LeakyReLU -> conv): the fused BatchNormAct's double
    backward gives the same parameters as torch's own layers (it once failed with 'backward through
    the graph a second time' once a convolution followed it)."""
    g, d = dcgan_pair()
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    fused = Trainer(g, d, latent_dim=(NZ, 1, 1), fuse=True, seed=3, r1_gamma=1.0, r1_every=1)
    plain = Trainer(g2, d2, latent_dim=(NZ, 1, 1), fuse=False, seed=3, r1_gamma=1.0, r1_every=1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        real = real_batch("dcgan", 8, gen)
        fused.step(real)
        plain.step(real)
    assert_rel_close(g, g2, what="G ")
    assert_rel_close(d, d2, what="D ")


# ---------------------------------------------------------------------------------------------
# drop-in audit: a D handed to a second trainer, a sigmoid in D's own code, G's errors
# ---------------------------------------------------------------------------------------------

def test_second_trainer_on_a_discriminator_whose_sigmoid_was_replaced_still_trains_logits():
    """A new Trainer on the same D (another run, Trainer.load into the same networks) finds the Sigmoid
    the first one replaced by its tap: it must train D's logits too, not the tap's probabilities."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 6))
    d = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1), nn.Sigmoid())
    with pytest.warns(UserWarning, match="Sigmoid"):
        Trainer(g, d, latent_dim=NZ, fuse=False, seed=0).step(torch.randn(4, 6))
    g_ref, d_ref = copy.deepcopy(g), nn.Sequential(*copy.deepcopy(list(d)[:3]))
    with pytest.warns(UserWarning, match="Sigmoid"):
        trainer = Trainer(g, d, latent_dim=NZ, fuse=False, seed=0)
        opt_g, opt_d = adam(g_ref.parameters()), adam(d_ref.parameters())
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            real, z = torch.randn(4, 6, generator=gen), torch.randn(4, NZ, generator=gen)
            trainer.step(real, z)
            eager_dcgan_step(g_ref, d_ref, opt_g, opt_d, real, z)
    assert_rel_close(g, g_ref, what="G ")
    assert_rel_close(d, d_ref, what="D ")
    with torch.no_grad():  # outside the trainers D still returns probabilities
        x = torch.randn(3, 6)
        torch.testing.assert_close(d(x), torch.sigmoid(d_ref(x)))


@pytest.mark.parametrize("how", ["torch.sigmoid", "method_then_view"])
def test_sigmoid_in_the_discriminators_forward_code_is_warned_about(how):
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 6))

    class FunctionalSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))

        def forward(self, x):
            if how == "torch.sigmoid":
                return torch.sigmoid(self.net(x))
            return self.net(x).sigmoid().view(-1, 1).squeeze(1)

    trainer = Trainer(g, FunctionalSigmoid(), latent_dim=NZ, fuse=False, seed=0)
    with pytest.warns(UserWarning, match="sigmoid computed in its forward code"):
        trainer.step(torch.randn(4, 6))


def test_no_sigmoid_warning_for_logits_or_a_sigmoid_module(recwarn):
    g, d = mlp_pair()
    Trainer(g, d, latent_dim=NZ, fuse=False, seed=0).step(torch.randn(4, 6))
    assert not [w for w in recwarn if "igmoid" in str(w.message)]
    g, d = dcgan_pair(sigmoid=True)
    Trainer(g, d, latent_dim=(NZ, 1, 1), seed=0).step(real_batch("dcgan", 4, torch.Generator().manual_seed(0)))
    assert [str(w.message) for w in recwarn if "igmoid" in str(w.message)] and not [
        w for w in recwarn if "forward code" in str(w.message)]


@pytest.mark.parametrize("first_call", ["step", "g_step", "sample"])
def test_a_latent_dim_that_does_not_fit_the_generator_is_named(first_call):
    g, d = dcgan_pair()
    trainer = Trainer(g, d, latent_dim=NZ, seed=0)  # the DCGAN G takes (N, NZ, 1, 1)
    call = {"step": lambda: trainer.step(real_batch("dcgan", 4, torch.Generator().manual_seed(0))),
            "g_step": lambda: trainer.g_step(batch_size=4), "sample": lambda: trainer.sample(4)}[first_call]
    with pytest.raises(ValueError, match=rf"generator failed on a latent batch of shape \(4, {NZ}\).*"
                                         rf"latent_dim=\({NZ}, 1, 1\)"):
        call()


def test_a_generator_output_of_another_dtype_or_device_is_named():
    class Cast(nn.Module):
        def __init__(self, **to):
            super().__init__()
            self.net, self.to_kwargs = nn.Linear(NZ, 6), to

        def forward(self, z):
            return self.net(z).to(**self.to_kwargs)

    for to, match in ((dict(dtype=torch.float64), "generator's output has dtype torch.float64"),
                      (dict(device="meta"), "generator's output is on meta")):
        torch.manual_seed(0)
        trainer = Trainer(Cast(**to), nn.Sequential(nn.Linear(6, 1)), latent_dim=NZ, fuse=False, seed=0)
        with pytest.raises(ValueError, match=match):
            trainer.step(torch.randn(4, 6))
