"""fastgan.Trainer on CUDA: captured D / G steps (CUDA graphs) against eager steps, precision, no sync.

Runs only where CUDA is present (the one allowed skip).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

from fastgan import Trainer  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device())
NZ, DIM = 16, 32


def mlp_pair(seed=0, hidden=64, pack=1):
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(NZ, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, DIM),
                      nn.Tanh())
    d = nn.Sequential(nn.Linear(DIM * pack, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                      nn.Linear(hidden, 1))
    return g.to(DEVICE), d.to(DEVICE)


def dcgan_pair(seed=0, ngf=8, ndf=8, nc=3):
    torch.manual_seed(seed)
    g = nn.Sequential(
        nn.ConvTranspose2d(NZ, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0))
    return g.to(DEVICE), d.to(DEVICE)


def twins(pair, **kwargs):
    """(eager trainer, graphed trainer) on identical copies of one initialisation."""
    g, d = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the DCGAN D's final Sigmoid
        eager = Trainer(copy.deepcopy(g), copy.deepcopy(d), cuda_graphs=False, seed=0, **kwargs)
        graphed = Trainer(g, d, cuda_graphs=True, seed=0, **kwargs)
    return eager, graphed


def assert_same_params(a: Trainer, b: Trainer, rtol=1e-4, atol=1e-5):
    for (name, p), q in zip(list(a.generator.named_parameters()) + list(a.discriminator.named_parameters()),
                            list(b.generator.parameters()) + list(b.discriminator.parameters())):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def captured(trainer: Trainer) -> int:
    return sum(entry.graph is not None for entry in trainer._graphs.values())


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's default convolution-gradient algorithms may differ from call to call (atomics, per-call
    choice), and Adam turns a 1e-9 difference in a near-zero gradient into one of up to lr in the weight
    (seen on an H100: 1e-4 in the DCGAN G's first layer after 6 steps, with every loss still equal).
    Graphed against eager must compare the capture, not cuDNN's choices."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_graphed_steps_equal_eager_steps_with_given_noise(model, deterministic_cudnn):
    pair = mlp_pair() if model == "mlp" else dcgan_pair()
    latent = NZ if model == "mlp" else (NZ, 1, 1)
    eager, graphed = twins(pair, latent_dim=latent)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    shape = (16, DIM) if model == "mlp" else (16, 3, 32, 32)
    for _ in range(6):  # two warm-up steps, capture, replays
        real = torch.rand(shape, device=DEVICE, generator=gen) * 2 - 1
        z = torch.randn((16, *eager.latent_dim), device=DEVICE, generator=gen)
        s_eager, s_graph = eager.step(real, z), graphed.step(real, z)
        torch.testing.assert_close(s_graph["d_loss"], s_eager["d_loss"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s_graph["g_loss"], s_eager["g_loss"], rtol=1e-4, atol=1e-5)
    assert captured(graphed) == 1
    assert_same_params(eager, graphed)


def test_noise_drawn_inside_the_graph_follows_the_trainers_generator():
    eager, graphed = twins(mlp_pair(2), latent_dim=NZ)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    for _ in range(6):
        real = torch.rand(16, DIM, device=DEVICE, generator=gen)
        eager.step(real)
        graphed.step(real)
        eager.d_step(real)
        graphed.d_step(real)
        eager.g_step()
        graphed.g_step()
    assert captured(graphed) == 3  # step, d_step and g_step each captured once
    assert_same_params(eager, graphed)
    assert torch.equal(eager._gen.get_state(), graphed._gen.get_state())


def test_graphed_lazy_r1_and_ema_equal_eager():
    eager, graphed = twins(mlp_pair(4), latent_dim=NZ, r1_gamma=2.0, r1_every=2, ema_beta=0.9)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    for _ in range(8):
        real = torch.rand(16, DIM, device=DEVICE, generator=gen)
        z = torch.randn(16, NZ, device=DEVICE, generator=gen)
        s_eager, s_graph = eager.step(real, z), graphed.step(real, z)
        torch.testing.assert_close(s_graph["r1"], s_eager["r1"], rtol=1e-4, atol=1e-6)
    assert captured(graphed) == 2  # with and without the R1 term
    assert_same_params(eager, graphed, rtol=1e-4, atol=1e-6)
    z = torch.randn(8, NZ, device=DEVICE)
    torch.testing.assert_close(graphed.sample(8, z=z), eager.sample(8, z=z), rtol=1e-4, atol=1e-5)


def test_lr_schedules_and_hyperparameter_changes_reach_the_replayed_steps():
    """A captured step keeps the arguments it was captured with: the fused kernels read the learning rate
    from a device tensor the trainer refreshes before each replay (an LR scheduler stepping every step,
    and an lr assigned by hand), and a change of another hyperparameter (Adam's betas, the EMA's beta)
    drops the graphs, which are captured again. Graphed must equal eager throughout."""
    eager, graphed = twins(mlp_pair(6), latent_dim=NZ, ema_beta=0.9)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(t.g_optimizer, gamma=0.7) for t in (eager, graphed)]
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    for i in range(12):
        real = torch.rand(16, DIM, device=DEVICE, generator=gen)
        z = torch.randn(16, NZ, device=DEVICE, generator=gen)
        s_eager, s_graph = eager.step(real, z), graphed.step(real, z)
        torch.testing.assert_close(s_graph["g_loss"], s_eager["g_loss"], rtol=1e-4, atol=1e-5)
        for s in schedulers:
            s.step()
        if i == 5:
            for t in (eager, graphed):
                t.d_optimizer.param_groups[0]["lr"] = 5e-4          # assigned by hand
                t.d_optimizer.param_groups[0]["betas"] = (0.2, 0.99)  # baked into the capture
                t.ema.beta = 0.5
        if i == 4:
            assert captured(graphed) == 1
    assert captured(graphed) == 1  # captured again after the change
    assert_same_params(eager, graphed)
    z = torch.randn(8, NZ, device=DEVICE)
    torch.testing.assert_close(graphed.sample(8, z=z), eager.sample(8, z=z), rtol=1e-4, atol=1e-5)


def test_replayed_steps_do_not_synchronise_with_the_host():
    trainer = Trainer(*mlp_pair(), latent_dim=NZ, cuda_graphs=True, seed=0)
    real = torch.rand(32, DIM, device=DEVICE)
    for _ in range(4):
        trainer.step(real)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            stats = trainer.step(real)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats["d_loss"].device.type == "cuda" and stats["d_loss"].dim() == 0


def test_eager_cuda_steps_do_not_synchronise_with_the_host():
    trainer = Trainer(*mlp_pair(), latent_dim=NZ, cuda_graphs=False, r1_gamma=1.0, r1_every=2, seed=0)
    real = torch.rand(32, DIM, device=DEVICE)
    trainer.step(real)  # first step: one-time setup
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(real)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_capture_failure_falls_back_to_eager_with_a_warning():
    class SyncingD(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(DIM, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

        def forward(self, x):
            if self.net[0].weight.abs().sum().item() < 0:  # a host sync: cannot be captured
                raise AssertionError
            return self.net(x)

    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(NZ, 32), nn.ReLU(), nn.Linear(32, DIM)).to(DEVICE)
    d = SyncingD().to(DEVICE)
    eager = Trainer(copy.deepcopy(g), copy.deepcopy(d), latent_dim=NZ, cuda_graphs=False, seed=0)
    graphed = Trainer(g, d, latent_dim=NZ, cuda_graphs="auto", seed=0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture"):
        for _ in range(5):
            real = torch.rand(16, DIM, device=DEVICE, generator=gen)
            z = torch.randn(16, NZ, device=DEVICE, generator=gen)
            eager.step(real, z)
            graphed.step(real, z)
    assert not graphed._graphs_on
    assert_same_params(eager, graphed, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_low_precision_on_gpu(precision, cuda_graphs):
    g, d = dcgan_pair(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = Trainer(copy.deepcopy(g), copy.deepcopy(d), latent_dim=(NZ, 1, 1), cuda_graphs=False, seed=0)
        trainer = Trainer(g, d, latent_dim=(NZ, 1, 1), precision=precision, cuda_graphs=cuda_graphs, seed=0)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    for _ in range(6):
        real = torch.rand(16, 3, 32, 32, device=DEVICE, generator=gen) * 2 - 1
        z = torch.randn(16, NZ, 1, 1, device=DEVICE, generator=gen)
        s_ref, s = ref.step(real, z), trainer.step(real, z)
    for key in ("d_loss", "g_loss"):
        assert torch.isfinite(s[key])
        torch.testing.assert_close(s[key], s_ref[key], rtol=5e-2, atol=5e-2)
    for p in list(trainer.generator.parameters()) + list(trainer.discriminator.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    if precision == "fp16":
        assert trainer._d_scaler.scale.item() > 0 and trainer._g_scaler.scale.item() > 0
    if cuda_graphs:
        assert captured(trainer) == 1


def test_fit_on_gpu_with_graphs_and_checkpoint(tmp_path):
    trainer = Trainer(*mlp_pair(), latent_dim=NZ, seed=0)  # cuda_graphs="auto": on
    data = torch.rand(256, DIM)  # CPU data: fit moves the batches
    history = trainer.fit(data, steps=12, batch_size=32, log_every=4, checkpoint_every=6, out_dir=tmp_path,
                          progress=False)
    assert history["step"] == [4.0, 8.0, 12.0]
    assert captured(trainer) == 1
    resumed = Trainer.load(tmp_path, *mlp_pair(9), device=DEVICE)  # the newest good checkpoint
    assert resumed.step_count == 12
    assert_same_params(trainer, resumed, rtol=0, atol=0)
