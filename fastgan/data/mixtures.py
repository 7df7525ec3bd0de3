"""The 2-D Gaussian mixtures of the Unrolled GAN, VEEGAN and PacGAN papers: ``ring8`` and ``grid25``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class GaussianMixture2D:
    """An equal-weight mixture of isotropic 2-D Gaussians.

    ``modes`` is a ``(K, 2)`` float32 tensor of means, ``std`` the common standard deviation.
    """

    name: str
    modes: torch.Tensor
    std: float

    @property
    def num_modes(self) -> int:
        return int(self.modes.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples as an ``(n, 2)`` float32 CPU tensor (mode chosen uniformly, then Gaussian noise)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        index = torch.randint(0, self.num_modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.modes[index] + self.std * noise

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> "MixtureBatches":
        """An endless iterable of fresh batches; see :class:`MixtureBatches`."""
        return MixtureBatches(self, batch_size, seed=seed, start=start)


class MixtureBatches:
    """Endless fresh batches from a mixture, reproducible from ``seed``.

    Batch ``i`` is drawn from a generator seeded with ``(seed, i)``, so a resumed run that starts at
    ``start=i`` sees exactly the batches an uninterrupted run would have seen from there on.
    """

    def __init__(self, mixture: GaussianMixture2D, batch_size: int, seed: int = 0, start: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.mixture = mixture
        self.batch_size = batch_size
        self.seed = int(seed)
        self.start = int(start)

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator()
        index = self.start
        while True:
            # A per-batch seed (not one running stream) makes any batch index directly reachable.
            generator.manual_seed((self.seed * 1_000_003 + index) % (2**63))
            yield self.mixture.sample(self.batch_size, generator=generator)
            index += 1


def ring8(std: float = 0.01) -> GaussianMixture2D:
    """8 Gaussians with means on the unit circle at angles 2πk/8, std 0.01."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    modes = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float()
    return GaussianMixture2D("ring8", modes, float(std))


def grid25(std: float = 0.05) -> GaussianMixture2D:
    """25 Gaussians with means on {-4, -2, 0, 2, 4}², std 0.05."""
    coords = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    modes = torch.cartesian_prod(coords, coords)
    return GaussianMixture2D("grid25", modes, float(std))


MIXTURES = {"ring8": ring8, "grid25": grid25}
