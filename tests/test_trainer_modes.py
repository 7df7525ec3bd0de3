"""Every loss kind trains a small MLP GAN on 8 Gaussians on a ring to cover more modes than at start."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastgan import Trainer

RADIUS, STD, NUM_MODES = 2.0, 0.05, 8
CENTERS = torch.tensor([[RADIUS * math.cos(2 * math.pi * k / NUM_MODES), RADIUS * math.sin(2 * math.pi * k / NUM_MODES)]
                        for k in range(NUM_MODES)])


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These models are tiny: one thread is fastest, and on a loaded shared machine torch's thread pool
    (spinning OpenMP workers) makes them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ring(n: int, gen: torch.Generator) -> torch.Tensor:
    modes = torch.randint(0, NUM_MODES, (n,), generator=gen)
    return CENTERS[modes] + STD * torch.randn(n, 2, generator=gen)


def modes_covered(samples: torch.Tensor) -> int:
    """Modes holding at least 2% of the samples within 4 standard deviations of their centre."""
    dist = torch.cdist(samples.float(), CENTERS)
    nearest = dist.min(dim=1)
    counts = torch.bincount(nearest.indices[nearest.values < 4 * STD], minlength=NUM_MODES)
    return int((counts >= 0.02 * samples.shape[0]).sum())


def test_mode_count_sees_the_data_and_a_collapsed_generator():
    gen = torch.Generator().manual_seed(0)
    assert modes_covered(ring(1000, gen)) == NUM_MODES
    assert modes_covered(CENTERS[2] + STD * torch.randn(1000, 2, generator=gen)) == 1
    assert modes_covered(torch.zeros(1000, 2)) == 0


# wasserstein: WGAN-GP's usual recipe (several critic steps, beta1 = 0, a gradient penalty)
SETTINGS = {
    "minimax": dict(lr=3e-3, steps=500),
    "nonsaturating": dict(lr=3e-3, steps=500),
    "hinge": dict(lr=3e-3, steps=500),
    "least_squares": dict(lr=3e-3, steps=500),
    "wasserstein": dict(lr=1e-3, steps=400, betas=(0.0, 0.9), d_steps=3, gp_lambda=1.0),
}


@pytest.mark.parametrize("loss", list(SETTINGS))
def test_every_loss_kind_learns_more_modes(loss):
    options = dict(SETTINGS[loss])
    steps = options.pop("steps")
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    d = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    trainer = Trainer(g, d, latent_dim=4, loss=loss, seed=0, **options)
    data = ring(4096, torch.Generator().manual_seed(1))
    before = modes_covered(trainer.sample(1000))
    history = trainer.fit(data, steps=steps, batch_size=128, log_every=100, progress=False)
    after = modes_covered(trainer.sample(1000))
    assert after > before and after >= 3, (before, after)
    assert all(math.isfinite(v) for v in history["d_loss"] + history["g_loss"])
